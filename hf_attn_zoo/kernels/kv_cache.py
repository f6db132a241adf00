"""KV-cache layers that keep only what a sparse pattern can still attend, and how patches put them in a cache.

transformers v5 removed `SinkCache`; its caches are lists of per-layer objects (`cache.layers[i]`). A patch that
bounds what a layer attends installs `use_kv_layer`: a forward pre-hook on the attention module that, when the
layer's slot of the cache is still a fresh `DynamicLayer`, puts the method's own layer there. This works for
`generate`, for a `DynamicCache` the user passes, and for the cache a forward with `use_cache=True` creates, and
leaves static caches alone. The attention handler finds the layer with `current_kv_layer(module)`.

`SinkWindowLayer` keeps each row's first `sinks` real tokens and the last `window` positions, with their original
positions: keys stay rotated as they were computed, so decoding reproduces the masked full forward exactly, within
the model's position range (StreamingLLM's re-rotation to extend beyond it is not done).

`SinkScoreLayer` also keeps, per batch row, the `extra` middle tokens with the highest sink scores among those that
left the window (secondary sinks, detected online by `hf_attn_zoo.kernels.streaming.sink_cache_attention`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

__all__ = [
    "RetainingLayer",
    "SinkScoreLayer",
    "SinkWindowLayer",
    "current_kv_layer",
    "kv_cache_bytes",
    "use_kv_layer",
]

_LAYER_ATTR = "_zoo_kv_layer"


class RetainingLayer(DynamicLayer):
    """A dynamic cache layer that evicts the positions no future query can attend (after each attention step; what it
    keeps is `keep`, every position unless a subclass says otherwise).

    It reports every position seen (`get_seq_length`, `get_mask_sizes`), so transformers builds the masks and cache
    positions of an uncompressed cache; `positions` are the absolute positions of the keys `update` returned.
    """

    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0
        self.positions = torch.empty(0, dtype=torch.long)

    def keep(self, next_position: int) -> torch.Tensor | slice:
        """Which stored positions a query at `next_position` or later may still attend: a bool mask `[S]`, or a slice
        of them where counts alone tell (no host sync, so `torch.compile` traces it); every one by default."""
        return slice(None)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.positions = self.positions.to(self.device)
        self._drop()
        new = torch.arange(self.seen, self.seen + key_states.shape[-2], device=self.device)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, new])
        self.seen += key_states.shape[-2]
        return self.keys, self.values

    def evict(self) -> None:
        """Drop, now, what no later query can attend (the attention handler calls it after each step)."""
        self._drop()

    def _drop(self) -> None:
        if not self.positions.numel():
            return
        keep = self.keep(self.seen)
        if isinstance(keep, slice):
            if keep.start or keep.stop is not None:
                self._select(keep)
        elif not bool(keep.all()):
            self._select(keep)

    def _select(self, keep: torch.Tensor | slice) -> None:
        """Keep the stored positions `keep` marks (bool `[S]`, or a slice); a subclass with more per-position data
        extends it."""
        self.keys, self.values = self.keys[:, :, keep], self.values[:, :, keep]
        self.positions = self.positions[keep]

    @property
    def contiguous(self) -> bool:
        """True while nothing was evicted (the keys are positions `0..seen-1`, in order)."""
        return self.positions.numel() == self.seen

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.seen = 0
        self.positions = torch.empty(0, dtype=torch.long)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.keys is not None and self.keys.numel():
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.keys is not None and self.keys.numel():
            self.keys, self.values = self.keys[indices], self.values[indices]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: each row takes its beam's cache. One mechanism with `batch_select_indices`, which a subclass
        with more per-row state extends, so that state cannot be left in the old order."""
        if self.is_initialized:
            self.batch_select_indices(beam_idx.to(self.device))

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values held."""
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} evicts tokens and cannot be cropped (assisted decoding)")


class SinkWindowLayer(RetainingLayer):
    """Keeps the first `sinks` real tokens of every row and the last `window` positions (StreamingLLM's cache).

    `pinned` (set by the attention handler from the padding) is how many leading positions hold sinks: `sinks` plus
    the longest left padding of the batch, so every row keeps its own first real tokens. Once full, it is a ring
    buffer: the window's slots are ordered by `position % window`, and a decode step writes its token over the one
    leaving the window, in place (no copy of the cache per step, where a `DynamicLayer` concatenates).
    """

    def __init__(self, sinks: int, window: int) -> None:
        super().__init__()
        self.sinks, self.window = sinks, window
        self.pinned = sinks
        self.ring_start: int | None = None  # first window slot once the layer is a ring buffer

    def keep(self, next_position: int) -> torch.Tensor | slice:
        if next_position < self.pinned + self.window:  # no position is both unpinned and out of the window yet
            return slice(None)
        return (self.positions < self.pinned) | (self.positions > next_position - self.window)

    def evict(self) -> None:
        """Drop what no later query can attend and lay the window out as a ring (called after each attention)."""
        if self.ring_start is not None or self.seen < self.pinned + self.window:
            return
        # `window` slots: the last window - 1 positions, and the one the next token overwrites (same slot)
        if self.contiguous:  # positions 0 .. seen - 1: the slots follow from counts (what torch.compile traces)
            window_positions = torch.arange(self.seen - self.window, self.seen, device=self.device)
            order = torch.argsort(window_positions % self.window)
            index = torch.cat([torch.arange(self.pinned, device=self.device), window_positions[order]])
            ring_start = self.pinned
        else:
            pinned = self.positions < self.pinned
            window = (self.positions >= self.seen - self.window) & ~pinned
            order = torch.argsort(self.positions[window] % self.window)
            index = torch.cat([pinned.nonzero().flatten(), window.nonzero().flatten()[order]])
            ring_start = int(pinned.sum())
        self.keys, self.values = self.keys[:, :, index], self.values[:, :, index]
        self.positions = self.positions[index]
        self.ring_start = ring_start

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.ring_start is not None and key_states.shape[-2] == 1:
            # a tensor index: torch.compile specialises on an int one, which would recompile every decode step
            position = torch.arange(self.seen, self.seen + 1, device=self.device)
            slot = position % self.window + self.ring_start
            self.keys.index_copy_(2, slot, key_states)
            self.values.index_copy_(2, slot, value_states)
            self.positions.index_copy_(0, slot, position)
            self.seen += 1
            return self.keys, self.values
        if self.ring_start is not None:  # several tokens at once: back to a sorted, growing layout
            order = torch.argsort(self.positions)
            self.keys, self.values = self.keys[:, :, order], self.values[:, :, order]
            self.positions = self.positions[order]
            self.ring_start = None
        return super().update(key_states, value_states, *args, **kwargs)

    def reset(self) -> None:
        super().reset()
        self.ring_start = None


class SinkScoreLayer(RetainingLayer):
    """`SinkWindowLayer`'s sinks and window plus, per batch row, up to `extra` secondary sinks kept past the window.

    Two regions: the shared one (every row's sinks, `pinned` as in `SinkWindowLayer`, and the last `window` positions,
    with their text `positions` `[N]` and each row's running sink score `scores` `[B, N]`), and the extras (`[B, KV,
    extra, D]`, positions `extra_positions` `[B, extra]`, -1 for an empty slot, final scores `extra_scores`).
    `update` returns the extras followed by the shared keys; `key_positions()`, `held()` and `key_scores()` describe
    them in that order, and the attention function hands back the updated scores and which keys are the row's extras
    from the next position on (`commit`), then the window is cut (`evict`). No ring buffer: a decode step
    concatenates, as a `DynamicLayer` does.
    """

    def __init__(self, sinks: int, window: int, extra: int) -> None:
        super().__init__()
        self.sinks, self.window, self.extra = sinks, window, extra
        self.pinned = sinks
        self.scores = torch.empty(0)
        self.extra_keys: torch.Tensor | None = None
        self.extra_values: torch.Tensor | None = None
        self.extra_positions = torch.empty(0, dtype=torch.long)
        self.extra_scores = torch.empty(0)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        batch, heads, _, dim = key_states.shape
        if self.extra_keys is None:
            self.extra_keys = key_states.new_zeros(batch, heads, self.extra, dim)
            self.extra_values = value_states.new_zeros(batch, heads, self.extra, value_states.shape[-1])
            self.extra_positions = torch.full((batch, self.extra), -1, dtype=torch.long, device=key_states.device)
            self.extra_scores = torch.zeros(batch, self.extra, device=key_states.device)
            self.scores = torch.zeros(batch, 0, device=key_states.device)
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        self.scores = torch.cat([self.scores, self.scores.new_zeros(batch, key_states.shape[-2])], dim=1)
        assert self.extra_values is not None
        return torch.cat([self.extra_keys, keys], dim=-2), torch.cat([self.extra_values, values], dim=-2)

    def keep(self, next_position: int) -> torch.Tensor:
        return (self.positions < self.pinned) | (self.positions > next_position - self.window)

    def _select(self, keep: torch.Tensor) -> None:
        super()._select(keep)
        self.scores = self.scores[:, keep]

    def key_positions(self) -> torch.Tensor:
        """Text positions of the keys `update` returned `[B, extra + N]` (-1: an empty extra slot)."""
        shared = self.positions[None].expand(self.extra_positions.shape[0], -1)
        return torch.cat([self.extra_positions, shared], dim=1)

    def held(self) -> torch.Tensor:
        """Which of those keys are the row's kept extras `[B, extra + N]` (bool)."""
        held = torch.zeros(self.extra_positions.shape[0], self.extra + self.positions.numel(), dtype=torch.bool)
        held[:, : self.extra] = self.extra_positions >= 0
        return held.to(self.extra_positions.device)

    def key_scores(self) -> torch.Tensor:
        return torch.cat([self.extra_scores, self.scores], dim=1)

    def commit(self, scores: torch.Tensor, keep_extra: torch.Tensor) -> None:
        """Take the attention step's scores `[B, extra + N]` and its extras for the next position `keep_extra`
        (bool, at most `extra` per row): they move (or stay) in the extras region."""
        assert self.extra_keys is not None and self.extra_values is not None
        positions = self.key_positions()
        # per row, the kept keys first (in position order), empty slots after
        order = torch.where(keep_extra, positions, positions.new_full((), 1 << 62)).argsort(dim=1)[:, : self.extra]
        filled = torch.gather(keep_extra, 1, order)
        keys = torch.cat([self.extra_keys, self.keys], dim=-2)
        values = torch.cat([self.extra_values, self.values], dim=-2)
        index = order[:, None, :, None]
        self.extra_keys = torch.gather(keys, 2, index.expand(-1, keys.shape[1], -1, keys.shape[-1]))
        self.extra_values = torch.gather(values, 2, index.expand(-1, values.shape[1], -1, values.shape[-1]))
        self.extra_positions = torch.where(filled, torch.gather(positions, 1, order), -1)
        self.extra_scores = torch.where(filled, torch.gather(scores, 1, order), 0.0)
        self.scores = scores[:, self.extra :]

    def reset(self) -> None:
        super().reset()
        self.scores = torch.empty(0)
        self.extra_keys = self.extra_values = None
        self.extra_positions = torch.empty(0, dtype=torch.long)
        self.extra_scores = torch.empty(0)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.extra_keys is not None and self.extra_values is not None:
            self.extra_keys = self.extra_keys.repeat_interleave(repeats, dim=0)
            self.extra_values = self.extra_values.repeat_interleave(repeats, dim=0)
            self.extra_positions = self.extra_positions.repeat_interleave(repeats, dim=0)
            self.extra_scores = self.extra_scores.repeat_interleave(repeats, dim=0)
            self.scores = self.scores.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.extra_keys is not None and self.extra_values is not None:
            self.extra_keys, self.extra_values = self.extra_keys[indices], self.extra_values[indices]
            self.extra_positions, self.extra_scores = self.extra_positions[indices], self.extra_scores[indices]
            self.scores = self.scores[indices]

    @property
    def nbytes(self) -> int:
        extra = 0 if self.extra_keys is None or self.extra_values is None else self.extra_keys.nbytes
        extra += 0 if self.extra_values is None else self.extra_values.nbytes
        return super().nbytes + extra


def use_kv_layer(attention: torch.nn.Module, make_layer: Callable[[], RetainingLayer]):
    """Put `make_layer()` in `attention`'s slot of every fresh dynamic cache it sees; returns the hook handle."""

    def swap(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        layers = getattr(cache, "layers", None)
        if layers is None:
            module.__dict__.pop(_LAYER_ATTR, None)
            return
        idx = module.layer_idx
        if len(layers) <= idx and getattr(cache, "layer_class_to_replicate", None) is not None:
            while len(layers) < idx:
                layers.append(cache.layer_class_to_replicate())
            layers.append(make_layer())
        elif type(layers[idx]) in (DynamicLayer, DynamicSlidingWindowLayer) and not layers[idx].is_initialized:
            layers[idx] = make_layer()
        module.__dict__[_LAYER_ATTR] = layers[idx]

    return attention.register_forward_pre_hook(swap, with_kwargs=True)


def current_kv_layer(module: torch.nn.Module) -> RetainingLayer | None:
    """The retaining cache layer of `module` in the forward in progress, if its cache has one."""
    layer = module.__dict__.pop(_LAYER_ATTR, None)
    return layer if isinstance(layer, RetainingLayer) else None


def kv_cache_bytes(cache) -> int:
    """Bytes of keys and values a transformers cache holds (retaining layers count only what they keep)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, RetainingLayer):
            total += layer.nbytes
        elif getattr(layer, "keys", None) is not None:
            total += layer.keys.nbytes + layer.values.nbytes
    return total
