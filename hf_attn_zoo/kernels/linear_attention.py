"""Causal linear attention with an exact softmax window over the most recent keys (LoLCATs' hybrid), in one normaliser.

For query `i` (keys indexed by position, `d = i - j`):

    out_i = (w_h sum_{0 <= d < W} exp(s_ij - m_i) v_j + sum_{W <= d < span} (phi_q_i . phi_k_j) v_j)
          / (w_h sum_{0 <= d < W} exp(s_ij - m_i)     + sum_{W <= d < span} (psi_q_i . psi_k_j))

with `s_ij = scaling * q_i . k_j` (capped, `c * tanh(s_ij / c)`, under a layer's logit softcap `c`, as Gemma 2's own
attention does), `m_i` the row's largest window score, `w_h = sigmoid(gamma_h)` a per-head window
weight and a linear weight of 1 (LoLCATs, arXiv:2410.10254, its default: no affine factors). `phi` are the numerator
features and `psi` the normaliser's: NaLaFormer (arXiv:2506.21137) rotates the numerator features with RoPE and keeps
the normaliser on the un-rotated ones, so it stays positive; other maps pass the same tensors twice. `W = 0` is pure
linear attention; a window that covers every key is exact softmax attention (the linear sums are empty). The softcap
applies to the window's softmax logits only: the linear part's feature-map products are no logits, so it does not
apply there. `span`
bounds the linear part for a layer with its own sliding window (None = every older key).

`naive_hybrid_attention` is the quadratic reference. `hybrid_attention` is the chunked form used for prefill and
training: the window part in blocks of `chunk` queries against their `chunk + W - 1` keys, the linear part as a causal
linear attention over keys shifted by `W` positions (intra-chunk products plus an exclusive prefix sum of per-chunk
states), so its cost grows linearly with the length. A `LinearState` (`sum phi_k v^T`, `sum psi_k` over keys older
than every query's window) carries the prefix when decoding; `absorb` folds keys into it. With `backend="fla"` the
linear part's numerator runs on flash-linear-attention's `chunk_linear_attn` (Triton, GPU; optional dependency) and
the normaliser on a prefix sum; the window part stays as here.

Shapes: query `[B, H, Q, D]`, key `[B, KV, K, D]`, value `[B, KV, K, Dv]` (GQA not repeated: `H = KV * g`), the query
rows are the last `Q` of the `K` key positions; features `[B, H, Q, F]` / `[B, KV, K, F]`. Everything runs in fp32
and the output `[B, Q, H, Dv]` is cast to the value dtype.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from .softcap import cap_logits

__all__ = [
    "LinearBackend",
    "LinearFeatures",
    "LinearState",
    "absorb",
    "fla_available",
    "hybrid_attention",
    "naive_hybrid_attention",
]

LinearBackend = Literal["torch", "fla"]


def _safe(den: torch.Tensor) -> torch.Tensor:
    """The normaliser, with 1 where it is 0: only a row with nothing to attend (padding) has none, and its output is
    then 0 with a finite gradient (a tiny epsilon would give it a huge one)."""
    return torch.where(den > 0, den, torch.ones_like(den))


class LinearFeatures(NamedTuple):
    """Feature-mapped queries and keys: numerator (`q`, `k`) and normaliser (`q_norm`, `k_norm`) features."""

    q: torch.Tensor  # [B, H, Q, F]
    k: torch.Tensor  # [B, KV, K, F]
    q_norm: torch.Tensor
    k_norm: torch.Tensor


class LinearState(NamedTuple):
    """The linear part's prefix: `kv = sum_j phi_k_j v_j^T` `[B, KV, F, Dv]`, `k = sum_j psi_k_j` `[B, KV, F]`."""

    kv: torch.Tensor
    k: torch.Tensor


def absorb(state: LinearState | None, k: torch.Tensor, k_norm: torch.Tensor, value: torch.Tensor) -> LinearState:
    """`state` plus keys `k` / `k_norm` `[B, KV, N, F]` with values `[B, KV, N, Dv]` (padding already zeroed)."""
    kv = torch.einsum("bknf,bknd->bkfd", k.float(), value.float())
    ks = k_norm.float().sum(2)
    return LinearState(kv, ks) if state is None else LinearState(state.kv + kv, state.k + ks)


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """`[B, H, ...]` -> `[B, KV, g, ...]` (query heads grouped under their KV head)."""
    return x.unflatten(1, (kv_heads, x.shape[1] // kv_heads))


def naive_hybrid_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    features: LinearFeatures,
    *,
    window: int,
    window_weight: torch.Tensor | None,
    scaling: float,
    span: int | None = None,
    key_real: torch.Tensor | None = None,
    state: LinearState | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The quadratic reference of `hybrid_attention` (same arguments; `window_weight` `[H]`, `key_real` `[B, K]`)."""
    batch, heads, q_len, _ = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    group = heads // kv_heads
    k, v = key.float().repeat_interleave(group, 1), value.float().repeat_interleave(group, 1)
    distance = torch.arange(k_len - q_len, k_len, device=query.device)[:, None] - torch.arange(k_len, device=key.device)
    in_window = (distance >= 0) & (distance < window)
    in_linear = distance >= window
    if span is not None:
        in_linear = in_linear & (distance < span)
    real = key_real[:, None, None, :] if key_real is not None else torch.ones(1, 1, 1, k_len, dtype=torch.bool)
    real = real.to(query.device)
    scores = cap_logits((query.float() @ k.transpose(-1, -2)) * scaling, softcap)
    scores = scores.masked_fill(~(in_window & real), float("-inf"))
    top = scores.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weight = window_weight.float()[None, :, None, None] if window_weight is not None else 1.0
    soft = weight * torch.exp(scores - top)
    linear_mask = (in_linear & real).float()
    lin_num = (features.q.float() @ features.k.float().repeat_interleave(group, 1).transpose(-1, -2)) * linear_mask
    lin_den = (features.q_norm.float() @ features.k_norm.float().repeat_interleave(group, 1).transpose(-1, -2)) * (
        linear_mask
    )
    num = (soft + lin_num) @ v
    den = soft.sum(-1) + lin_den.sum(-1)
    if state is not None:
        num = num + features.q.float() @ state.kv.repeat_interleave(group, 1)
        den = den + (features.q_norm.float() * state.k.repeat_interleave(group, 1)[:, :, None]).sum(-1)
    out = num / _safe(den)[..., None]
    return out.transpose(1, 2).to(value.dtype)


def _softmax_sums(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """`exp(s - m)` over the allowed entries (0 elsewhere), `m` the row's largest allowed score (LoLCATs' stabiliser:
    it is part of the formula, so its gradient is kept). In-place when nothing records gradients."""
    inplace = not (torch.is_grad_enabled() and scores.requires_grad)
    scores = scores.masked_fill_(~allowed, float("-inf")) if inplace else scores.masked_fill(~allowed, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return scores.sub_(top).exp_() if inplace else torch.exp(scores - top)


def _window_part(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    window: int,
    weight: torch.Tensor,
    scaling: float,
    real: torch.Tensor,
    chunk: int,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax window's numerator `[B, KV, g, Q, Dv]` and normaliser `[B, KV, g, Q]`, in query blocks of `chunk`
    against their `chunk + window - 1` keys (one block when the window covers every key); `weight` `[KV, g]`;
    `softcap` caps the scaled scores."""
    batch, kv_heads, group, q_len, _ = query.shape
    k_len = key.shape[2]
    start = k_len - q_len  # position of the first query
    if window >= k_len or q_len <= chunk:  # every query sees (nearly) all keys: one masked block
        distance = torch.arange(start, k_len, device=query.device)[:, None] - torch.arange(k_len, device=key.device)
        allowed = (distance >= 0) & (distance < window) & real[:, None, None, None, :]  # [B, 1, 1, Q, K]
        soft = _softmax_sums(cap_logits(torch.einsum("bkgqd,bkld->bkgql", query, key) * scaling, softcap), allowed)
        num, den = torch.einsum("bkgql,bkld->bkgqd", soft, value), soft.sum(-1)
    else:
        blocks = -(-q_len // chunk)
        padded_q = blocks * chunk
        span = chunk + window - 1
        # keys padded so the block of queries [p, p + chunk) reads keys [p - window + 1, p + chunk) from index p
        pad = (window - 1, padded_q - q_len)
        keys = F.pad(key, (0, 0, *pad))[:, :, start:].unfold(2, span, chunk)  # [B, KV, N, D, span]
        values = F.pad(value, (0, 0, *pad))[:, :, start:].unfold(2, span, chunk).transpose(-1, -2)
        q_blocks = F.pad(query, (0, 0, 0, padded_q - q_len)).unflatten(3, (blocks, chunk))  # [B, KV, g, N, C, D]
        row = torch.arange(chunk, device=query.device)[:, None]
        col = torch.arange(span, device=query.device)
        allowed = (col >= row) & (col < row + window)  # distance = row - col + window - 1 in [0, window)
        real_blocks = F.pad(real, pad, value=False)[:, start:].unfold(1, span, chunk)  # [B, N, span]
        allowed = allowed & real_blocks[:, None, None, :, None, :]  # [B, 1, 1, N, C, span]
        scores = torch.einsum("bkgncd,bkndl->bkgncl", q_blocks, keys) * scaling
        soft = _softmax_sums(cap_logits(scores, softcap), allowed)
        num = torch.einsum("bkgncl,bknld->bkgncd", soft, values).flatten(3, 4)[:, :, :, :q_len]
        den = soft.sum(-1).flatten(3, 4)[:, :, :, :q_len]
    weight = weight[None, :, :, None]  # applied to the sums: the window's terms all share their head's weight
    return num * weight[..., None], den * weight


def _shifted(shift: int, *keys: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Key-side tensors `[B, KV, K, .]` with key `j` moved to position `j + shift` (zeros before): a query at `p` then
    reads the keys at distance >= `shift` as the shifted keys at positions <= `p`, a plain causal linear attention."""
    k_len = keys[0].shape[2]
    return tuple(F.pad(x[:, :, : k_len - shift], (0, 0, shift, 0)) for x in keys)


def _shifted_causal(
    q: torch.Tensor,
    q_norm: torch.Tensor,
    k: torch.Tensor,
    k_norm: torch.Tensor,
    value: torch.Tensor,
    shift: int,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Causal linear attention of the queries (the last `Q` positions) over the keys at distance >= `shift`:
    numerator `[B, KV, g, Q, Dv]` and normaliser `[B, KV, g, Q]`, or None when no key is that far."""
    q_len, k_len = q.shape[3], k.shape[2]
    if shift >= k_len:
        return None
    start = k_len - q_len
    k, k_norm, value = _shifted(shift, k, k_norm, value)
    num = q.new_zeros(*q.shape[:-1], value.shape[-1])
    den = q.new_zeros(q.shape[:-1])
    if start:  # keys before the first query: one state every query reads
        prefix = absorb(None, k[:, :, :start], k_norm[:, :, :start], value[:, :, :start])
        num = num + torch.einsum("bkgqf,bkfd->bkgqd", q, prefix.kv)
        den = den + torch.einsum("bkgqf,bkf->bkgq", q_norm, prefix.k)
    blocks = -(-q_len // chunk)
    pad = blocks * chunk - q_len

    def split(x: torch.Tensor, dim: int) -> torch.Tensor:
        return F.pad(x, (0, 0) * (x.dim() - dim - 1) + (0, pad)).unflatten(dim, (blocks, chunk))

    qb, qnb = split(q, 3), split(q_norm, 3)  # [B, KV, g, N, C, F]
    kb, knb, vb = split(k[:, :, start:], 2), split(k_norm[:, :, start:], 2), split(value[:, :, start:], 2)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    intra = torch.einsum("bkgncf,bknlf->bkgncl", qb, kb).masked_fill(~causal, 0.0)
    intra_norm = torch.einsum("bkgncf,bknlf->bkgncl", qnb, knb).masked_fill(~causal, 0.0)
    chunk_kv = torch.einsum("bknlf,bknld->bknfd", kb, vb)
    chunk_k = knb.sum(3)  # [B, KV, N, F]
    # exclusive prefix over chunks (shifted, not `cumsum - x`: that cancels badly in the backward pass)
    before_kv = F.pad(chunk_kv.cumsum(2)[:, :, :-1], (0, 0, 0, 0, 1, 0))
    before_k = F.pad(chunk_k.cumsum(2)[:, :, :-1], (0, 0, 1, 0))
    block_num = torch.einsum("bkgncl,bknld->bkgncd", intra, vb) + torch.einsum("bkgncf,bknfd->bkgncd", qb, before_kv)
    block_den = intra_norm.sum(-1) + torch.einsum("bkgncf,bknf->bkgnc", qnb, before_k)
    num = num + block_num.flatten(3, 4)[:, :, :, :q_len]
    den = den + block_den.flatten(3, 4)[:, :, :, :q_len]
    return num, den


@functools.cache
def fla_available() -> bool:
    """Whether flash-linear-attention's linear-attention kernels (`fla.ops.linear_attn`) import here."""
    if importlib.util.find_spec("fla") is None:
        return False
    try:
        importlib.import_module("fla.ops.linear_attn")
    except Exception:  # a broken install (Triton missing or mismatched): the PyTorch path stays available
        return False
    return True


def _fla_shifted_causal(
    q: torch.Tensor,
    q_norm: torch.Tensor,
    k: torch.Tensor,
    k_norm: torch.Tensor,
    value: torch.Tensor,
    shift: int,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`_shifted_causal` with the numerator on fla's `chunk_linear_attn` (keys before the first query as its initial
    state) and the normaliser as a prefix sum of the key features."""
    from fla.ops.linear_attn import chunk_linear_attn

    q_len, k_len = q.shape[3], k.shape[2]
    if shift >= k_len:
        return None
    start, group = k_len - q_len, q.shape[2]
    k, k_norm, value = _shifted(shift, k, k_norm, value)
    initial = None
    if start:
        initial = absorb(None, k[:, :, :start], k_norm[:, :, :start], value[:, :, :start]).kv
        initial = initial.repeat_interleave(group, 1).contiguous()  # [B, H, F, Dv]
    # fla's layout: [B, T, H, F]
    queries = q.flatten(1, 2).transpose(1, 2).contiguous()
    keys, values = (x[:, :, start:].repeat_interleave(group, 1).transpose(1, 2).contiguous() for x in (k, value))
    options: dict = {"scale": 1.0, "initial_state": initial, "output_final_state": False, "normalize": False}
    if "head_first" in inspect.signature(chunk_linear_attn).parameters:
        options["head_first"] = False
    out, _ = chunk_linear_attn(queries, keys, values, **options)
    num = out.float().transpose(1, 2).unflatten(1, (k.shape[1], group))  # [B, KV, g, Q, Dv]
    den = torch.einsum("bkgqf,bkqf->bkgq", q_norm, k_norm.cumsum(2)[:, :, start:])
    return num, den


def hybrid_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    features: LinearFeatures,
    *,
    window: int,
    window_weight: torch.Tensor | None,
    scaling: float,
    span: int | None = None,
    key_real: torch.Tensor | None = None,
    state: LinearState | None = None,
    chunk: int = 64,
    backend: LinearBackend = "torch",
    softcap: float | None = None,
) -> torch.Tensor:
    """Hybrid softmax-window + linear attention, chunked (see the module docstring). `state` holds keys older than
    every query's window (they precede `key`); `key_real` `[B, K]` marks real (non-padding) keys; `backend` runs the
    linear part in PyTorch or on flash-linear-attention; `softcap` is the layer's logit softcap (Gemma 2) on the
    window's softmax scores (the linear part has no logits). Returns `[B, Q, H, Dv]`."""
    batch, heads, q_len, _ = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    if span is not None and state is not None:
        raise ValueError("a bounded linear span keeps its keys; it has no prefix state")
    real = key_real.to(query.device) if key_real is not None else query.new_ones(batch, k_len, dtype=torch.bool)
    q = _grouped(query.float(), kv_heads)
    num = q.new_zeros(*q.shape[:-1], value.shape[-1])
    den = q.new_zeros(q.shape[:-1])
    if window > 0:
        weight = window_weight.float() if window_weight is not None else query.new_ones(heads, dtype=torch.float)
        weight = weight.to(query.device).view(kv_heads, heads // kv_heads)
        w_num, w_den = _window_part(q, key.float(), value.float(), window, weight, scaling, real, chunk, softcap)
        num, den = num + w_num, den + w_den
    fq, fqn = _grouped(features.q.float(), kv_heads), _grouped(features.q_norm.float(), kv_heads)
    fk, fkn = features.k.float(), features.k_norm.float()
    if key_real is not None:  # padding keys take no part in the linear sums
        mask = real[:, None, :, None].float()
        fk, fkn = fk * mask, fkn * mask
    v = value.float()
    shifts = [(window, 1.0)] if span is None else [(window, 1.0), (span, -1.0)] if span > window else []
    causal = _fla_shifted_causal if backend == "fla" else _shifted_causal
    for shift, sign in shifts:
        part = causal(fq, fqn, fk, fkn, v, shift, chunk)
        if part is not None:
            num, den = num + sign * part[0], den + sign * part[1]
    if state is not None:
        num = num + torch.einsum("bkgqf,bkfd->bkgqd", fq, state.kv)
        den = den + torch.einsum("bkgqf,bkf->bkgq", fqn, state.k)
    out = num / _safe(den)[..., None]
    return out.flatten(1, 2).transpose(1, 2).to(value.dtype)
