"""MoBA: Mixture of Block Attention for Long-Context LLMs (arXiv:2502.13189), with the FlashMoBA additions of
Optimizing Mixture of Block Attention (arXiv:2511.11571).

Per query head, the keys are cut into blocks of `block_size` tokens (from each row's first real token); a query
gates every block by `q . mean(K_block)` (fp32, no scaling), always keeps its own block (token-level causal inside
it), never sees future blocks, and attends the union of its `top_k` blocks with a standard softmax (Sec. 2.2;
`hf_attn_zoo.kernels.moba`). With GQA a query head gates on its KV head's block means. When the longest row has
at most `top_k` blocks every block is selected, so the layer runs the model's own attention function (exactly full
causal attention, as the paper notes for `N <= block_size * top_k`). FlashMoBA: small blocks raise the router's
signal-to-noise ratio; `key_conv > 0` adds a short depthwise causal convolution over the sequence on the keys (per
KV head and channel) before routing and attention, a new `moba_key_conv` module per layer initialised as the
identity, so it starts exactly neutral. The KV cache keeps the raw keys; the convolution runs on the cache at every
call.

Decode: `decode="dense"` (default) is the paper's evaluation setting and the official code's: every call with a
cache (fewer queries than keys) uses full causal attention over the cache, so decoding differs from the MoBA prefill
pattern of the same tokens. `decode="sparse"` applies the same block selection to the decode queries, so incremental
decoding equals the full forward.

Not training-free: the paper continue-trains (MoBA in all but the last 3 layers). What it replaces: the attention
function of each patched layer (through the `zoo` dispatcher), plus the key convolution. A layer's sliding window
(Gemma-3) is kept: MoBA selects within it; so is its logit softcap (Gemma 2), on the attention scores (not the
gates). Neutral setting: one block as long as the model's position range.
Official code: https://github.com/MoonshotAI/MoBA, https://github.com/mit-han-lab/flash-moba
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
from transformers import PretrainedConfig

from ..families.spec import FamilySpec
from ..families.rope import channel_pairs
from ..kernels.kv_cache import RetainingLayer, use_kv_layer
from ..kernels.masks import longest_row
from ..kernels.moba import causal_key_conv, moba_attention
from ..kernels.pattern_handler import check_length, max_positions, unsupported_attention_reason
from ..kernels.register import install_handler, remove_handler
from ..kernels.sparse_attention import PaddingTracker
from ..options import POSITIONS, blocks_of, other
from ..registry import Capabilities, Patch, PatchConfig, PatchHandle, register_patch

__all__ = ["MoBAConfig", "MoBAKeyConv", "MoBAPatch"]


@dataclass
class MoBAConfig(PatchConfig):
    block_size: int = field(
        default=512,
        metadata={
            "help": "tokens per key block (paper scaling-law setting: 512; FlashMoBA: smaller blocks route better).",
            "ge": 1,
            "le": POSITIONS,
        },
    )
    top_k: int = field(
        default=3,
        metadata={
            "help": "blocks each query attends, its own block included (paper: 3).",
            "ge": 1,
            "le": blocks_of("block_size"),
        },
    )
    key_conv: int = field(
        default=0,
        metadata={
            "help": "FlashMoBA key convolution: kernel size of a depthwise causal "
            "convolution on the keys (e.g. 3 or 5), identity-initialised; 0 = "
            "off.",
            "ge": 0,
            "le": other("block_size"),
        },
    )
    decode: Literal["dense", "sparse"] = field(
        default="dense",
        metadata={
            "help": "calls with a KV cache: dense (full attention over the cache, as the "
            "paper evaluates) or sparse (the same block selection: decoding equals the full "
            "forward)."
        },
    )
    backend: Literal["auto", "masked", "gather", "flex"] = field(
        default="auto",
        metadata={
            "help": "auto (one masked SDPA for short inputs, gather-and-densify otherwise), "
            "or force one; flex (compiled FlexAttention) is inference-only on CPU."
        },
    )


class MoBAKeyConv(nn.Module):
    """FlashMoBA's short causal convolution on the keys: `k'_t = sum_i w_i k_{t-K+1+i}` per KV head and channel.

    The keys arrive rotated (RoPE), so the two channels RoPE rotates together share their weights (`channel_map`):
    a per-pair scale commutes with the rotation, and attention still depends only on relative positions. Initialised
    as the identity (weight 1 on the current position, 0 on the previous ones); `dtype`/`device` are those of the
    keys' projection when patched.
    """

    def __init__(
        self,
        kv_heads: int,
        channel_map: list[int],
        kernel_size: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        weight = torch.zeros(kv_heads, max(channel_map) + 1, kernel_size, dtype=dtype, device=device)
        weight[..., -1] = 1.0
        self.weight = nn.Parameter(weight)
        self.register_buffer("channel_map", torch.tensor(channel_map, device=device), persistent=False)

    def extra_repr(self) -> str:
        kv_heads, _, size = self.weight.shape
        return f"kv_heads={kv_heads}, head_dim={len(self.channel_map)}, kernel_size={size}"

    def forward(self, key: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        if key.shape[1] != self.weight.shape[0] or key.shape[-1] != len(self.channel_map):
            raise ValueError(
                f"moba key convolution expects keys with {self.weight.shape[0]} heads of size "
                f"{len(self.channel_map)}, got {tuple(key.shape)}"
            )
        return causal_key_conv(key, self.weight[:, self.channel_map], padding)


def _moba_handler(
    base, module, query, key, value, attention_mask, *, config: MoBAConfig, tracker: PaddingTracker, **kwargs
):
    """Attention handler of a MoBA layer (see `hf_attn_zoo.kernels.register`)."""
    batch, _, q_len, _ = query.shape
    total = key.shape[2]
    check_length(module, total)
    padding = tracker.padding(attention_mask, batch, total)
    # called, not read: under PEFT's modules_to_save the active copy runs
    conv = getattr(module, "moba_key_conv", None)
    if conv is not None:
        key = conv(key, padding)
    longest = longest_row(padding, total)  # under torch.compile the padded length
    if (q_len < total and config.decode == "dense") or -(-longest // config.block_size) <= config.top_k:
        return base(module, query, key, value, attention_mask, **kwargs)
    out = moba_attention(
        query,
        key,
        value,
        block_size=config.block_size,
        top_k=config.top_k,
        scaling=kwargs.get("scaling"),
        padding=padding,
        window=kwargs.get("sliding_window"),
        dropout=kwargs.get("dropout", 0.0) or 0.0,
        backend=config.backend,
        softcap=kwargs.get("softcap"),
    )
    return out, None


class _FullLayer(RetainingLayer):
    """A cache layer that keeps every position: a sliding-window layer's cache would drop the keys MoBA's block
    means and the decode path count from (the window is applied by the kernel instead)."""


def _is_sliding(model_config: PretrainedConfig, index: int) -> bool:
    text = getattr(model_config, "text_config", None) or model_config
    types = getattr(text, "layer_types", None)
    return types[index] == "sliding_attention" if types else bool(getattr(text, "sliding_window", None))


def _key_channels(family: FamilySpec, model_config: PretrainedConfig) -> tuple[int, list[int]]:
    """KV heads of the keys the attention function receives, and each key channel's conv weight column.

    RoPE (`rotate_half` layout, which DeepSeek-V3 also uses after de-interleaving) rotates channel `c` with `c + r/2`
    of the `r` rotated channels, the interleaved layout (`attention.rope: interleaved`) channels `2i` and `2i + 1`;
    unrotated channels (MLA's nope part, partial rotary) keep their own weights.
    """
    text = getattr(model_config, "text_config", None) or model_config
    if family.attention.kind == "mla":  # keys are [nope, rope]
        rotary = text.qk_rope_head_dim
        free = [rotary // 2 + c for c in range(text.qk_nope_head_dim)]
        return text.num_attention_heads, free + [c % (rotary // 2) for c in range(rotary)]
    _, pairs = channel_pairs(family, text)  # keys are [rotated, pass-through] (partial rotary)
    return family.head_layout(text).num_kv_heads, pairs


def _key_weight(attention: nn.Module, family: FamilySpec) -> torch.Tensor:
    """The weight the key convolution follows in dtype and device: k_proj's, or for MLA (no k_proj) the attention's
    first linear's."""
    if family.attention.k is not None:
        return getattr(attention, family.attention.k).weight
    return next(m.weight for m in attention.modules() if isinstance(m, nn.Linear))


@register_patch
class MoBAPatch(Patch):
    name = "moba"
    summary = "MoBA: per-query top-k key blocks gated by mean-pooled keys (+ FlashMoBA small blocks, key conv)."
    config_class = MoBAConfig
    capabilities = Capabilities(training_free=False, new_params=True, kv_cache=True, generate=True, static_cache=False)
    targets = ("attention_fn",)

    def check(self, family: FamilySpec, model_config: PretrainedConfig) -> str | None:
        return unsupported_attention_reason(family)

    def apply(self, model, config: MoBAConfig, family: FamilySpec, layers: list[int], handle: PatchHandle) -> None:
        kv_heads, channel_map = _key_channels(family, model.config)
        tracker = PaddingTracker()
        for hook in tracker.install(model):
            handle.on_revert(hook.remove)
        handler = functools.partial(_moba_handler, config=config, tracker=tracker)
        for index in layers:
            attention = family.attention_module(model, index)
            if config.key_conv:
                weight = _key_weight(attention, family)
                # built in place next to the key projection: its dtype, and no real memory on a meta-device model
                dtype = weight.dtype if weight.is_floating_point() else None  # quantised: the default dtype
                conv = MoBAKeyConv(kv_heads, channel_map, config.key_conv, dtype=dtype, device=weight.device)
                attention.moba_key_conv = conv
                handle.on_revert(lambda a=attention: delattr(a, "moba_key_conv"))
                handle.modules.append(conv)
            install_handler(model, attention, handler)
            handle.on_revert(lambda a=attention: remove_handler(model, a))
            if _is_sliding(model.config, index):
                hook = use_kv_layer(attention, _FullLayer)
                handle.on_revert(hook.remove)

    def neutral_config(self, family: FamilySpec, model_config: PretrainedConfig) -> MoBAConfig | None:
        limit = max_positions(model_config)
        if not limit:
            return None  # without a position range no top_k selects every block of every input
        block_size = min(MoBAConfig.block_size, limit)
        return MoBAConfig(block_size=block_size, top_k=-(-limit // block_size))
