"""KV-cache layers that keep only what a sparse pattern can still attend, and how patches put them in a cache.

transformers v5 removed `SinkCache`; its caches are lists of per-layer objects (`cache.layers[i]`). A patch that
bounds what a layer attends installs `use_kv_layer`: a forward pre-hook on the attention module that, when the
layer's slot of the cache is still a fresh `DynamicLayer`, puts the method's own layer there. This works for
`generate`, for a `DynamicCache` the user passes, and for the cache a forward with `use_cache=True` creates, and
leaves static caches alone. The attention handler finds the layer with `current_kv_layer(module)`.

`SinkWindowLayer` keeps each row's first `sinks` real tokens and the last `window` positions, with their original
positions: keys stay rotated as they were computed, so decoding reproduces the masked full forward exactly, within
the model's position range (StreamingLLM's re-rotation to extend beyond it is not done).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

__all__ = ["RetainingLayer", "SinkWindowLayer", "current_kv_layer", "kv_cache_bytes", "use_kv_layer"]

_LAYER_ATTR = "_zoo_kv_layer"


class RetainingLayer(DynamicLayer):
    """A dynamic cache layer that evicts the positions no future query can attend (after each attention step).

    It reports every position seen (`get_seq_length`, `get_mask_sizes`), so transformers builds the masks and cache
    positions of an uncompressed cache; `positions` are the absolute positions of the keys `update` returned.
    """

    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0
        self.positions = torch.empty(0, dtype=torch.long)

    def keep(self, next_position: int) -> torch.Tensor:
        """Which stored positions a query at `next_position` or later may still attend `[S]` (bool)."""
        raise NotImplementedError

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
        if self.positions.numel():
            keep = self.keep(self.seen)
            if not bool(keep.all()):
                self._select(keep)

    def _select(self, keep: torch.Tensor) -> None:
        """Keep the stored positions `keep` `[S]` (bool) marks; a subclass with more per-position data extends it."""
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

    def keep(self, next_position: int) -> torch.Tensor:
        return (self.positions < self.pinned) | (self.positions > next_position - self.window)

    def evict(self) -> None:
        """Drop what no later query can attend and lay the window out as a ring (called after each attention)."""
        if self.ring_start is not None or self.seen < self.pinned + self.window:
            return
        pinned = self.positions < self.pinned
        # `window` slots: the last window - 1 positions, and the one the next token overwrites (same slot)
        window = (self.positions >= self.seen - self.window) & ~pinned
        window_positions = self.positions[window]
        order = torch.argsort(window_positions % self.window)
        index = torch.cat([pinned.nonzero().flatten(), window.nonzero().flatten()[order]])
        self.keys, self.values = self.keys[:, :, index], self.values[:, :, index]
        self.positions = self.positions[index]
        self.ring_start = int(pinned.sum())

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.ring_start is not None and key_states.shape[-2] == 1:
            slot = self.ring_start + self.seen % self.window
            self.keys[:, :, slot] = key_states[:, :, 0]
            self.values[:, :, slot] = value_states[:, :, 0]
            self.positions[slot] = self.seen
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
