"""The decode cache of a linear-attention layer: a fixed-size state plus the few recent keys the softmax window reads.

`LinearStateLayer` keeps the raw (rotated) keys and values of the last `recent` positions, for the exact softmax
window, with their linear-attention features beside them, and a `LinearState` (`sum phi_k v^T`, `sum psi_k`) of every
older key. After each attention step the handler folds the keys that leave the window into the state (`fold`), so the
memory no longer grows with the context. A layer with its own sliding window keeps no state (`stateful=False`): its
linear part is bounded by that window, and its keys are simply dropped once no query can reach them.

Features are stored because they cannot be recomputed later: NaLaFormer's come from the keys *before* RoPE, and the
rotation of a cached key is no longer known to the layer.
"""

from __future__ import annotations

import torch

from .kv_cache import RetainingLayer
from .linear_attention import LinearState, absorb

__all__ = ["LinearStateLayer"]


class LinearStateLayer(RetainingLayer):
    """Raw keys, values and features of the last `recent` positions, and the state of all older ones."""

    def __init__(self, recent: int, stateful: bool = True) -> None:
        super().__init__()
        self.recent, self.stateful = recent, stateful
        self.features: tuple[torch.Tensor, torch.Tensor] | None = None  # numerator, normaliser [B, KV, S, F]
        self.state: LinearState | None = None

    def keep(self, next_position: int) -> slice:
        # the held positions are the latest ones (`seen - held .. seen - 1`): the oldest leave first
        held = self.positions.numel()
        return slice(min(held, max(0, next_position - self.recent - (self.seen - held))), None)

    def add_features(self, k: torch.Tensor, k_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the features of the keys `update` just added; returns those of every key held."""
        if self.features is not None:
            k, k_norm = torch.cat([self.features[0], k], dim=2), torch.cat([self.features[1], k_norm], dim=2)
        if k.shape[2] != self.positions.numel():
            raise RuntimeError(
                f"linear attention: the cache holds {self.positions.numel()} keys but features for {k.shape[2]}; a "
                "cache filled before the patch cannot be continued, start a new one."
            )
        self.features = (k, k_norm)
        return self.features

    def fold(self, real: torch.Tensor | None) -> None:
        """Fold the keys no later window reaches into the state (`real` `[B, S]`: which held keys are not padding),
        then drop them."""
        leaving = self.keep(self.seen).start
        if not leaving or self.features is None or self.values is None:
            return
        if self.stateful:
            k, k_norm = (f[:, :, :leaving] for f in self.features)
            if real is not None:
                mask = real[:, None, :leaving, None].to(k.dtype)
                k, k_norm = k * mask, k_norm * mask
            self.state = absorb(self.state, k, k_norm, self.values[:, :, :leaving])
        self.evict()

    def _select(self, keep: torch.Tensor | slice) -> None:
        super()._select(keep)
        if self.features is not None:
            self.features = (self.features[0][:, :, keep], self.features[1][:, :, keep])

    @property
    def nbytes(self) -> int:
        """Bytes held: raw keys and values, their features and the state."""
        tensors = [self.keys, self.values, *(self.features or ()), *(self.state or ())]
        return sum(t.nbytes for t in tensors if t is not None)

    def reset(self) -> None:
        super().reset()
        self.features, self.state = None, None

    def _each(self, fn) -> None:
        if self.features is not None:
            self.features = (fn(self.features[0]), fn(self.features[1]))
        if self.state is not None:
            self.state = LinearState(fn(self.state.kv), fn(self.state.k))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._each(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._each(lambda t: t[indices])
