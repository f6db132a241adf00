"""Which attention kernel each layer of a patched model runs, for a device and a sequence length (read-only).

This reads the patch records (`config.hf_attn_zoo`) and asks the kernels' own `auto` rules where they are functions
(`kernels.sparse_attention.choose_backend`, MoH's decode-skip rule on the layer's real router), with shape-only
stand-ins for the tensors; where a rule is an inline threshold it reads the kernel module's constant
(`MASKED_MAX_PAIRS`). Nothing runs and nothing is allocated.

`score_keys` is, per query head, the number of keys whose attention scores a *non-fused* training path keeps for
the backward (plain PyTorch softmax attention); fused kernels (SDPA flash / memory-efficient, FlexAttention) keep
none. The memory estimate adds 8 bytes per (query head, kept key) per token for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

__all__ = ["KernelChoice", "attention_kernels", "experts_kernel", "layer_ranges"]


def layer_ranges(layers) -> str:
    """`[0, 1, 2, 5]` -> `"0-2, 5"`."""
    parts, start = [], None
    items = sorted(layers)
    for i, value in enumerate(items):
        if start is None:
            start = value
        if i + 1 == len(items) or items[i + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ", ".join(parts)


@dataclass(frozen=True)
class KernelChoice:
    """The attention of a group of layers: what runs for training / prefill at `seq_len`, and when decoding."""

    layers: tuple[int, ...]
    method: str  # "none" for unpatched layers
    train_prefill: str
    decode: str
    score_keys: int = 0


def _stub(shape: tuple[int, ...], device: str) -> Any:
    """A shape-and-device-only stand-in for a tensor, for the kernels' shape-based `auto` rules."""
    return SimpleNamespace(shape=torch.Size(shape), device=torch.device(device))


def _base(config, device: str, window: int | None, heads_note: str = "") -> str:
    from ..kernels.register import _base_name

    name = (
        _base_name(config)
        if getattr(config, "_attn_implementation", None) == "zoo"
        else (getattr(config, "_attn_implementation", None) or "sdpa")
    )
    if name == "sdpa":
        kernel = "SDPA flash / memory-efficient kernel" if device == "cuda" else "SDPA (CPU flash kernel)"
    elif "flash" in name:
        kernel = f"{name} (FlashAttention)"
    else:
        kernel = name
    if window is not None:
        kernel += f", the layer's own {window}-token sliding window"
    return kernel + heads_note


_PATTERN_KERNELS = {
    "flex": "FlexAttention compiled to Triton, BlockMask skips empty 128x128 blocks",
    "blocks": "chunked SDPA over the gathered 128-key blocks",
    "masked": "one SDPA call with the pattern as a boolean mask",
}


def _layout(family, config) -> tuple[int, int, int, int]:
    """`(query heads, KV heads, q/k head dim, v head dim)` as the attention function sees them."""
    layout = family.head_layout(config)
    if family.attention.kind == "mla":  # keys and values expanded per head from the latent
        qk = config.qk_nope_head_dim + config.qk_rope_head_dim
        return layout.num_heads, layout.num_heads, qk, config.v_head_dim
    return layout.num_heads, layout.num_kv_heads, layout.head_dim, layout.head_dim


def _pattern(options: dict[str, Any], layout, seq_len: int, device: str) -> tuple[str, str]:
    from ..kernels.sparse_attention import choose_backend

    backend = options.get("backend", "auto")
    chosen = backend
    if backend == "auto":
        heads, kv_heads, qk_dim, v_dim = layout
        q = _stub((1, heads, seq_len, qk_dim), device)
        k = _stub((1, kv_heads, seq_len, qk_dim), device)
        chosen = choose_backend(q, k, _stub((1, kv_heads, seq_len, v_dim), device), False)
    text = f"{chosen}: {_PATTERN_KERNELS[chosen]}" + (" (auto)" if backend == "auto" else "")
    if chosen == "flex" and device != "cuda":
        text += "; no FlexAttention backward on CPU (inference only)"
    return text, chosen


def _moh(model, family, index: int, options: dict[str, Any], seq_len: int, device: str) -> tuple[str, str]:
    from ..patches.moh import _use_sparse_decode

    router = getattr(family.attention_module(model, index), "head_router", None)
    base = _base(model.config, device, None)
    train = f"{base} over all heads, then the per-head gates (unselected heads masked, not skipped)"
    sparse = False
    if router is not None:
        layout = family.head_layout(model.config)
        q = _stub((1, layout.num_heads, 1, layout.head_dim), device)
        k = _stub((1, layout.num_kv_heads, seq_len, layout.head_dim), device)
        with torch.no_grad():
            sparse = _use_sparse_decode(router, q, k, None, {})
    if sparse:
        decode = (
            f"head-sparse decode at {seq_len} tokens of context: only the selected KV groups are read "
            "(kernels/head_sparse), output projection on the active heads only"
        )
    elif options.get("decode_skip") == "never":
        decode = f"{base} + gates (decode_skip=never)"
    else:
        decode = (
            f"{base} + gates (no head skipping: it needs granularity=group or MHA, and context x unread KV "
            "share >= skip_min_unread_kv)"
        )
    return train, decode


def _layer_choice(
    model, family, index: int, record: dict[str, Any] | None, seq_len: int, device: str, training: bool
) -> KernelChoice:
    from ..kernels.pattern_handler import model_window

    config = model.config
    window = model_window(config, index)
    layout = _layout(family, config)
    if record is None:
        kernel = _base(config, device, window)
        return KernelChoice((index,), "none", kernel, kernel)
    method, options = record["method"], record["options"]
    if method == "moh":
        train, decode = _moh(model, family, index, options, seq_len, device)
        return KernelChoice((index,), method, train, decode)
    if method == "bam":
        n = options["num_experts"]
        kv = f"{n} x KV heads" if options.get("kv", "experts") == "experts" else "shared KV heads"
        kernel = _base(
            config, device, window, f" over {n} x query heads ({kv}), mixed by the {options['routing']} router"
        )
        return KernelChoice((index,), method, kernel, kernel)
    if method in ("sliding_window", "power_attention", "moa"):
        train, _ = _pattern(options, layout, seq_len, device)
        decode, _ = _pattern(options, layout, 1, device)
        if method == "sliding_window" and options.get("bounded_cache", True):
            decode += f" over the bounded cache ({options['sinks']} sinks + {options['window']} window, ring buffer)"
        elif method == "moa" and options.get("bounded_cache", True):
            decode = "per KV-head bucket: SDPA over that bucket's bounded sinks + window cache"
        return KernelChoice((index,), method, train, decode)
    if method == "moba":
        from ..kernels import moba

        backend = options.get("backend", "auto")
        chosen = (
            backend if backend != "auto" else ("masked" if seq_len * seq_len <= moba.MASKED_MAX_PAIRS else "gather")
        )
        names = {
            "masked": "one SDPA call with the token-level block mask",
            "gather": "FlashMoBA gather-and-densify: own block causal + selected blocks, merged by log-sum-exp",
            "flex": "FlexAttention with a block-level BlockMask (Triton on CUDA)",
        }
        train = f"{chosen}: {names[chosen]}" + (" (auto)" if backend == "auto" else "")
        keys = 0
        if training and chosen == "gather":
            train += "; plain PyTorch ops with gradients"
            keys = options["top_k"] * options["block_size"]
        decode = (
            "SDPA over the whole cache (decode=dense)"
            if options.get("decode", "dense") == "dense"
            else "MoBA block selection over the cache, masked SDPA (decode=sparse)"
        )
        return KernelChoice((index,), method, train, decode, keys)
    if method == "routing_attention":
        from ..kernels import routing_attention

        backend = options.get("backend", "auto")
        chosen = (
            backend
            if backend != "auto"
            else ("masked" if seq_len * seq_len <= routing_attention.MASKED_MAX_PAIRS else "sorted")
        )
        names = {
            "masked": "boolean-mask SDPA over query chunks",
            "sorted": "local part + per-cluster routing part on keys sorted by cluster, merged by log-sum-exp",
        }
        train = f"{chosen}: {names[chosen]}" + (" (auto)" if backend == "auto" else "")
        keys = 0
        if training and chosen == "sorted":
            train += "; explicit PyTorch ops with gradients"
            keys = options["window"] + options["sinks"] + seq_len // max(1, options["num_clusters"])
        return KernelChoice((index,), method, train, "masked SDPA over the full cache (+ the keys' cluster ids)", keys)
    if method in ("linearize", "nalaformer"):
        softmax = f"exact softmax over the last {options['window']} keys + " if options["window"] else ""
        train = (
            f"chunked {softmax}{options['feature_map']} linear attention (chunks of {options['chunk']}, PyTorch ops)"
        )
        decode = (
            "the layer's own window: softmax + linear over its kept keys"
            if window
            else f"fixed-size state + the last {max(options['window'] - 1, 0)} keys"
        )
        return KernelChoice((index,), method, train, decode)
    if method == "hyper_attention":
        exact = _base(config, device, window)
        if seq_len <= options["min_seq_len"]:
            return KernelChoice(
                (index,), method, f"exact ({seq_len} <= min_seq_len={options['min_seq_len']}): {exact}", exact
            )
        train = "sortLSH block-diagonal + sampled residual, causal recursion"
        keys = 0
        if training:
            train += " (PyTorch ops with gradients)"
            keys = options["block_size"] + options["sample_size"]
        elif device == "cpu":
            train += " (CPU flash kernel pieces)"
        return KernelChoice((index,), method, train, f"exact over the full cache: {exact}", keys)
    kernel = _base(config, device, window)  # patches that do not touch attention (mote ...)
    return KernelChoice((index,), "none", kernel, kernel)


def attention_kernels(
    model: torch.nn.Module, seq_len: int, device: str = "cuda", training: bool = True
) -> list[KernelChoice]:
    """The attention kernels of every decoder layer of a (patched, meta-device) model, grouped by equal choice."""
    from ..families.spec import resolve_family
    from ..patching import applied_patches
    from .figures import attention_records

    family = resolve_family(model.config)
    records = attention_records(applied_patches(model))
    groups: list[KernelChoice] = []
    for index in range(len(family.decoder_layers(model))):
        choice = _layer_choice(model, family, index, records.get(index), seq_len, device, training)
        last = groups[-1] if groups else None
        if last is not None and (last.method, last.train_prefill, last.decode, last.score_keys) == (
            choice.method,
            choice.train_prefill,
            choice.decode,
            choice.score_keys,
        ):
            groups[-1] = KernelChoice(
                last.layers + choice.layers, last.method, last.train_prefill, last.decode, last.score_keys
            )
        else:
            groups.append(choice)
    return groups


def experts_kernel(model: torch.nn.Module) -> str | None:
    """How the MoE experts of the model run (transformers' experts implementation), or None for a dense model."""
    from ..families.spec import resolve_family

    family = resolve_family(model.config)
    if not family.moe_layers(model):
        return None
    impl = getattr(model.config, "_experts_implementation", None) or "transformers' default"
    layers = layer_ranges(family.moe_layers(model))
    return f"MoE layers {layers}: fused 3-D experts ({family.mlp.experts}), experts implementation: {impl}"
