"""Multi-head latent attention (MLA, DeepSeek-V2 arXiv:2405.04434) retrofitted into a GQA / MHA model: partial RoPE
(MHA2MLA, arXiv:2502.14837) and one low-rank latent for the no-RoPE keys and the values (TransMLA, arXiv:2502.07864).

Each patched layer keeps its query and output projections. KV head `j` keeps RoPE on `p` of its frequency pairs, the
channels `R_j`; its other channels `N_j` lose RoPE and, with its values, come out of one latent shared by all heads:

    c_t = A x_t + a                                    latent, rank r (cached)
    [k_{t,j}[N_j]; v_{t,j}] = B_j c_t                  no-RoPE keys and values of KV head j
    k_{t,j}[R_j] = RoPE_t(W_k[R_j] x_t + b_k[R_j])     the kept pairs, as the model computed them (cached)
    score(h, t, s) = q_{t,h}[R_j] . k_{s,j}[R_j] + q_{t,h}[N_j] . k_{s,j}[N_j]      (query h in group j; q_h[N_j]
                                                                                     not rotated)

The cache holds `c` and the kept RoPE keys: `r + 2 p KV` numbers per token and layer instead of `2 d KV`. In the
decode step the absorbed form never expands the cache: `q_h[N_j] B^k_j` is a query against the latent itself and
the output is `B^v_j` times the attention-weighted latent (`absorb`).

Initialisation (at patch time, from the weights alone): the kept pairs rank by `rope_selection` (`norm`: MHA2MLA's
2-norm criterion, the product of the query and key norms of each pair, here of the projection rows; `high` / `low` /
`uniform` frequencies); `A`, `B` from the principal directions of the stacked no-RoPE key and value projections,
keys and values balanced to equal norm first (TransMLA). `calibrate(model, batches)` (recipe init step
`mla_calibrate`) redoes both on real text: the pair norms and the principal components of the actual keys and values.
`hf_attn_zoo.mla.export_deepseek_v3` writes the result as a stock DeepSeek-V3 checkpoint.

The original k/v projections stay in the module, unused, so that `unpatch` is exact. Not training-free. Neutral
setting: every pair keeps RoPE and the full rank (`A` = the stacked projections, `B` = identity): the model exactly.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
from transformers import PretrainedConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..errors import InvalidOptionError
from ..families.rope import channel_pairs, rotary_function
from ..families.spec import FamilySpec
from ..registry import Capabilities, Patch, PatchConfig, PatchHandle, register_patch

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
    rope_selection: Literal["norm", "high", "low", "uniform"] = field(
        default="norm",
        metadata={
            "help": "which pairs keep RoPE: norm (largest query x key norm, MHA2MLA's 2-norm), high / low "
            "(frequencies), uniform (evenly spaced)."
        },
    )
    balance: bool = field(
        default=True,
        metadata={"help": "scale keys and values to equal norm before the low-rank fit (TransMLA's balance)."},
    )
    absorb: Literal["auto", "always", "never"] = field(
        default="auto",
        metadata={
            "help": "attend in the latent without expanding the cache (weight absorption): auto (inference calls "
            "where it costs less: decoding), always (inference), never."
        },
    )


class LatentKV(nn.Module):
    """One layer's latent key/value projections, laid out as DeepSeek-V3's: `kv_down` `hidden -> r + 2 p KV` (the
    latent, then the kept RoPE channels of every KV head) and `kv_up` `r -> KV (n + d)` (per KV head its `n` no-RoPE
    key channels, then its `d` value channels). `rope_channels` `[KV, 2p]` and `nope_channels` `[KV, n]` say which
    channels of each key head are which (buffers, saved with the model)."""

    rope_channels: torch.Tensor
    nope_channels: torch.Tensor

    def __init__(
        self,
        hidden: int,
        rank: int,
        kv_heads: int,
        head_dim: int,
        rope_width: int,
        bias: bool,
        *,
        device: torch.device | str | None,
        dtype: torch.dtype,
    ):
        super().__init__()
        self.rank, self.kv_heads, self.head_dim, self.rope_width = rank, kv_heads, head_dim, rope_width
        self.nope_width = head_dim - rope_width
        self.kv_down = nn.Linear(hidden, rank + kv_heads * rope_width, bias=bias, device=device, dtype=dtype)
        self.kv_up = nn.Linear(rank, kv_heads * (self.nope_width + head_dim), bias=False, device=device, dtype=dtype)
        self.register_buffer("rope_channels", torch.zeros(kv_heads, rope_width, dtype=torch.long, device=device))
        self.register_buffer("nope_channels", torch.zeros(kv_heads, self.nope_width, dtype=torch.long, device=device))
        self.selection, self.balance = "norm", True  # how `calibrate` refits it (the patch's options)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, kv_heads={self.kv_heads}, rope_channels={self.rope_width}/{self.head_dim}"

    def rope_mask(self) -> torch.Tensor:
        """`[KV, d]`: True on the channels that keep RoPE."""
        mask = torch.zeros(self.kv_heads, self.head_dim, dtype=torch.bool, device=self.rope_channels.device)
        return mask.scatter(1, self.rope_channels, True)


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


def _spread(x: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
    """`x` `[B, KV, T, w]` placed in the channels `index` `[KV, w]` of a zero `[B, KV, T, width]`."""
    batch, heads, length, _ = x.shape
    where = index[None, :, None, :].expand(batch, heads, length, -1)
    return x.new_zeros(batch, heads, length, width).scatter(-1, where, x)


def _pick(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The channels `index` `[n, w]` of `x` `[B, n, T, d]` (per head)."""
    return x.gather(-1, index[None, :, None, :].expand(x.shape[0], -1, x.shape[2], -1))


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
    group, width = heads // kv_heads, latent_kv.rope_width
    query = getattr(self, layer.q)(hidden_states).view(batch, length, heads, d).transpose(1, 2)
    latent, rope_key = latent_kv.kv_down(hidden_states).split([latent_kv.rank, kv_heads * width], dim=-1)
    rope_key = rope_key.view(batch, length, kv_heads, width).transpose(1, 2)  # [B, KV, L, 2p]
    if layer.rope is not None:
        cos, sin = position_embeddings  # type: ignore[misc]
        rotated, _ = layer.rope(query, query[:, :1], cos, sin)
        keep = latent_kv.rope_mask().repeat_interleave(group, 0)[None, :, None, :]
        query = torch.where(keep, rotated, query)
        if width:
            _, full = layer.rope(query[:, :1], _spread(rope_key, latent_kv.rope_channels, d), cos, sin)
            rope_key = _pick(full, latent_kv.rope_channels)
    latent = latent[:, None]  # [B, 1, L, r]: one "head" for every cache layer type
    rope_key = rope_key.transpose(1, 2).reshape(batch, 1, length, kv_heads * width)
    if cache is not None:
        latent, rope_key = cache.update(latent, rope_key, self.layer_idx, kwargs=kwargs)
    total = latent.shape[2]
    if _absorbs(layer, latent_kv, attention_mask, length, total, self.training):
        out = _absorbed(self, latent_kv, layer, query, latent, rope_key, attention_mask)
        return getattr(self, layer.o)(out.transpose(1, 2).reshape(batch, length, -1)), None
    expanded = latent_kv.kv_up(latent[:, 0]).view(batch, total, kv_heads, -1).transpose(1, 2)
    nope, value = expanded.split([latent_kv.nope_width, d], dim=-1)
    key = _spread(nope, latent_kv.nope_channels, d) + _spread(
        rope_key.view(batch, total, kv_heads, width).transpose(1, 2), latent_kv.rope_channels, d
    )
    extra = {}
    for name, argument in (("sliding_window", "sliding_window"), ("attn_logit_softcapping", "softcap")):
        if getattr(self, name, None) is not None:  # what the families' own forwards pass on
            extra[argument] = getattr(self, name)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, layer.eager)
    out, weights = interface(
        self,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0 if not self.training else getattr(self, "attention_dropout", 0.0),
        scaling=self.scaling,
        **extra,
        **kwargs,
    )
    return getattr(self, layer.o)(out.reshape(batch, length, -1).contiguous()), weights


def _absorbs(layer: _Layer, latent_kv: LatentKV, mask: Any, length: int, total: int, training: bool) -> bool:
    """Whether this call attends in the latent: inference only, with a mask it can read (a tensor, or none for a
    single query), and under `auto` where expanding the cache would cost more than absorbing into the queries."""
    if layer.absorb == "never" or training or not (isinstance(mask, torch.Tensor) or (mask is None and length == 1)):
        return False
    if layer.absorb == "always":
        return True
    extra = max(latent_kv.rank - layer.head_dim, 0)  # per query head and query, over the expanded form's head dim
    return length * layer.heads * extra < total * layer.kv_heads * layer.head_dim


def _absorbed(
    module: Any,
    latent_kv: LatentKV,
    layer: _Layer,
    query: torch.Tensor,
    latent: torch.Tensor,
    rope_key: torch.Tensor,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """Attention in the latent: scores `(q[N] B^k) . c + q[R] . k[R]`, output `B^v (sum_s p_s c_s)`; `[B, H, L, d]`."""
    batch, heads, length, d = query.shape
    kv_heads, width, group = layer.kv_heads, latent_kv.rope_width, heads // layer.kv_heads
    up = latent_kv.kv_up.weight.view(kv_heads, latent_kv.nope_width + d, latent_kv.rank)
    up_key, up_value = up.split([latent_kv.nope_width, d], dim=1)  # [KV, n, r], [KV, d, r]
    nope_q = _pick(query, latent_kv.nope_channels.repeat_interleave(group, 0))  # [B, H, L, n]
    absorbed = torch.einsum("bhln,hnr->bhlr", nope_q, up_key.repeat_interleave(group, 0))
    scores = absorbed.float() @ latent.float().transpose(-1, -2)  # [B, H, L, T]
    if width:
        rope_q = _pick(query, latent_kv.rope_channels.repeat_interleave(group, 0))  # [B, H, L, 2p]
        keys = rope_key.view(batch, -1, kv_heads, width).permute(0, 2, 3, 1)  # [B, KV, 2p, T]
        grouped = rope_q.float().reshape(batch, kv_heads, group * length, width) @ keys.float()
        scores = scores + grouped.view(batch, heads, length, -1)
    scores = scores * module.scaling
    if mask is not None:
        mask = mask[..., : scores.shape[-1]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a fully masked (padding) row attends nothing
    mixed = probs @ latent.float()  # [B, H, L, r]
    out = torch.einsum("bhlr,hdr->bhld", mixed, up_value.float().repeat_interleave(group, 0))
    return out.to(query.dtype)


def _sdpa(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fallback attention function for a family module without its own `eager_attention_forward`."""
    return ALL_ATTENTION_FUNCTIONS["sdpa"](*args, **kwargs)


def latent_layers(model: nn.Module) -> dict[str, LatentKV]:
    """The patched layers' latent projections, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LatentKV)}


# --- initialisation: which pairs keep RoPE, and the low-rank factorisation ---------------------------------------


def _second_moment(hidden: int, covariance: torch.Tensor | None) -> torch.Tensor:
    """`E[x~ x~^T]` of the inputs extended by a constant 1 (for the biases): the identity without data."""
    if covariance is not None:
        return covariance
    return torch.eye(hidden + 1, dtype=torch.float64)


def _rows(linear: nn.Linear) -> torch.Tensor:
    """`[W b]` of a linear layer in float64 (`b = 0` without a bias)."""
    weight = linear.weight.detach().double()
    bias = linear.bias.detach().double() if linear.bias is not None else weight.new_zeros(weight.shape[0])
    return torch.cat([weight, bias[:, None]], dim=1).cpu()


def _pair_scores(
    q_rows: torch.Tensor, k_rows: torch.Tensor, moment: torch.Tensor, layout: Any, pairs: list[int], rotary: int
) -> torch.Tensor:
    """`[KV, rotary]`: per KV head and RoPE frequency pair, the mean over its query heads of `rms(q_pair) rms(k_pair)`
    (MHA2MLA's 2-norm criterion; `moment` the second moment of the inputs, the identity for the weights alone)."""
    heads, kv_heads, d = layout.num_heads, layout.num_kv_heads, layout.head_dim
    pair_of = torch.tensor(pairs)
    rotated = pair_of < rotary

    def pair_rms(rows: torch.Tensor, n: int) -> torch.Tensor:  # [n, rotary]
        energy = ((rows @ moment) * rows).sum(-1).clamp_min(0).view(n, d)  # E[(row . x~)^2] per channel
        summed = energy.new_zeros(n, rotary).index_add_(1, pair_of[rotated], energy[:, rotated])
        return summed.sqrt()

    q, k = pair_rms(q_rows, heads), pair_rms(k_rows, kv_heads)
    return (q.view(kv_heads, heads // kv_heads, rotary) * k[:, None]).mean(1)


def _kept_pairs(selection: str, keep: int, rotary: int, scores: torch.Tensor) -> torch.Tensor:
    """`[KV, keep]` pair ids (frequency index, 0 = fastest) that keep RoPE, per KV head."""
    kv_heads = scores.shape[0]
    if selection == "norm":
        return scores.topk(keep, dim=1).indices.sort(dim=1).values
    if selection == "high":
        chosen = torch.arange(keep)
    elif selection == "low":
        chosen = torch.arange(rotary - keep, rotary)
    else:
        chosen = torch.linspace(0, rotary - 1, keep).round().long() if keep else torch.arange(0)
    return chosen.expand(kv_heads, -1)


def _fit(
    latent_kv: LatentKV,
    k_rows: torch.Tensor,
    v_rows: torch.Tensor,
    rope_channels: torch.Tensor,
    moment: torch.Tensor,
    balance: bool,
) -> None:
    """Set `latent_kv`'s weights: the kept RoPE rows of the keys, and `A`, `B` of the no-RoPE keys and the values.

    The stacked rows `Y = [K[N_j]; V_j]_j` (`[W b]`, inputs extended by 1) are reproduced by `B A` with `B`'s columns
    the top principal directions of `D Y M Y^T D` (`M`: the inputs' second moment, `D`: the key/value balance):
    the rank-r fit of the outputs in the balanced norm. At full rank `A` is `Y` itself and `B` the identity.
    """
    kv_heads, d = latent_kv.kv_heads, latent_kv.head_dim
    hidden = k_rows.shape[1] - 1
    keys = k_rows.view(kv_heads, d, hidden + 1)
    values = v_rows.view(kv_heads, d, hidden + 1)
    everything = torch.arange(d).expand(kv_heads, -1)
    kept = torch.zeros(kv_heads, d, dtype=torch.bool).scatter(1, rope_channels, True)
    nope_channels = everything[~kept].view(kv_heads, -1)
    nope_rows = keys.gather(1, nope_channels[:, :, None].expand(-1, -1, hidden + 1))
    stacked = torch.cat([nope_rows, values], dim=1).reshape(-1, hidden + 1)  # [KV (n + d), hidden + 1]
    rope_rows = keys.gather(1, rope_channels[:, :, None].expand(-1, -1, hidden + 1)).reshape(-1, hidden + 1)
    rank = latent_kv.rank
    if rank >= stacked.shape[0]:
        down, up = stacked, torch.eye(stacked.shape[0], dtype=torch.float64)
    else:
        scale = torch.ones(kv_heads, latent_kv.nope_width + d, dtype=torch.float64)
        if balance and latent_kv.nope_width:
            power = ((stacked @ moment) * stacked).sum(-1).view(kv_heads, -1)
            key_power, value_power = power[:, : latent_kv.nope_width].sum(), power[:, latent_kv.nope_width :].sum()
            scale[:, : latent_kv.nope_width] = (value_power / key_power.clamp_min(1e-30)).sqrt()
        scale = scale.flatten()
        balanced = stacked * scale[:, None]
        _, vectors = torch.linalg.eigh(balanced @ moment @ balanced.T)
        top = vectors[:, -rank:].flip(1)  # [KV (n + d), r], largest first
        down, up = top.T @ balanced, top / scale[:, None]
    target = latent_kv.kv_down
    with torch.no_grad():
        rows = torch.cat([down, rope_rows])
        target.weight.copy_(rows[:, :hidden])
        if target.bias is not None:
            target.bias.copy_(rows[:, hidden])
        latent_kv.kv_up.weight.copy_(up)
        latent_kv.rope_channels.copy_(rope_channels)
        latent_kv.nope_channels.copy_(nope_channels)


def _initialise(
    attention: Any,
    family: FamilySpec,
    model_config: PretrainedConfig,
    keep: int,
    selection: str,
    balance: bool,
    moment: torch.Tensor | None,
) -> None:
    """Choose the kept pairs of one layer and fit its latent (weights only without `moment`, else calibrated)."""
    latent_kv: LatentKV = attention.mla
    layout = family.head_layout(model_config.get_text_config())
    rotary, pairs = channel_pairs(family, model_config)
    projections = [getattr(attention, getattr(family.attention, p)) for p in "qkv"]
    q_rows, k_rows, v_rows = (_rows(p) for p in projections)
    hidden = q_rows.shape[1] - 1
    moment = _second_moment(hidden, moment)
    scores = _pair_scores(q_rows, k_rows, moment, layout, pairs, rotary)
    chosen = _kept_pairs(selection, keep, rotary, scores)  # [KV, keep]
    pair_of = torch.tensor(pairs)
    channels = [torch.nonzero(torch.isin(pair_of, chosen[j])).flatten() for j in range(layout.num_kv_heads)]
    _fit(latent_kv, k_rows, v_rows, torch.stack(channels), moment, balance)


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
        for batch in batches:
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
    for name, latent_kv in layers.items():
        _initialise(
            attentions[name],
            family,
            model.config,
            latent_kv.rope_width // 2,
            latent_kv.selection,
            latent_kv.balance,
            moments[name] / tokens,
        )
    return {"tokens": tokens, "layers": len(layers)}


# --- the patch -----------------------------------------------------------------------------------------------------


def _full_rank(kv_heads: int, head_dim: int, rope_width: int) -> int:
    return kv_heads * (2 * head_dim - rope_width)


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
        layout = family.head_layout(model_config.get_text_config())
        rotary, _ = channel_pairs(family, model_config)
        if config.rope_pairs is not None and config.rope_pairs > rotary:
            raise InvalidOptionError(
                f"{self.name}: rope_pairs={config.rope_pairs}, but a head has {rotary} RoPE frequency pairs "
                f"(head_dim {layout.head_dim}); use at most {rotary}.",
                option="rope_pairs",
            )
        keep = rotary if config.rope_pairs is None else config.rope_pairs
        full = _full_rank(layout.num_kv_heads, layout.head_dim, 2 * keep)
        if config.rank is not None and config.rank > full:
            raise InvalidOptionError(
                f"{self.name}: rank={config.rank} is more than the {full} rows it factorises ({layout.num_kv_heads} KV "
                f"heads x ({layout.head_dim - 2 * keep} no-RoPE key + {layout.head_dim} value channels) with "
                f"rope_pairs={keep}); use at most {full} (omit rank for the exact full rank).",
                option="rank",
            )
        return config

    def apply(  # type: ignore[override]
        self, model, config: MLAConfig, family: FamilySpec, layers: list[int], handle: PatchHandle
    ) -> None:
        layout = family.head_layout(model.config.get_text_config())
        rotary, _ = channel_pairs(family, model.config)
        for index in layers:
            attention = family.attention_module(model, index)
            uses_rope = family.uses_rope(model.config, index)
            keep = (rotary if config.rope_pairs is None else config.rope_pairs) if uses_rope else 0
            full = _full_rank(layout.num_kv_heads, layout.head_dim, 2 * keep)
            k_proj = getattr(attention, str(family.attention.k))
            v_proj = getattr(attention, str(family.attention.v))
            weight = k_proj.weight
            latent_kv = LatentKV(
                k_proj.in_features,
                min(config.rank or full, full),
                layout.num_kv_heads,
                layout.head_dim,
                2 * keep,
                k_proj.bias is not None or v_proj.bias is not None,
                device=weight.device,
                dtype=weight.dtype,
            )
            latent_kv.selection, latent_kv.balance = config.rope_selection, config.balance
            attention.mla = latent_kv
            handle.on_revert(functools.partial(delattr, attention, "mla"))
            handle.modules.append(latent_kv)
            if weight.device.type != "meta":
                _initialise(attention, family, model.config, keep, config.rope_selection, config.balance, None)
            layer = _Layer(
                q=family.attention.q,  # type: ignore[arg-type]  # a standard attention names all four
                o=family.attention.o,  # type: ignore[arg-type]
                heads=layout.num_heads,
                kv_heads=layout.num_kv_heads,
                head_dim=layout.head_dim,
                rope=rotary_function(attention, self.name) if uses_rope else None,
                eager=getattr(sys.modules[type(attention).__module__], "eager_attention_forward", _sdpa),
                absorb=config.absorb,
            )
            attention.forward = functools.partial(_mla_forward, attention, layer=layer)
            handle.on_revert(functools.partial(attention.__dict__.pop, "forward"))

    def neutral_config(self, family: FamilySpec, model_config: PretrainedConfig) -> MLAConfig:
        return MLAConfig(rank=None, rope_pairs=None)
