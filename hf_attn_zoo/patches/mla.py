"""Multi-head latent attention (MLA, DeepSeek-V2 arXiv:2405.04434) retrofitted into a GQA / MHA model: partial RoPE
(MHA2MLA, arXiv:2502.14837; TransMLA's RoRoPE, arXiv:2502.07864) and one low-rank latent for the no-RoPE keys and the
values, in DeepSeek-V3's layout.

    q_h = M_h W_q x = [q_h^nope (n); q_h^rope (D)]      per query head (M_h: `query_map`, from the original W_q)
    [c; k^rope] = A x + a                               the latent (rank r) and one RoPE key shared by all heads
    [k_j^nope; v_j] = B_j c                             per KV head j
    score(h, t, s) = q_h^nope . k_j^nope + RoPE_t(q_h^rope) . RoPE_s(k^rope)

The cache holds `c` and `k^rope`: `r + D` numbers per token and layer instead of `2 d KV`. Decode steps attend in the
latent without expanding the cache (`absorb`): `q_h^nope B^k_j` is a query against `c` itself and the output is
`B^v_j` times the attention-weighted latent.

Which RoPE components stay (`rope_selection`, `rope_pairs` x KV heads slots of the shared key, see
`patches/mla_layout.py`): each KV head's own pairs with the largest query x key norm (`norm`, MHA2MLA's 2-norm) or by
frequency (`high`, `low`, `uniform`); or principal components of the KV heads' pairs per frequency (`rorope`, TransMLA:
a unitary mix of the heads' pairs commutes with RoPE and concentrates the positional information). What the kept
components leave of the keys loses RoPE and goes into the latent with the values: `A`, `B` are the principal
directions of the stacked rows, keys and values balanced to equal power first (TransMLA). At patch time from the
weights alone; `calibrate(model, batches)` (recipe init step `mla_calibrate`) redoes both on real text.
`hf_attn_zoo.mla_export.export_deepseek_v3` writes the result as a stock DeepSeek-V3 checkpoint.

The original k/v projections stay in the module, unused, so that `unpatch` is exact; the query projection is still
the model's (LoRA on it keeps working). Not training-free. Neutral setting: every pair and the full rank (`A` the
stacked projections, `B` the identity): the model exactly.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
from tqdm.auto import tqdm
from transformers import PretrainedConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..errors import InvalidOptionError
from ..families.rope import channel_pairs, rotary_function
from ..families.spec import FamilySpec
from ..registry import Capabilities, Patch, PatchConfig, PatchHandle, register_patch
from .mla_layout import (
    attention_metric,
    choose_components,
    factorise,
    nope_width,
    pair_statistics,
    plan_layout,
)

__all__ = ["LatentKV", "MLAConfig", "MLAPatch", "calibrate", "latent_layers"]


@dataclass
class MLAConfig(PatchConfig):
    rank: int | None = field(
        default=None,
        metadata={
            "help": "latent rank r (default: full, KV heads x (no-RoPE key + value channels), which is exact).",
            "ge": 1,
        },
    )
    rope_pairs: int | None = field(
        default=None,
        metadata={
            "help": "RoPE frequency pairs each KV head keeps (default: all); the other channels lose RoPE and go "
            "into the latent.",
            "ge": 0,
        },
    )
    rope_selection: Literal["norm", "high", "low", "uniform", "rorope"] = field(
        default="norm",
        metadata={
            "help": "which RoPE components stay: each KV head its pairs with the largest query x key norm (norm, "
            "MHA2MLA's 2-norm), or by frequency (high / low / uniform); rorope: the principal components of the KV "
            "heads' pairs per frequency (TransMLA's RoRoPE), the same budget of rope_pairs x KV heads."
        },
    )
    rope_scope: Literal["layer", "model"] = field(
        default="layer",
        metadata={
            "help": "layer: each layer keeps its own best RoPE components (as the papers); model: every layer keeps "
            "the same frequencies, chosen by the scores summed over the layers (what a DeepSeek-V3 export needs)."
        },
    )
    latent_fit: Literal["kv", "balanced", "attention"] = field(
        default="balanced",
        metadata={
            "help": "what the low-rank latent keeps best: kv (the keys and values as they are), balanced (keys and "
            "values scaled to equal power, TransMLA), attention (key errors weighted by the queries, value errors "
            "by the output projection)."
        },
    )
    absorb: Literal["auto", "always", "never"] = field(
        default="auto",
        metadata={
            "help": "attend in the latent without expanding the cache (weight absorption): auto (inference calls "
            "where it costs less: decoding), always (inference), never."
        },
    )


class LatentKV(nn.Module):
    """One layer's latent attention in DeepSeek-V3's layout: `query_map` `[H, n + D, d]` turns each query head into
    `[no-RoPE part (n); RoPE slots (D)]` (a buffer: a selection, or a mix of pairs under `rorope`); `kv_down`
    `hidden -> r + D` (the latent, then the shared RoPE key); `kv_up` `r -> KV (n + d)` (per KV head its no-RoPE keys,
    then its values); `slot_pairs` `[D / 2, 2]` the head channels (first, second) of the RoPE pair whose frequency
    turns each slot."""

    query_map: torch.Tensor
    slot_pairs: torch.Tensor

    def __init__(
        self,
        hidden: int,
        rank: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        nope_width: int,
        rope_width: int,
        bias: bool,
        *,
        device: torch.device | str | None,
        dtype: torch.dtype,
    ):
        super().__init__()
        self.rank, self.kv_heads, self.head_dim = rank, kv_heads, head_dim
        self.nope_width, self.rope_width = nope_width, rope_width
        self.kv_down = nn.Linear(hidden, rank + rope_width, bias=bias, device=device, dtype=dtype)
        self.kv_up = nn.Linear(rank, kv_heads * (nope_width + head_dim), bias=False, device=device, dtype=dtype)
        self.register_buffer(
            "query_map", torch.zeros(heads, nope_width + rope_width, head_dim, device=device, dtype=dtype)
        )
        self.register_buffer("slot_pairs", torch.zeros(rope_width // 2, 2, dtype=torch.long, device=device))
        self.selection, self.scope, self.fit = "norm", "layer", "balanced"  # how `calibrate` refits it (the options)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, nope={self.nope_width}, rope={self.rope_width}, head_dim={self.head_dim}"


@dataclass(frozen=True)
class _Layer:
    """What the forward of one patched layer needs besides its modules."""

    q: str
    o: str
    heads: int
    kv_heads: int
    head_dim: int
    rope: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None
    eager: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    absorb: str
    extra: dict[str, Any]  # the attention function's arguments the family's own forward passes (window, softcap)


def _slot_angles(
    rope: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    pairs: torch.Tensor,
    head_dim: int,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin `[B, 1, L, D/2]` of each slot's pair at each position, read off the family's own RoPE turning a unit
    vector on the pair's first channel (whatever its channel layout, partial rotary or scaling)."""
    cos, sin = position_embeddings
    probe = torch.nn.functional.one_hot(pairs[:, 0], head_dim).to(dtype)[None, :, None]
    probe = probe.expand(cos.shape[0], -1, cos.shape[1], -1)  # [B, S, L, d]
    turned, _ = rope(probe, probe[:, :1], cos, sin)
    first = turned.gather(-1, pairs[None, :, None, :1].expand(turned.shape[0], -1, turned.shape[2], -1))
    second = turned.gather(-1, pairs[None, :, None, 1:].expand(turned.shape[0], -1, turned.shape[2], -1))
    return first.squeeze(-1).transpose(1, 2)[:, None], second.squeeze(-1).transpose(1, 2)[:, None]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the slots of `x` `[B, n, L, D]` (slot `s`: channels `s` and `s + D/2`); `cos`, `sin` `[B, 1, L, D/2]`."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def _mla_forward(
    self: Any,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    cache: Any = None,
    past_key_values: Any = None,
    *,
    layer: _Layer,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention forward of a patched layer (bound to the family's attention module; see the module doc)."""
    cache = cache if cache is not None else past_key_values
    latent_kv: LatentKV = self.mla
    batch, length = hidden_states.shape[:-1]
    heads, kv_heads, d = layer.heads, layer.kv_heads, layer.head_dim
    nope, width = latent_kv.nope_width, latent_kv.rope_width
    query = getattr(self, layer.q)(hidden_states).view(batch, length, heads, d).transpose(1, 2)
    query = torch.einsum("bhld,hed->bhle", query, latent_kv.query_map)  # [B, H, L, n + D]
    latent, rope_key = latent_kv.kv_down(hidden_states).split([latent_kv.rank, width], dim=-1)
    rope_key = rope_key[:, None]  # [B, 1, L, D]: one key shared by every head
    if layer.rope is not None and width:
        cos, sin = _slot_angles(layer.rope, latent_kv.slot_pairs, d, position_embeddings, query.dtype)  # type: ignore[arg-type]
        query = torch.cat([query[..., :nope], _rotate(query[..., nope:], cos, sin)], dim=-1)
        rope_key = _rotate(rope_key, cos, sin)
    latent = latent[:, None]  # [B, 1, L, r]: one "head" for every cache layer type
    if cache is not None:
        latent, rope_key = cache.update(latent, rope_key, self.layer_idx, kwargs=kwargs)
    total = latent.shape[2]
    if _absorbs(layer, latent_kv, attention_mask, length, total, self.training):
        out = _absorbed(self, latent_kv, layer, query, latent, rope_key, attention_mask)
        return getattr(self, layer.o)(out.transpose(1, 2).reshape(batch, length, -1)), None
    expanded = latent_kv.kv_up(latent[:, 0]).view(batch, total, kv_heads, -1).transpose(1, 2)
    nope_key, value = expanded.split([nope, d], dim=-1)
    key = torch.cat([nope_key, rope_key.expand(-1, kv_heads, -1, -1)], dim=-1)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, layer.eager)
    out, weights = interface(
        self,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0 if not self.training else getattr(self, "attention_dropout", 0.0),
        scaling=self.scaling,
        **layer.extra,
        **kwargs,
    )
    return getattr(self, layer.o)(out.reshape(batch, length, -1).contiguous()), weights


def _absorbs(layer: _Layer, latent_kv: LatentKV, mask: Any, length: int, total: int, training: bool) -> bool:
    """Whether this call attends in the latent: inference only, with a mask it can read (a tensor, or none for a
    single query), no logit softcap, and under `auto` where it costs fewer multiply-adds than expanding the cache."""
    if layer.absorb == "never" or training or not (isinstance(mask, torch.Tensor) or (mask is None and length == 1)):
        return False
    if "softcap" in layer.extra:  # logit softcapping (Gemma 2) is the attention interface's business: it may not apply
        return False
    if layer.absorb == "always":
        return True
    r, n, rope, d = latent_kv.rank, latent_kv.nope_width, latent_kv.rope_width, layer.head_dim
    queries = length * layer.heads
    # multiply-adds: expanding the cache (kv_up over every position) + attention at head dims n + D and d, against
    # absorbing kv_up into the queries and outputs + attention at head dims r + D and r
    expanded = total * layer.kv_heads * r * (n + d) + queries * total * (n + rope + d)
    absorbed = queries * r * (n + d) + queries * total * (2 * r + rope)
    return absorbed < expanded


def _absorbed(
    module: Any,
    latent_kv: LatentKV,
    layer: _Layer,
    query: torch.Tensor,
    latent: torch.Tensor,
    rope_key: torch.Tensor,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """Attention in the latent: scores `(q_nope B^k) . c + q_rope . k_rope`, output `B^v (sum_s p_s c_s)`;
    `[B, H, L, d]`."""
    heads, d, nope = layer.heads, layer.head_dim, latent_kv.nope_width
    group = heads // layer.kv_heads
    up = latent_kv.kv_up.weight.view(layer.kv_heads, nope + d, latent_kv.rank).repeat_interleave(group, 0)
    up_key, up_value = up.split([nope, d], dim=1)  # [H, n, r], [H, d, r]
    absorbed = torch.einsum("bhln,hnr->bhlr", query[..., :nope], up_key)
    scores = absorbed.float() @ latent.float().transpose(-1, -2)  # [B, H, L, T]
    if latent_kv.rope_width:
        scores = scores + query[..., nope:].float() @ rope_key.float().transpose(-1, -2)
    scores = scores * module.scaling
    if mask is not None:
        mask = mask[..., : scores.shape[-1]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a fully masked (padding) row attends nothing
    out = torch.einsum("bhlr,hdr->bhld", probs @ latent.float(), up_value.float())
    return out.to(query.dtype)


def _sdpa(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fallback attention function for a family module without its own `eager_attention_forward`."""
    return ALL_ATTENTION_FUNCTIONS["sdpa"](*args, **kwargs)


def latent_layers(model: nn.Module) -> dict[str, LatentKV]:
    """The patched layers' latent projections, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LatentKV)}


# --- initialisation: which pairs keep RoPE, and the low-rank factorisation ---------------------------------------


def _rows(linear: nn.Linear) -> torch.Tensor:
    """`[W b]` of a linear layer in float64 on the CPU (`b = 0` without a bias)."""
    weight = linear.weight.detach().double().cpu()
    bias = linear.bias.detach().double().cpu() if linear.bias is not None else weight.new_zeros(weight.shape[0])
    return torch.cat([weight, bias[:, None]], dim=1)


def _projection_rows(attention: Any, family: FamilySpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_rows(getattr(attention, str(getattr(family.attention, p)))) for p in "qkv")  # type: ignore[return-value]


@torch.no_grad()
def _fit_layers(
    attentions: list[Any], family: FamilySpec, model_config: Any, moments: list[torch.Tensor | None]
) -> None:
    """Lay out the given layers (`plan_layout`) and fit their latents (`factorise`): from the weights alone where a
    moment is None (the identity), else from the second moment of real inputs extended by 1 (for the biases). Layers
    patched with `rope_scope="model"` (and the same options) share one choice of RoPE slots: the sum of their scores."""
    rotary, pairs = channel_pairs(family, model_config)
    settings: dict[tuple, list[int]] = {}
    rows, filled, stats = [], [], []
    for index, (attention, moment) in enumerate(zip(attentions, moments, strict=True)):
        latent_kv: LatentKV = attention.mla
        q_rows, k_rows, v_rows = _projection_rows(attention, family)
        rows.append((q_rows, k_rows, v_rows))
        filled.append(torch.eye(q_rows.shape[1], dtype=torch.float64) if moment is None else moment)
        heads = latent_kv.query_map.shape[0]
        stats.append(pair_statistics(q_rows, k_rows, filled[-1], heads, pairs, rotary, latent_kv.selection))
        key = (latent_kv.selection, latent_kv.scope, latent_kv.rope_width, latent_kv.kv_heads)
        settings.setdefault(key, []).append(index)
    shared: dict[int, list[tuple[int, int]]] = {}
    for (selection, scope, width, kv_heads), members in settings.items():
        if scope != "model" or not width:
            continue
        # each layer's scores normalised to sum 1, so that every layer weighs the same in the shared choice
        total = torch.stack([stats[i].scores / stats[i].scores.sum().clamp_min(1e-30) for i in members]).sum(0)
        kept = choose_components(total, width // (2 * kv_heads), selection)
        shared.update({i: kept for i in members})
    for index, attention in enumerate(tqdm(attentions, desc="mla: fitting latents", unit="layer", leave=False)):
        latent_kv = attention.mla
        q_rows, k_rows, v_rows = rows[index]
        moment = filled[index]
        hidden = q_rows.shape[1] - 1
        keep = latent_kv.rope_width // (2 * latent_kv.kv_heads)
        heads = latent_kv.query_map.shape[0]
        layout = plan_layout(stats[index], k_rows, v_rows, heads, keep, latent_kv.selection, shared.get(index))
        metric = None
        if latent_kv.fit == "attention":
            n, d = latent_kv.nope_width, latent_kv.head_dim
            query_rows = torch.einsum("hnd,hdi->hni", layout.query_map[:, :n], q_rows.view(heads, d, -1))
            out = getattr(attentions[index], str(family.attention.o)).weight.detach().double().cpu()
            metric = attention_metric(layout.stacked, moment, query_rows, out.view(out.shape[0], heads, d), n)
        down, up = factorise(
            layout.stacked, moment, latent_kv.rank, latent_kv.nope_width, latent_kv.kv_heads, latent_kv.fit, metric
        )
        fitted = torch.cat([down, layout.rope_rows])
        latent_kv.kv_down.weight.copy_(fitted[:, :hidden])
        if latent_kv.kv_down.bias is not None:
            latent_kv.kv_down.bias.copy_(fitted[:, hidden])
        latent_kv.kv_up.weight.copy_(up)
        latent_kv.query_map.copy_(layout.query_map)
        latent_kv.slot_pairs.copy_(layout.slot_pairs)


@torch.no_grad()
def calibrate(model: Any, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, int]:
    """Refit every MLA layer on real text: the kept pairs by the 2-norm of the actual queries and keys (MHA2MLA), the
    latent by the principal components of the actual keys and values (TransMLA), both from the second moment of each
    layer's inputs over `batches` (dicts of model inputs; padding, `attention_mask` 0, is left out).

    Returns:
        `dict`: `{"tokens": ..., "layers": ...}` counted.
    """
    from ..families.spec import resolve_family

    layers = {name.rpartition(".")[0]: m for name, m in latent_layers(model).items()}
    if not layers:
        raise InvalidOptionError("mla calibrate: the model has no MLA layer (patch it with mla first)")
    attentions = {name: model.get_submodule(name) for name in layers}
    moments: dict[str, torch.Tensor] = {}
    mask: list[torch.Tensor | None] = [None]

    def collector(name: str) -> Callable[..., None]:
        def collect(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            x = torch.cat([x.detach().double(), x.new_ones(*x.shape[:-1], 1, dtype=torch.float64)], dim=-1)
            rows = x[mask[0].bool()] if mask[0] is not None else x.reshape(-1, x.shape[-1])
            moments[name] = moments.get(name, 0) + (rows.T @ rows).cpu()

        return collect

    hooks = [a.register_forward_pre_hook(collector(n), with_kwargs=True) for n, a in attentions.items()]
    tokens, was_training = 0, model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc="mla calibrate", unit="batch", leave=False):
            mask[0] = batch.get("attention_mask")
            tokens += int(mask[0].sum()) if mask[0] is not None else batch["input_ids"].numel()
            model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if tokens == 0:
        raise InvalidOptionError("mla calibrate: the batches hold no tokens")
    family = resolve_family(model.config)
    names = list(layers)
    _fit_layers([attentions[n] for n in names], family, model.config, [moments[n] / tokens for n in names])
    return {"tokens": tokens, "layers": len(layers)}


# --- the patch -----------------------------------------------------------------------------------------------------


def _widths(config: MLAConfig, head_dim: int, kv_heads: int, rotary: int, uses_rope: bool) -> tuple[int, int, int]:
    """`(pairs kept per KV head, no-RoPE key channels per KV head, full rank)` of a layer."""
    keep = (rotary if config.rope_pairs is None else config.rope_pairs) if uses_rope else 0
    nope = nope_width(config.rope_selection, head_dim, keep)
    return keep, nope, kv_heads * (nope + head_dim)


@register_patch
class MLAPatch(Patch):
    name = "mla"
    summary = (
        "Multi-head latent attention from GQA/MHA: partial RoPE + joint low-rank K/V latent cache (MHA2MLA, TransMLA)."
    )
    config_class = MLAConfig
    capabilities = Capabilities(training_free=False, new_params=True, kv_cache=True, generate=True)
    targets = ("attention",)

    def check(self, family: FamilySpec, model_config: PretrainedConfig) -> str | None:
        if family.attention.kind != "standard":
            return f"its attention is already {family.attention.kind} (no separate key and value projections)"
        if family.attention.qk_norm is not None:
            return "its q/k norms normalise whole heads after the projection, which a latent cannot reproduce"
        if family.attention.sinks is not None:
            return "its attention function adds learned sinks (s_aux) that the latent attention does not pass on"
        if not family.attention.interface:
            return "its attention module does not compute attention through transformers' attention interface"
        return None

    def validate(  # type: ignore[override]  # each patch receives its own config class
        self, config: MLAConfig, family: FamilySpec, model_config: PretrainedConfig
    ) -> MLAConfig:
        text = model_config.get_text_config()
        layout = family.head_layout(text)
        rotary, _ = channel_pairs(family, model_config)
        if rotary == 0 or not any(family.uses_rope(model_config, i) for i in range(text.num_hidden_layers)):
            raise InvalidOptionError(
                f"{self.name}: this {family.name} model rotates no query or key (no RoPE on any layer), so there is "
                "no positional part to keep; a plain low-rank factorisation of the keys and values is all that "
                "is left (not what this conversion is for)."
            )
        if config.rope_pairs is not None and config.rope_pairs > rotary:
            raise InvalidOptionError(
                f"{self.name}: rope_pairs={config.rope_pairs}, but a head has {rotary} RoPE frequency pairs "
                f"(head_dim {layout.head_dim}); use at most {rotary}.",
                option="rope_pairs",
            )
        keep, nope, full = _widths(config, layout.head_dim, layout.num_kv_heads, rotary, True)
        if config.rank is not None and config.rank > full:
            raise InvalidOptionError(
                f"{self.name}: rank={config.rank} is more than the {full} rows it factorises ({layout.num_kv_heads} KV "
                f"heads x ({nope} no-RoPE key + {layout.head_dim} value channels) with rope_pairs={keep}); use at "
                f"most {full} (omit rank for the exact full rank).",
                option="rank",
            )
        return config

    def apply(  # type: ignore[override]
        self, model, config: MLAConfig, family: FamilySpec, layers: list[int], handle: PatchHandle
    ) -> None:
        layout = family.head_layout(model.config.get_text_config())
        rotary, _ = channel_pairs(family, model.config)
        patched: list[Any] = []
        for index in layers:
            attention = family.attention_module(model, index)
            uses_rope = family.uses_rope(model.config, index)
            keep, nope, full = _widths(config, layout.head_dim, layout.num_kv_heads, rotary, uses_rope)
            k_proj = getattr(attention, str(family.attention.k))
            v_proj = getattr(attention, str(family.attention.v))
            weight = k_proj.weight
            latent_kv = LatentKV(
                k_proj.in_features,
                min(config.rank or full, full),
                layout.num_heads,
                layout.num_kv_heads,
                layout.head_dim,
                nope,
                2 * keep * layout.num_kv_heads,
                k_proj.bias is not None or v_proj.bias is not None,
                device=weight.device,
                dtype=weight.dtype,
            )
            latent_kv.selection, latent_kv.scope, latent_kv.fit = (
                config.rope_selection,
                config.rope_scope,
                config.latent_fit,
            )
            attention.mla = latent_kv
            handle.on_revert(functools.partial(delattr, attention, "mla"))
            handle.modules.append(latent_kv)
            patched.append(attention)
            layer = _Layer(
                q=str(family.attention.q),
                o=str(family.attention.o),
                heads=layout.num_heads,
                kv_heads=layout.num_kv_heads,
                head_dim=layout.head_dim,
                rope=rotary_function(attention, self.name) if uses_rope else None,
                eager=getattr(sys.modules[type(attention).__module__], "eager_attention_forward", _sdpa),
                absorb=config.absorb,
                extra={
                    argument: getattr(attention, name)
                    for name, argument in (("sliding_window", "sliding_window"), ("attn_logit_softcapping", "softcap"))
                    if getattr(attention, name, None) is not None
                },
            )
            attention.forward = functools.partial(_mla_forward, attention, layer=layer)
            handle.on_revert(functools.partial(attention.__dict__.pop, "forward"))
        if patched and next(patched[0].mla.parameters()).device.type != "meta":  # a meta model only plans
            _fit_layers(patched, family, model.config, [None] * len(patched))

    def neutral_config(self, family: FamilySpec, model_config: PretrainedConfig) -> MLAConfig:
        return MLAConfig(rank=None, rope_pairs=None)
