"""Sliding-window attention with attention sinks (StreamingLLM, arXiv:2309.17453) and causal 1-D neighbourhood
attention (NATTEN, arXiv:2204.07143).

Query `i` attends key `j <= i` when it is one of the row's first `sinks` tokens, or inside the window:
`i - j < window * dilation` and `(i - j) % dilation == 0`. With `sinks=0, dilation=1` this is causal 1-D
neighbourhood attention with kernel size `window`, which equals a causal sliding window of `window` tokens including
the query itself (NATTEN's causal mask); with `sinks=4` it is StreamingLLM's attention-sink pattern (4 initial tokens
plus a recent window). Dilation > 1 is NATTEN's dilated neighbourhood.

Decode: the layer's KV cache keeps only the sinks and the last `window * dilation` positions
(`hf_attn_zoo.kernels.kv_cache.SinkWindowLayer`, the `SinkCache` transformers v5 removed), so memory stays bounded.
Keys keep their original positions, so decoding equals the masked full forward, and sequences must stay within the
model's `max_position_embeddings`. With `stream=True`, decoding past the prefill uses StreamingLLM's positions inside
the cache instead (Sec. 3.2; `hf_attn_zoo.kernels.streaming`): every query sees the sinks at their cache distance, so
generation can run past `max_position_embeddings` (the prompt itself must fit).

Secondary sinks (`extra_sinks > 0`; Wong et al., "Secondary Attention Sinks", arXiv:2512.22213): besides the first
`sinks` tokens, each layer keeps, per sequence, the `extra_sinks` middle tokens with the highest sink score among those
that left the window, score = the token's mean logit over the query heads, summed over the `window` queries that saw it
in the window (detected online from queries and keys only, so the prefill and any split into decode calls agree;
`hf_attn_zoo.kernels.streaming.sink_cache_attention`). Query `i` attends key `j <= i` when `j < sinks`,
`i - j < window` or `j` is a kept extra at `i`; the prefill runs this data-dependent pattern (one masked attention per
256 queries over all keys: quadratic, not the gathered blocks), the cache (`SinkScoreLayer`) keeps exactly what it
needs. With `stream=True` a key outside the window is seen at its distance inside the cache (the cache re-indexed as
StreamingLLM does: sinks, extras, window in text order), so a kept middle token sits just beyond the window, in text
order, and no distance exceeds `sinks + extra_sinks + window`. As with `extra_sinks=0`, the first call (the prefill)
runs at text positions and the calls after it at cache positions; any split of the calls after a prefill of at most
`sinks + window` tokens gives StreamingLLM's token-by-token results.

Training-free; no parameters. Neutral setting: a window as long as the model's position range and no sinks.
Official code: https://github.com/mit-han-lab/streaming-llm, https://github.com/SHI-Labs/NATTEN
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PretrainedConfig

from ..errors import InvalidOptionError
from ..families.spec import FamilySpec
from ..kernels.kv_cache import SinkScoreLayer, SinkWindowLayer, current_kv_layer, use_kv_layer
from ..kernels.masks import left_padding
from ..kernels.pattern_handler import (
    check_length,
    install_pattern,
    max_positions,
    model_window,
    unsupported_attention_reason,
)
from ..kernels.register import install_handler, remove_handler
from ..kernels.sparse_attention import AttentionPattern, PaddingTracker
from ..kernels.streaming import StreamingPositions, sink_cache_attention, streaming_rotary
from ..options import POSITIONS
from ..registry import Capabilities, Patch, PatchConfig, PatchHandle, register_patch

__all__ = ["SinkWindowPattern", "SlidingWindowConfig", "SlidingWindowPatch"]


@dataclass
class SlidingWindowConfig(PatchConfig):
    window: int = field(
        default=1024,
        metadata={
            "help": "keys per query in the window, the query included (NATTEN kernel size).",
            "ge": 1,
            "le": POSITIONS,
        },
    )
    sinks: int = field(
        default=4,
        metadata={
            "help": "initial tokens every query attends (StreamingLLM: 4; 0 = plain "
            "sliding window / causal neighbourhood attention).",
            "ge": 0,
            "le": POSITIONS,
        },
    )
    dilation: int = field(
        default=1, metadata={"help": "NATTEN dilation: the window takes every dilation-th key.", "ge": 1}
    )
    bounded_cache: bool = field(
        default=True,
        metadata={"help": "decode with a KV cache that keeps only the sinks and the window (bounded memory)."},
    )
    backend: Literal["auto", "flex", "blocks", "masked"] = field(
        default="auto",
        metadata={
            "help": "auto (one masked SDPA for short inputs; else gathered-block SDPA on CPU, "
            "compiled flex on a GPU), or force one."
        },
    )
    stream: bool = field(
        default=False,
        metadata={
            "help": "StreamingLLM positions when decoding: past the prefill a "
            "query sees the sinks at their distance inside the cache (as v4's "
            "SinkCache), so generation can run past max_position_embeddings; "
            "needs bounded_cache and dilation 1."
        },
    )
    extra_sinks: int = field(
        default=0,
        metadata={
            "help": "secondary sinks kept besides the first `sinks` tokens: per layer and "
            "sequence, the middle tokens with the highest sink score (mean logit they "
            "received in the window) once they leave it (0 = StreamingLLM).",
            "ge": 0,
            "le": POSITIONS,
        },
    )


class SinkWindowPattern(AttentionPattern):
    def __init__(self, window: int, sinks: int, dilation: int = 1):
        self.window, self.sinks, self.dilation = window, sinks, dilation
        # tensors, so compiled FlexAttention does not specialise (and recompile) on every window
        self._span, self._sinks, self._dilation = (torch.tensor(v) for v in (window * dilation, sinks, dilation))

    def allowed(self, q, k, head):
        distance = q - k
        in_window = distance < self._span
        if self.dilation > 1:  # a Python branch: flex specialises on it, which is one more kernel at most
            in_window = in_window & (distance % self._dilation == 0)
        return (distance >= 0) & (in_window | (k < self._sinks))

    def cache_key(self):
        return ("sink_window", self.window, self.sinks, self.dilation)


@register_patch
class SlidingWindowPatch(Patch):
    name = "sliding_window"
    summary = "Sliding window + attention sinks (StreamingLLM) / causal 1-D neighbourhood attention, bounded KV cache."
    config_class = SlidingWindowConfig
    capabilities = Capabilities(training_free=True, new_params=False, kv_cache=True, generate=True, static_cache=False)
    targets = ("attention_fn",)

    def check(self, family: FamilySpec, model_config: PretrainedConfig) -> str | None:
        return unsupported_attention_reason(family)

    def validate(
        self, config: SlidingWindowConfig, family: FamilySpec, model_config: PretrainedConfig
    ) -> SlidingWindowConfig:
        limit = max_positions(model_config)
        if limit and config.window * config.dilation > limit:
            raise InvalidOptionError(
                f"sliding_window: window x dilation = {config.window} x {config.dilation} must "
                f"be <= the model's max_position_embeddings ({limit})."
            )
        if config.stream and (not config.bounded_cache or config.dilation != 1):
            raise InvalidOptionError(
                "sliding_window: stream=True re-indexes the positions of the bounded sinks + "
                "window cache; it needs bounded_cache=True and dilation=1."
            )
        if config.stream and (family.attention.rope != "half" or family.attention.rope_layers != "all"):
            raise InvalidOptionError(
                f"sliding_window: stream=True re-rotates the cached keys with RoPE in the rotate_half layout on every "
                f"layer; {family.name} has {family.attention.rope} RoPE on {family.attention.rope_layers} layers. "
                "Use stream=False."
            )
        if config.stream and limit and config.sinks + config.extra_sinks + config.window > limit:
            raise InvalidOptionError(
                f"sliding_window: stream=True needs sinks + extra_sinks + window <= max_position_embeddings "
                f"({limit}), the positions the cache is re-indexed into."
            )
        if config.extra_sinks:
            self._validate_extra_sinks(config, model_config)
        return config

    def _validate_extra_sinks(self, config: SlidingWindowConfig, model_config: PretrainedConfig) -> None:
        if config.dilation != 1 or not config.bounded_cache or config.backend not in ("auto", "masked"):
            raise InvalidOptionError(
                "sliding_window: extra_sinks > 0 needs dilation=1, bounded_cache=True (the cache carries the sink "
                f"scores) and backend auto or masked; got dilation={config.dilation}, "
                f"bounded_cache={config.bounded_cache}, backend={config.backend!r}."
            )
        text = getattr(model_config, "text_config", None) or model_config
        layers = range(getattr(text, "num_hidden_layers", 0) or 0)
        if any(model_window(model_config, i) is not None for i in layers):
            raise InvalidOptionError(
                "sliding_window: extra_sinks > 0 keeps tokens past the window, which this model's own sliding-window "
                "layers cannot attend; use extra_sinks=0 on this model."
            )

    def pattern(self, config: SlidingWindowConfig) -> SinkWindowPattern:
        if config.extra_sinks:
            raise InvalidOptionError(
                "sliding_window: with extra_sinks > 0 the pattern depends on the data (the kept secondary sinks), so "
                "it has no static attention function; apply it with hf_attn_zoo.patch(model, ...)."
            )
        return SinkWindowPattern(config.window, config.sinks, config.dilation)

    def apply(
        self, model, config: SlidingWindowConfig, family: FamilySpec, layers: list[int], handle: PatchHandle
    ) -> None:
        if config.extra_sinks:
            self._apply_extra_sinks(model, config, family, layers, handle)
            return
        pattern = self.pattern(config)
        span = config.window * config.dilation
        kv_layer = (lambda index: SinkWindowLayer(config.sinks, span)) if config.bounded_cache else None
        streaming = None
        if config.stream:
            inv_freq = streaming_rotary(model, family.head_layout(model.config).head_dim)
            streaming = StreamingPositions(inv_freq, config.sinks, config.window)
        install_pattern(model, family, layers, handle, lambda index: pattern, config.backend, kv_layer, streaming)

    def _apply_extra_sinks(
        self, model, config: SlidingWindowConfig, family: FamilySpec, layers: list[int], handle: PatchHandle
    ) -> None:
        inv_freq = streaming_rotary(model, family.head_layout(model.config).head_dim) if config.stream else None
        tracker = PaddingTracker()
        for hook in tracker.install(model):
            handle.on_revert(hook.remove)
        handler = functools.partial(_extra_sinks_handler, config=config, tracker=tracker, inv_freq=inv_freq)
        for index in layers:
            attention = family.attention_module(model, index)
            install_handler(model, attention, handler)
            handle.on_revert(lambda a=attention: remove_handler(model, a))
            hook = use_kv_layer(attention, lambda: SinkScoreLayer(config.sinks, config.window, config.extra_sinks))
            handle.on_revert(hook.remove)

    def neutral_config(self, family: FamilySpec, model_config: PretrainedConfig) -> SlidingWindowConfig:
        return SlidingWindowConfig(window=max_positions(model_config), sinks=0)


def _extra_sinks_handler(
    base,
    module,
    query,
    key,
    value,
    attention_mask,
    *,
    config: SlidingWindowConfig,
    tracker: PaddingTracker,
    inv_freq: torch.Tensor | None,
    **kwargs,
):
    """Attention of a layer with secondary sinks (`extra_sinks > 0`), through its `SinkScoreLayer` when it caches."""
    layer = current_kv_layer(module)
    batch, q_len = query.shape[0], query.shape[2]
    total = layer.seen if layer is not None else key.shape[2]
    past = layer is not None and total > q_len
    if not (past and inv_freq is not None):
        check_length(module, total)
    padding = tracker.padding(attention_mask, batch, total)
    if isinstance(layer, SinkScoreLayer):
        layer.pinned = config.sinks + int(left_padding(padding, batch, query.device).max())
        positions, held, scores = layer.key_positions(), layer.held(), layer.key_scores()
    else:
        positions = torch.arange(key.shape[2], device=query.device)[None].expand(batch, -1)
        held = torch.zeros(batch, key.shape[2], dtype=torch.bool, device=query.device)
        scores = torch.zeros(batch, key.shape[2], device=query.device)
    out, scores, keep = sink_cache_attention(
        query,
        key,
        value,
        positions,
        torch.arange(total - q_len, total, device=query.device),
        held,
        scores,
        padding,
        config.sinks,
        config.extra_sinks,
        config.window,
        kwargs.get("scaling") or query.shape[-1] ** -0.5,
        inv_freq if past else None,
        kwargs.get("softcap"),
    )
    if isinstance(layer, SinkScoreLayer):
        layer.commit(scores, keep)
        layer.evict()
    return out, None
