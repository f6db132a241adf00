"""Routing attention (Routing Transformer, Roy et al., TACL 2021, arXiv:2003.05997): a data-dependent sparse mask.

Query `i` of head `h` attends key `j` when `j` is causal and real, and `j` is in the query's local window
(`i - j < window`), or one of the row's first `sinks` tokens, or, for a routing head, `j` belongs to the query's
k-means cluster (`query_clusters[b, h, i] == key_clusters[b, h // group, j]`). Positions are counted from each row's
first real token, so a left-padded row sees the pattern of the same row without padding; padded keys are never
attended and padded query rows return zeros. On a layer with its own sliding window (`span`), no key beyond it is
attended. A layer's logit softcap (Gemma 2) caps every attention score, `softcap * tanh(s / softcap)`, before the
softmax; SDPA and the fused CPU kernel cannot apply it, so with one both paths materialise their scores.

The cluster ids come from the caller (`hf_attn_zoo.patches.routing_attention`); the assignment is not
differentiable, gradients reach `query`, `key` and `value` through the attention itself. Two paths, same numbers:

- `masked`: the mask as a boolean tensor and SDPA, over query chunks that read only the keys up to the chunk's last
  position. Short inputs, decode steps, and the reference the other path is tested against.
- `sorted`: the mask split into two disjoint parts merged by their log-sum-exp: a local part (each block of queries
  reads the sinks and its window of keys) and a routing part (per KV head and cluster, the routing queries of that
  cluster read only that cluster's keys, gathered after sorting by cluster id). Cost `O(N (window + N / clusters))`
  instead of `O(N^2)`. Inference on CPU runs each part with the fused flash kernel behind CPU SDPA (which returns the
  log-sum-exp); with gradients, or on other devices, explicit PyTorch ops. Measured (CPU, 2 threads, no_grad, fp32,
  B=1, H=9, KV=3, D=64, 8192 tokens, 16 clusters, window 256, 4 sinks, 4 routing heads): 0.18 s against 0.54 s for
  `F.scaled_dot_product_attention(is_causal=True)`, 3.0x faster.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from .masks import left_padding, masked_sdpa
from .softcap import cap_logits, softcap_attention

__all__ = [
    "RoutingBackend",
    "naive_routing_attention",
    "routing_attention",
    "routing_attention_benchmark",
    "routing_mask",
]

RoutingBackend = Literal["auto", "masked", "sorted"]

# below this many query x key pairs the masked path is cheapest (it is also what decode steps use)
MASKED_MAX_PAIRS = 1 << 22
QUERY_CHUNK = 512


def routing_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    offsets: torch.Tensor,
    padding: torch.Tensor | None,
    query_clusters: torch.Tensor,
    key_clusters: torch.Tensor,
    routing: torch.Tensor,
    window: int,
    sinks: int,
    span: int | None = None,
) -> torch.Tensor:
    """The allowed (query, key) pairs `[B, H, Q, K]` for absolute positions `q_pos` `[Q]` and `k_pos` `[K]`.

    `query_clusters` `[B, H, Q]`, `key_clusters` `[B, KV, K]` (the keys at `k_pos`), `routing` `[H]` bool (routing
    heads), `padding` `[B, T]` bool over every position seen (True = real) or None, `span` the layer's own sliding
    window (no key at distance `span` or more), or None.
    """
    shift = offsets[:, None, None, None]
    q = q_pos[None, None, :, None] - shift
    k = k_pos[None, None, None, :] - shift
    group = query_clusters.shape[1] // key_clusters.shape[1]
    keys = key_clusters.repeat_interleave(group, dim=1)  # [B, H, K]
    same = routing[None, :, None, None] & (query_clusters[..., :, None] == keys[..., None, :])
    mask = (k >= 0) & (k <= q) & ((q - k < window) | (k < sinks) | same)
    if span is not None:
        mask = mask & (q - k < span)
    if padding is not None:
        mask = mask & padding[:, k_pos][:, None, None, :]
    return mask


def naive_routing_attention(
    query,
    key,
    value,
    query_clusters,
    key_clusters,
    routing,
    *,
    window: int,
    sinks: int,
    scaling: float,
    padding: torch.Tensor | None = None,
    span: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Reference: the dense mask and an explicit softmax (`[B, Q, H, D]`); padded query rows are zero."""
    batch, heads, q_len, _ = query.shape
    k_pos = torch.arange(key.shape[2], device=query.device)
    offsets = left_padding(padding, batch, query.device)
    mask = routing_mask(
        k_pos[-q_len:], k_pos, offsets, padding, query_clusters, key_clusters, routing, window, sinks, span
    )
    group = heads // key.shape[1]
    k, v = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    scores = cap_logits((query.float() @ k.float().transpose(-1, -2)) * scaling, softcap)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return (probs @ v.float()).to(query.dtype).transpose(1, 2)


def _masked(
    query, key, value, q_pos, k_pos, offsets, padding, qc, kc, routing, window, sinks, span, scaling, dropout, softcap
):
    outs = []
    for start in range(0, query.shape[2], QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, query.shape[2])
        # causal: the chunk reads no key after its last query (the queries are the last keys' positions)
        last = key.shape[2] - query.shape[2] + stop
        mask = routing_mask(
            q_pos[start:stop],
            k_pos[:last],
            offsets,
            padding,
            qc[:, :, start:stop],
            kc[:, :, :last],
            routing,
            window,
            sinks,
            span,
        )
        q, k, v = query[:, :, start:stop], key[:, :, :last], value[:, :, :last]
        if softcap:
            outs.append(softcap_attention(q, k, v, mask, scaling, dropout, softcap))
        else:
            outs.append(masked_sdpa(q, k, v, mask, scaling, dropout))
    return torch.cat(outs, dim=2)


def _safe(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def _bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as an additive float mask (0 allowed, -inf masked)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _partial(q, k, v, bias, empty, scaling, softcap):
    """Softmax attention under an additive mask, with its log-sum-exp: `(out [B, H, n, Dv], lse [B, H, n])` in fp32.

    `q` `[B, H, n, D]`, `k`/`v` `[B, H, m, D]`, `bias` broadcastable to `[B, H, n, m]`, `empty` (rows with no allowed
    key) broadcastable to `[B, H, n]`: those rows give `out = 0`, `lse = -inf`. Inference on CPU runs the fused flash
    kernel behind CPU SDPA (which also returns the log-sum-exp); with gradients or a `softcap` (the fused kernel
    cannot apply it), explicit PyTorch ops.
    """
    if (
        q.device.type == "cpu"
        and not softcap
        and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    ):
        # autocast does not cover the raw kernel, which needs one dtype (autocast: bf16 values, fp32 rotated q/k)
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
        q, k, v = (t.to(dtype) for t in (q, k, v))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, attn_mask=bias.to(q.dtype), scale=scaling
        )
        return out.float(), lse.float().masked_fill(empty, float("-inf"))
    # fp32 scores and log-sum-exp: the local and routing parts are merged by their log-sum-exp
    scores = cap_logits((q.float() @ k.float().transpose(-1, -2)) * scaling, softcap) + bias.float()
    # empty rows get finite scores, so that the backward of logsumexp gives no NaN; their output is zeroed below
    scores = scores.masked_fill(empty[..., None], 0.0)
    lse = torch.logsumexp(scores, dim=-1)
    out = (torch.exp(scores - lse[..., None]) @ v.float()).masked_fill(empty[..., None], 0.0)
    return out, lse.masked_fill(empty, float("-inf"))


def _local_part(query, key, value, q_pos, offsets, real, window, sinks, span, scaling, softcap):
    """Every head: sinks + window, by query blocks that read only those keys. `(out [B,H,Q,Dv], lse [B,H,Q])`."""
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    device = query.device
    sink_end = sinks + int(offsets.max())
    reach = min(window, span or window)
    # without padding, blocks away from the start share one mask: build it once
    shared = real is None and not bool(offsets.any())
    masks: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    outs, lses = [], []
    # query blocks about as long as the window: each reads block + window keys
    chunk = min(QUERY_CHUNK, max(128, window))
    for start in range(0, q_len, chunk):
        stop = min(start + chunk, q_len)
        n = stop - start
        first, last = int(q_pos[start]), int(q_pos[stop - 1])
        low = max(0, first - reach + 1)
        sink_cols = min(sink_end, low)
        signature = (n, sink_cols, first - low, last + 1 - low, low if low < sink_end else -1)
        if not shared or signature not in masks:
            cols = torch.cat([torch.arange(sink_cols, device=device), torch.arange(low, last + 1, device=device)])
            rq = q_pos[start:stop][None, :, None] - offsets[:, None, None]  # [B, n, 1]
            rk = cols[None, None, :] - offsets[:, None, None]  # [B, 1, m]
            mask = (rk >= 0) & (rk <= rq) & ((rq - rk < window) | (rk < sinks))
            if span is not None:
                mask = mask & (rq - rk < span)
            if real is not None:
                mask = mask & real[:, cols][:, None, :]
            # GQA without repeating keys: the query heads of a KV head are stacked as rows
            masks[signature] = (
                _bias(mask, query.dtype)[:, None].repeat(1, 1, group, 1),
                ~mask.any(-1)[:, None].repeat(1, 1, group),
            )
        bias, empty = masks[signature]
        k, v = key[:, :, low : last + 1], value[:, :, low : last + 1]
        if sink_cols:
            k = torch.cat([key[:, :, :sink_cols], k], dim=2)
            v = torch.cat([value[:, :, :sink_cols], v], dim=2)
        q = query[:, :, start:stop].reshape(batch, kv_heads, group * n, dim)
        out, lse = _partial(q, k, v, bias, empty, scaling, softcap)
        outs.append(out.reshape(batch, heads, n, -1))
        lses.append(lse.reshape(batch, heads, n))
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _routing_part(
    query, key, value, q_pos, k_pos, offsets, real, qc, kc, routing, window, sinks, span, scaling, softcap
):
    """Routing heads: same-cluster keys outside the local part, gathered per (row, KV head, cluster)."""
    batch, heads, q_len, _ = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    dv = value.shape[-1]
    device = query.device
    out_rows, lse_rows = [], []
    for b in range(batch):
        rq_all = q_pos - offsets[b]
        rk_all = k_pos - offsets[b]
        valid_k = rk_all >= 0 if real is None else (rk_all >= 0) & real[b, k_pos]
        valid_q = valid_k[-q_len:]
        rows_b, outs_b, lses_b = [], [], []
        for g in range(kv_heads):
            heads_g = torch.nonzero(routing[g * group : (g + 1) * group]).flatten() + g * group
            if heads_g.numel() == 0:
                continue
            q_clusters = torch.where(valid_q, qc[b, heads_g], -1).flatten()  # [hg * Q], -1: no routing
            k_clusters = torch.where(valid_k & (rk_all >= sinks), kc[b, g], -1)
            # stable: within a cluster, keys stay in position order
            q_order = torch.argsort(q_clusters, stable=True)
            k_order = torch.argsort(k_clusters, stable=True)
            classes = int(max(q_clusters.max(), k_clusters.max())) + 2
            q_bounds = torch.bincount(q_clusters + 1, minlength=classes).cumsum(0).tolist()
            k_bounds = torch.bincount(k_clusters + 1, minlength=classes).cumsum(0).tolist()
            q_flat = query[b, heads_g].reshape(-1, query.shape[-1])
            rq_flat = rq_all.repeat(heads_g.numel())
            for c in range(1, classes):
                rows = q_order[q_bounds[c - 1] : q_bounds[c]]
                cols = k_order[k_bounds[c - 1] : k_bounds[c]]
                if rows.numel() == 0 or cols.numel() == 0:
                    continue
                rq = rq_flat[rows]
                # disjoint from the local part: only keys outside the window (sinks were excluded above)
                distance = rq[:, None] - rk_all[cols][None, :]
                mask = distance >= window
                if span is not None:
                    mask = mask & (distance < span)
                    empty = ~mask.any(-1)
                else:
                    empty = rq - rk_all[cols[0]] < window  # the cluster's earliest key is the farthest
                out, lse = _partial(
                    q_flat[rows][None, None],
                    key[b, g, cols][None, None],
                    value[b, g, cols][None, None],
                    _bias(mask, query.dtype),
                    empty,
                    scaling,
                    softcap,
                )
                rows_b.append(heads_g[rows // q_len] * q_len + rows % q_len)
                outs_b.append(out[0, 0])
                lses_b.append(lse[0, 0])
        out_b = torch.zeros(heads * q_len, dv, device=device)
        lse_b = torch.full((heads * q_len,), float("-inf"), device=device)
        if rows_b:
            index = torch.cat(rows_b)
            out_b = out_b.index_copy(0, index, torch.cat(outs_b))
            lse_b = lse_b.index_copy(0, index, torch.cat(lses_b))
        out_rows.append(out_b.reshape(heads, q_len, dv))
        lse_rows.append(lse_b.reshape(heads, q_len))
    return torch.stack(out_rows), torch.stack(lse_rows)


def _sorted(query, key, value, q_pos, k_pos, offsets, padding, qc, kc, routing, window, sinks, span, scaling, softcap):
    local_out, local_lse = _local_part(
        query, key, value, q_pos, offsets, padding, window, sinks, span, scaling, softcap
    )
    if not bool(routing.any()):
        return local_out.to(query.dtype)
    route_out, route_lse = _routing_part(
        query, key, value, q_pos, k_pos, offsets, padding, qc, kc, routing, window, sinks, span, scaling, softcap
    )
    # the log-sum-exp merge in fp32, cast back to the queries' dtype
    lse = _safe(torch.logaddexp(local_lse, route_lse))
    out = local_out * torch.exp(local_lse - lse)[..., None] + route_out * torch.exp(route_lse - lse)[..., None]
    return out.to(query.dtype)


def routing_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_clusters: torch.Tensor,
    key_clusters: torch.Tensor,
    routing: torch.Tensor,
    *,
    window: int,
    sinks: int,
    scaling: float | None,
    padding: torch.Tensor | None = None,
    span: int | None = None,
    dropout: float = 0.0,
    backend: RoutingBackend = "auto",
    softcap: float | None = None,
) -> torch.Tensor:
    """Routing attention of `query` over `key`/`value` (see the module docstring).

    Args:
        query (`torch.Tensor`): `[B, H, Q, D]`; the queries are the last `Q` of the `S` positions.
        key, value (`torch.Tensor`): `[B, KV, S, D]`, not repeated for GQA (the whole cache when decoding).
        query_clusters (`torch.Tensor`): `[B, H, Q]` cluster id of every query (read for routing heads only).
        key_clusters (`torch.Tensor`): `[B, KV, S]` cluster id of every key.
        routing (`torch.Tensor`): `[H]` bool, True for routing heads (the others are local: sinks + window).
        window (`int`): keys per query in the local window, the query included.
        sinks (`int`): initial real tokens every query attends.
        scaling (`float`): softmax scale (default `D ** -0.5`).
        padding (`torch.Tensor`, *optional*): `[B, S]` bool, True for real tokens.
        span (`int`, *optional*): the layer's own sliding window (Mistral, Gemma 3's local layers): no key at this
            distance or more is attended, whatever the routing.
        dropout (`float`): attention dropout (masked path only).
        backend (`str`): `auto` (masked for short inputs, decode steps, dropout and under `torch.compile`; sorted
            otherwise), `masked` or `sorted`.
        softcap (`float`, *optional*): the layer's logit softcap (Gemma 2), `softcap * tanh(s / softcap)` on the
            scaled scores before the softmax.

    Returns:
        `[B, Q, H, D]`, the layout transformers' attention functions return.
    """
    batch, _, q_len, dim = query.shape
    scaling = dim**-0.5 if scaling is None else scaling
    k_pos = torch.arange(key.shape[2], device=query.device)
    q_pos = k_pos[-q_len:]
    offsets = left_padding(padding, batch, query.device)
    routing = routing.to(query.device)
    if backend == "auto":
        # under torch.compile always masked: sorted sizes its gathers by the cluster counts (host syncs)
        short = q_len * key.shape[2] <= MASKED_MAX_PAIRS
        backend = "masked" if dropout or short or torch.compiler.is_compiling() else "sorted"
    if backend == "masked":
        out = _masked(
            query,
            key,
            value,
            q_pos,
            k_pos,
            offsets,
            padding,
            query_clusters,
            key_clusters,
            routing,
            window,
            sinks,
            span,
            scaling,
            dropout,
            softcap,
        )
    elif backend == "sorted":
        if dropout:
            raise ValueError("the sorted routing-attention path has no dropout; use backend='masked'")
        out = _sorted(
            query,
            key,
            value,
            q_pos,
            k_pos,
            offsets,
            padding,
            query_clusters,
            key_clusters,
            routing,
            window,
            sinks,
            span,
            scaling,
            softcap,
        )
    else:
        raise ValueError(f"unknown routing-attention backend {backend!r}; use auto, masked or sorted")
    return out.transpose(1, 2).contiguous()


def routing_attention_benchmark(
    num_clusters: int,
    window: int,
    scaling: float | None,
    sinks: int = 4,
    routing_heads: int | None = None,
    seed: int = 0,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """`fn(query, key, value) -> [B, Q, H, D]`: one routing layer's inference work, for attention-level benchmarks.

    Like a freshly patched layer: random unit centroids per KV head (from `seed`), nearest-centroid assignment of the
    normalised queries of the routing heads (default: the last half) and of the keys (timed with the attention),
    then `routing_attention` with `backend="auto"`.
    """

    def run(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        heads, kv_heads = query.shape[1], key.shape[1]
        routing = torch.zeros(heads, dtype=torch.bool, device=query.device)
        routing[heads - (heads // 2 if routing_heads is None else routing_heads) :] = True
        generator = torch.Generator().manual_seed(seed)
        means = F.normalize(torch.randn(kv_heads, num_clusters, query.shape[-1], generator=generator), dim=-1)
        means = means.to(query.device, torch.float32)
        key_clusters = torch.einsum("bksd,kcd->bksc", F.normalize(key.float(), dim=-1), means).argmax(-1)
        query_means = means.repeat_interleave(heads // kv_heads, dim=0)
        query_clusters = torch.einsum("bhqd,hcd->bhqc", F.normalize(query.float(), dim=-1), query_means).argmax(-1)
        return routing_attention(
            query, key, value, query_clusters, key_clusters, routing, window=window, sinks=sinks, scaling=scaling
        )

    return run
