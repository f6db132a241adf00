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

Training-free; no parameters. Neutral setting: a window as long as the model's position range and no sinks.
Official code: https://github.com/mit-han-lab/streaming-llm, https://github.com/SHI-Labs/NATTEN
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PretrainedConfig

from ..errors import InvalidOptionError
from ..families.spec import FamilySpec
from ..kernels.kv_cache import SinkWindowLayer
from ..kernels.pattern_handler import install_pattern, max_positions, unsupported_attention_reason
from ..kernels.sparse_attention import AttentionPattern
from ..kernels.streaming import StreamingPositions, streaming_rotary
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
    capabilities = Capabilities(training_free=True, new_params=False, kv_cache=True, generate=True)
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
        if config.stream and limit and config.sinks + config.window > limit:
            raise InvalidOptionError(
                f"sliding_window: stream=True needs sinks + window <= max_position_embeddings "
                f"({limit}), the positions the cache is re-indexed into."
            )
        return config

    def pattern(self, config: SlidingWindowConfig) -> SinkWindowPattern:
        return SinkWindowPattern(config.window, config.sinks, config.dilation)

    def apply(
        self, model, config: SlidingWindowConfig, family: FamilySpec, layers: list[int], handle: PatchHandle
    ) -> None:
        pattern = self.pattern(config)
        span = config.window * config.dilation
        kv_layer = (lambda index: SinkWindowLayer(config.sinks, span)) if config.bounded_cache else None
        streaming = None
        if config.stream:
            head_dim = (
                getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
            )
            streaming = StreamingPositions(streaming_rotary(model, head_dim), config.sinks, config.window)
        install_pattern(model, family, layers, handle, lambda index: pattern, config.backend, kv_layer, streaming)

    def neutral_config(self, family: FamilySpec, model_config: PretrainedConfig) -> SlidingWindowConfig:
        return SlidingWindowConfig(window=max_positions(model_config), sinks=0)
