"""Counts read off a meta-device model: parameters, activation elements per token and layer, KV-cache bytes.

Activations (per token and decoder layer, in elements of the compute dtype; see `memory.py` for the sources):

- attention: the outputs of every projection of the attention block except the output projection (q, k, v; for
  MLA the low-rank and expanded ones), plus twice the attention output (the kernel keeps it, and its contiguous copy
  is the output projection's input). Read off the patched modules, so BAM's stacked expert projections (N x the
  query heads, and N x the KV heads with `kv="experts"`) count as they run; plus BAM's N router gates.
- MLP: for each dense projection, its output if it widens (gate, up) and twice its input if it is the down
  projection (act(gate) and the product): 4 x intermediate for SwiGLU. MoE blocks: router logits in fp32 (2 elements
  each), and per routed expert (`top_k`) the token's copy, 4 x the expert intermediate size and the expert's output
  before its routing weight; shared experts as dense MLPs.
- two RMSNorms: each keeps its input upcast to fp32 (2 x hidden in 16-bit elements) and its output, 6 x hidden.

Checked against the tensors autograd saves for one decoder layer (bf16, CPU SDPA, `saved_tensors_hooks`): the
estimate is 3-8% below the measurement for Llama, MoH, BAM and Mixtral layers (RoPE copies, router stats).

KV cache (bytes per cached position and layer): K and V of every KV head (`2 x kv_heads x head_dim`), or the
compressed latent of multi-head latent attention when transformers caches it (DeepSeek-V3 in transformers >= 5.2x:
`kv_lora_rank + qk_rope_head_dim`; the `mla` patch: its rank + shared RoPE key). How many positions a layer keeps at
`seq_len`: all of them, or the model's own sliding window; a `sliding_window` patch keeps `sinks + window x
dilation`, MoA keeps per KV head its sinks + window, BAM with `kv="experts"` caches N x the KV heads (its k/v
projections' width), routing attention adds each key's
cluster id (int64 per KV head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..families.spec import FamilySpec
from ..kernels.pattern_handler import model_window
from ..patches.mla import LatentKV

__all__ = [
    "KVFigures",
    "active_params",
    "attention_records",
    "kv_cache",
    "layer_activations",
    "lora_params",
    "param_count",
]


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def attention_records(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The patch record that changes each layer's attention (at most one: those patches are exclusive)."""
    from ..registry import get_patch

    out = {}
    for record in records:
        if not set(get_patch(record["method"]).targets) & {"attention", "attention_fn"}:
            continue  # MoTE and other router / expert patches
        for index in record["layers"]:
            out[index] = record
    return out


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def _attention_elements(family: FamilySpec, attention: nn.Module, record: dict[str, Any] | None) -> int:
    if family.attention.kind == "standard":
        names = family.attention
        # BAM's expert projections report the stacked width (N x out; o_proj N x in), so this counts its N x heads
        q, k, v = (getattr(attention, n).out_features for n in (names.q, names.k, names.v))
        out = getattr(attention, names.o).in_features
        router = record["options"]["num_experts"] if record is not None and record["method"] == "bam" else 0
        return q + k + v + 2 * out + router
    o = getattr(attention, "o_proj", None)
    linears = [m for m in _linears(attention) if m is not o]
    return sum(m.out_features for m in linears) + (2 * o.in_features if o is not None else 0)


def _dense_mlp_elements(module: nn.Module, hidden: int) -> int:
    total = 0
    for linear in _linears(module):
        total += 2 * linear.in_features if linear.out_features == hidden else linear.out_features
    return total


def _moe_parts(family: FamilySpec, mlp: nn.Module) -> tuple[nn.Module, nn.Module, list[nn.Module]]:
    router = getattr(mlp, family.mlp.router)
    experts = getattr(mlp, family.mlp.experts)
    others = [child for name, child in mlp.named_children() if child is not router and child is not experts]
    return router, experts, others


def _experts_shape(experts: nn.Module, hidden: int) -> tuple[int, int]:
    """`(num_experts, intermediate size per expert)` of fused 3-D experts."""
    down = getattr(experts, "down_proj", None)
    tensors = [p for p in experts.parameters() if p.dim() == 3]
    e = tensors[0].shape[0]
    if isinstance(down, torch.Tensor) and down.dim() == 3:
        return e, down.numel() // (e * hidden)
    return e, sum(p.numel() for p in tensors) // (3 * e * hidden)


def _top_k(router: nn.Module, config) -> int:
    return int(getattr(router, "top_k", None) or getattr(config, "num_experts_per_tok", 1))


def layer_activations(model: nn.Module, family: FamilySpec, records: list[dict[str, Any]]) -> tuple[int, ...]:
    """Elements kept for the backward per token, per decoder layer (see the module docstring)."""
    hidden = model.config.hidden_size
    by_layer = attention_records(records)
    moe = set(family.moe_layers(model))
    out = []
    for index, layer in enumerate(family.decoder_layers(model)):
        total = 6 * hidden + _attention_elements(family, getattr(layer, family.attention.module), by_layer.get(index))
        mlp = getattr(layer, family.mlp.module)
        if index in moe:
            router, experts, others = _moe_parts(family, mlp)
            e, inter = _experts_shape(experts, hidden)
            total += 2 * e + _top_k(router, model.config) * (2 * hidden + 4 * inter)
            total += sum(_dense_mlp_elements(child, hidden) for child in others)
        else:
            total += _dense_mlp_elements(mlp, hidden)
        out.append(total)
    return tuple(out)


def active_params(model: nn.Module, family: FamilySpec) -> int:
    """Parameters a token uses: all but the unselected share of the routed experts."""
    inactive = 0
    for index in family.moe_layers(model):
        router, experts, _ = _moe_parts(family, family.mlp_module(model, index))
        tensors = [p for p in experts.parameters() if p.dim() >= 2]
        if not tensors:
            continue
        e = tensors[0].shape[0]
        k = _top_k(router, model.config)
        inactive += sum(p.numel() for p in experts.parameters() if p.shape[0] == e) * (e - k) // e
    return param_count(model) - inactive


def lora_params(model: nn.Module, family: FamilySpec, rank: int) -> int:
    """LoRA adapters of rank `rank` on the attention projections of every decoder layer: r x (in + out) each.

    Standard attention: the family's q, k, v, o projections; multi-head latent attention: every linear of the block.
    """
    total = 0
    for layer in family.decoder_layers(model):
        attention = getattr(layer, family.attention.module)
        if family.attention.kind == "standard":
            names = family.attention
            targets = [getattr(attention, n) for n in (names.q, names.k, names.v, names.o)]
        else:
            targets = [m for m in attention.children() if isinstance(m, nn.Linear)]
        total += sum(rank * (m.in_features + m.out_features) for m in targets)
    return total


@dataclass
class KVFigures:
    """KV cache of one sequence: bytes each new token adds (before any bound), and bytes held at `seq_len`."""

    bytes_per_token: int  # all layers, unbounded (what the first tokens cost)
    bytes_at_seq_len: int  # all layers, one sequence of seq_len tokens (bounded caches capped)
    bounded_layers: int  # layers whose cache stops growing before seq_len


def _kv_bytes_per_position(family: FamilySpec, attention: nn.Module, config, dtype_bytes: int) -> int:
    latent = getattr(attention, "mla", None)
    if isinstance(latent, LatentKV):  # the mla patch caches its latent and the shared RoPE key
        return (latent.rank + latent.rope_width) * dtype_bytes
    if family.attention.kind == "standard":  # BAM's kv="experts" k/v projections report N x the KV heads
        names = family.attention
        return (getattr(attention, names.k).out_features + getattr(attention, names.v).out_features) * dtype_bytes
    if hasattr(type(attention), "expand_kv"):  # transformers caches the compressed latent
        return (config.kv_lora_rank + config.qk_rope_head_dim) * dtype_bytes
    heads = config.num_attention_heads
    return heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim) * dtype_bytes


def _linear_layer_bytes(
    family: FamilySpec, config, options: dict[str, Any], position: int, window: int | None, seq_len: int
) -> int:
    """Bytes a linearized layer's cache keeps (`kernels/linear_cache.py`): the raw keys and values of its recent
    positions with two fp32 feature vectors each per KV head, plus, on a global layer, the fp32 state."""
    from ..kernels.feature_maps import FEATURE_MAPS

    layout = family.head_layout(config)
    features = FEATURE_MAPS[options["feature_map"]].blocks * (options.get("feature_dim") or layout.head_dim)
    recent = (window - 1) if window else max(options["window"] - 1, 0)
    recent = min(recent, seq_len)
    per_recent = position + layout.num_kv_heads * 2 * features * 4
    state = 0 if window else layout.num_kv_heads * features * (layout.head_dim + 1) * 4
    return recent * per_recent + state


def _moa_layer_bytes(record: dict[str, Any], config, index: int, position: int, latent: bool, kept: int) -> int:
    """Bytes MoA's cache keeps for layer `index`: per KV-head bucket its sinks + window; a latent (MLA) cache keeps
    the union of the layer's heads (the largest sinks and window), as `patches/moa.py` builds it."""
    from ..moa.cache import LayerRules
    from ..moa.plan import MoAPlan, plan_model_info, uniform_plan

    options = record["options"]
    if options.get("plan") is not None:
        plan = MoAPlan.from_dict(options["plan"], "the recorded plan")
    else:
        plan = uniform_plan(
            config, options["alpha"], options["beta"], options["granularity"], options["sinks"], options["length"]
        )
    num_kv_heads = plan_model_info(config)["num_kv_heads"]
    rules = LayerRules(
        plan.query_head_rules(index, options["length"], options["sinks"]), num_kv_heads, model_window(config, index)
    )
    if latent:
        return position * min(kept, max(b.sink for b in rules.buckets) + max(b.window for b in rules.buckets))
    per_kv_head = position // num_kv_heads
    return sum(len(b.kv_heads) * per_kv_head * min(kept, b.sink + b.window) for b in rules.buckets)


def kv_cache(
    model: nn.Module, family: FamilySpec, records: list[dict[str, Any]], seq_len: int, dtype_bytes: int
) -> KVFigures:
    """KV cache figures of `model` with its patch `records` for one sequence of `seq_len` tokens."""
    config = model.config
    by_layer = attention_records(records)
    per_token = at_len = bounded = 0
    for index, layer in enumerate(family.decoder_layers(model)):
        attention = getattr(layer, family.attention.module)
        position = _kv_bytes_per_position(family, attention, config, dtype_bytes)
        window = model_window(config, index)
        kept = min(seq_len, window) if window else seq_len
        record = by_layer.get(index)
        layer_bytes = None
        if record is not None:
            method, options = record["method"], record["options"]
            if method == "sliding_window" and options.get("bounded_cache", True):
                kept = min(kept, options["sinks"] + options["window"] * options["dilation"])
            elif method == "routing_attention":
                position += family.head_layout(config).num_kv_heads * 8  # int64 cluster id per KV head
            elif method == "moa" and options.get("bounded_cache", True):
                layer_bytes = _moa_layer_bytes(record, config, index, position, family.attention.kind == "mla", kept)
            elif method in ("linearize", "nalaformer"):
                layer_bytes = _linear_layer_bytes(family, config, options, position, window, seq_len)
        if layer_bytes is None:
            layer_bytes = position * kept
        per_token += position
        at_len += layer_bytes
        bounded += layer_bytes < position * seq_len
    return KVFigures(per_token, at_len, bounded)
