"""Installing a static sparse pattern on attention layers: the shared part of every pattern-based patch.

`install_pattern` routes each selected layer's attention function through `sparse_attention` (with the `zoo`
dispatcher, so projections, RoPE and the KV cache stay the family's own), tracks the padding of each model call, and
optionally gives the layer a KV cache that keeps only what the pattern can still attend.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

import torch

from ..errors import InvalidOptionError
from .kv_cache import RetainingLayer, SinkWindowLayer, current_kv_layer, use_kv_layer
from .masks import left_padding
from .register import install_handler, remove_handler
from .sparse_attention import AttentionPattern, Backend, PaddingTracker, sparse_attention
from .streaming import StreamingPositions

__all__ = [
    "WithinModelWindow",
    "attend_pattern",
    "check_length",
    "install_pattern",
    "max_positions",
    "model_window",
    "pattern_attention_handler",
    "unsupported_attention_reason",
]


class Reverts(Protocol):
    """What `install_pattern` needs of a patch's undo handle: a place to register each revert step."""

    def on_revert(self, fn: Callable[[], None]) -> None: ...


def max_positions(model_config) -> int:
    """The longest sequence the model's position embedding is configured for."""
    text = getattr(model_config, "text_config", None) or model_config
    return int(getattr(text, "max_position_embeddings", 0) or 0)


def model_window(model_config, layer: int) -> int | None:
    """The model's own sliding window on `layer` (Mistral, Gemma 3's local layers ...), or None for global layers."""
    text = getattr(model_config, "text_config", None) or model_config
    window = getattr(text, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None and layer_types[layer] != "sliding_attention":
        return None
    return int(window)


class WithinModelWindow(AttentionPattern):
    """A method's pattern intersected with the layer's own sliding window: a local layer stays local."""

    def __init__(self, pattern: AttentionPattern, window: int):
        self.pattern, self.window = pattern, window
        self.per_head = pattern.per_head
        self._window = torch.tensor(window)

    def allowed(self, q, k, head):
        return self.pattern.allowed(q, k, head) & (q - k < self._window)

    def cache_key(self):
        return ("within_model_window", self.window, self.pattern.cache_key())


def unsupported_attention_reason(family) -> str | None:
    """Why a pattern patch cannot run on `family`'s attention function, or None."""
    if family.attention.sinks:
        return (
            f"its attention sinks (`{family.attention.sinks}`) live in its own attention function, which a "
            "sparse pattern replaces"
        )
    return None


def check_length(module: torch.nn.Module, total: int) -> None:
    """Refuse a sequence longer than the model's position range (sparse patterns do not extend it)."""
    limit = max_positions(module.config)
    if limit and total > limit:
        raise InvalidOptionError(
            f"a sequence of {total} positions is longer than this model supports (max_position_embeddings={limit}); "
            "shorten the input (sparse patterns do not extend the position range)."
        )


def pattern_attention_handler(
    base,
    module,
    query,
    key,
    value,
    attention_mask,
    *,
    pattern: AttentionPattern,
    tracker: PaddingTracker,
    backend: Backend,
    streaming: StreamingPositions | None = None,
    **kwargs,
):
    """Attention handler of a pattern layer (see `hf_attn_zoo.kernels.register`)."""
    layer = current_kv_layer(module)
    return attend_pattern(
        module, query, key, value, attention_mask, layer, pattern, tracker, backend, streaming=streaming, **kwargs
    ), None


def attend_pattern(
    module,
    query,
    key,
    value,
    attention_mask,
    layer: RetainingLayer | None,
    pattern: AttentionPattern,
    tracker: PaddingTracker,
    backend: Backend,
    streaming: StreamingPositions | None = None,
    **kwargs,
) -> torch.Tensor:
    """`pattern` over the keys the layer's cache returned (`layer`: its retaining cache layer, if any); with
    `streaming`, calls past the prefill use StreamingLLM's cache positions and may pass the model's position range."""
    total = layer.seen if layer is not None else key.shape[2]
    streaming = streaming if layer is not None and total > query.shape[2] else None
    if streaming is None:
        check_length(module, total)
    padding = tracker.padding(attention_mask, query.shape[0], total)
    if isinstance(layer, SinkWindowLayer) and layer.ring_start is None and layer.seen >= layer.sinks + layer.window:
        # read (a host sync) only while it decides something: before that nothing is evicted, and a ring keeps its pins
        pad = 0 if padding is None else int(left_padding(padding, query.shape[0], query.device).max())
        layer.pinned = layer.sinks + pad
    positions = queries = None
    if layer is not None and (streaming is not None or not layer.contiguous):
        positions = layer.positions
        queries = torch.arange(total - query.shape[2], total, device=query.device)
    if streaming is not None:
        span = pattern.window if isinstance(pattern, WithinModelWindow) else None
        out = streaming.attend(
            query, key, value, positions, queries, padding, kwargs.get("scaling"), kwargs.get("softcap"), span
        )
    else:
        out = sparse_attention(
            query,
            key,
            value,
            pattern,
            scaling=kwargs.get("scaling"),
            padding=padding,
            key_positions=positions,
            query_positions=queries,
            dropout=kwargs.get("dropout", 0.0) or 0.0,
            backend=backend,
            softcap=kwargs.get("softcap"),
        )
    if layer is not None:
        layer.evict()  # bounded from the prefill on, not only from the next step
    return out


def install_pattern(
    model: torch.nn.Module,
    family,
    layers: list[int],
    handle: Reverts,
    pattern_for: Callable[[int], AttentionPattern],
    backend: Backend = "auto",
    kv_layer: Callable[[int], RetainingLayer] | None = None,
    streaming: StreamingPositions | None = None,
) -> None:
    """Run the attention of `layers` with `pattern_for(layer)`; with `kv_layer`, cache through `kv_layer(layer)`.

    On a layer with its own sliding window (Mistral, Gemma 3's local layers) the pattern is intersected with it, and
    without `kv_layer` the layer caches its window with positions (`SinkWindowLayer(0, window)`).
    """
    tracker = PaddingTracker()
    for hook in tracker.install(model):
        handle.on_revert(hook.remove)
    for index in layers:
        attention = family.attention_module(model, index)
        pattern = pattern_for(index)
        window = model_window(model.config, index)
        if window is not None:
            pattern = WithinModelWindow(pattern, window)
        handler = functools.partial(
            pattern_attention_handler, pattern=pattern, tracker=tracker, backend=backend, streaming=streaming
        )
        install_handler(model, attention, handler)
        handle.on_revert(lambda a=attention: remove_handler(model, a))
        make_layer = functools.partial(kv_layer, index) if kv_layer is not None else None
        if make_layer is None and window is not None:
            # replaces transformers' sliding-window cache layer, whose keys carry no positions
            make_layer = functools.partial(SinkWindowLayer, 0, window)
        if make_layer is not None:
            hook = use_kv_layer(attention, make_layer)
            handle.on_revert(hook.remove)
