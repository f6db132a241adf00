"""Combiner attention: full support at sparse cost, by factorising each query's attention over regions.

Combiner: Full Attention Transformer with Sparse Computation Cost (arXiv:2107.05768), Sec. 3-4. Attention is the
expectation `A(x_i) = E_{p(j|i)}[v_j]`; the causal support `{j <= i}` is split into a direct part `Ω_i^0`, attended
exactly, and disjoint regions `Ω_i^r`, each attended through one summary:

    A(x_i) = sum_{j in Ω_i^0} exp(s(q_i, k_j)) / Z v_j + sum_r exp(s(q_i, k_r)) / Z sum_{j in Ω_i^r} p(j|Ω_i^r) v_j

with ONE normaliser `Z = sum_{j in Ω_i^0} exp(s(q_i, k_j)) + sum_r exp(s(q_i, k_r))`, `s(q, k) = q.k * scaling`
(then the layer's logit softcap, if any), the region key `k_r` the max- (or mean-) pool of the region's keys and
`p(j|Ω^r) = softmax_{j in Ω^r} s(q_r, k_j)` with `q_r` the pool of the region's queries: it does not depend on the
query `i`, so each region's value summary is computed once, and every key stays reachable in one layer.

Keys are cut into blocks of `block_size` tokens from each row's first real token. Query `i` in block `c` attends its
last `direct_blocks` blocks (`c - direct_blocks + 1 .. c`, causal) directly, and the row's first `sink_blocks` blocks
too (attention sinks; not in the paper); the blocks between, `[sink_blocks, p)` with `p = c - direct_blocks + 1`,
are covered by regions (`combiner_regions`, counted from block `sink_blocks`):

- `fixed` (Combiner-Fixed): every earlier block is one region (`O(L (s + L/s))`, `O(L sqrt L)` at `s ~ sqrt L`).
- `logsparse` (Combiner-Logsparse): aligned dyadic spans of blocks whose size doubles with the distance (one or two
  per size, nearest first: 1, 1?, 2, 2?, 4, ...), so a query has `O(log L)` regions and the summaries of all spans
  cost `O(L log L)`.

Causality: a region is always a complete block span strictly before the query's direct blocks, so its pooled query
and its summary only use positions before the query; the query's current (partial) block is always direct.
With a layer `window` (sliding-window layers), the support is `i - window < j <= i`: a region counts only where it
lies wholly inside the window, and the window's other keys are attended directly (so the support is still exactly
the layer's own).

Precision: logits, softmax and summaries in fp32, the output in the queries' dtype. `naive_combiner_attention` is
the explicit definition (the `[Q, S]` combined weights, one query at a time) the blockwise `combiner_attention` is
tested against, forward and backward.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F

from .masks import left_padding
from .softcap import cap_logits

__all__ = [
    "Factorisation",
    "Pooling",
    "combiner_attention",
    "combiner_regions",
    "has_regions",
    "naive_combiner_attention",
]

Factorisation = Literal["fixed", "logsparse"]
Pooling = Literal["max", "mean"]

# masked logits: finite, so a row with no allowed entry (grid padding) gives no NaN in the backward
_LOW = torch.finfo(torch.float32).min


def combiner_regions(factorisation: Factorisation, p: int) -> list[tuple[int, int]]:
    """The regions covering blocks `[0, p)`, nearest first, as `(level, index)`: blocks `[index 2^level, (index+1)
    2^level)`.

    `fixed`: every block alone. `logsparse`: one aligned span of `2^level` blocks per level, plus a second one where
    needed to align the rest to the next level, so sizes double with the distance.
    """
    if factorisation == "fixed":
        return [(0, b) for b in range(p - 1, -1, -1)]
    if factorisation != "logsparse":
        raise ValueError(f"unknown Combiner factorisation {factorisation!r}; use fixed or logsparse")
    regions, rest, level = [], p, 0
    while rest > 0:
        size = 1 << level
        regions.append((level, rest // size - 1))
        rest -= size
        if rest > 0 and (rest // size) % 2 == 1:
            regions.append((level, rest // size - 1))
            rest -= size
        level += 1
    return regions


def has_regions(length: int, block_size: int, exact_blocks: int) -> bool:
    """Whether any query of a row of `length` tokens has a region, with `exact_blocks` (direct plus sink blocks)
    attended exactly (else Combiner is exact causal attention)."""
    return length - 1 >= exact_blocks * block_size


def _pool(x: torch.Tensor, dim: int, pooling: Pooling) -> torch.Tensor:
    return x.amax(dim) if pooling == "max" else x.mean(dim)


def _tables(factorisation: Factorisation, n: int, device: torch.device):
    """Per region count `p` in `0..n`: each slot's node index `[n+1, R]`, validity, and (logsparse) each slot's level
    (`R` ints: the kernel loops over them, and ints need no host sync under `torch.compile`).

    Slot `2 l` / `2 l + 1` hold the first / second region of level `l` (`fixed`: slot `r` holds block `r`)."""
    if factorisation == "fixed":
        index = torch.arange(max(n, 1), device=device).expand(n + 1, -1)
        return index, index < torch.arange(n + 1, device=device)[:, None], ()
    nodes = torch.tensor(_logsparse_slots(n), device=device)  # [n + 1, R], -1: an empty slot
    return nodes.clamp(min=0), nodes >= 0, tuple(slot // 2 for slot in range(nodes.shape[1]))


@functools.lru_cache(maxsize=64)
def _logsparse_slots(n: int) -> tuple[tuple[int, ...], ...]:
    """`_tables`' logsparse nodes as plain ints (what `torch.compile` folds into constants), -1 for an empty slot."""
    levels = max(n, 1).bit_length()
    rows = []
    for p in range(n + 1):
        row = [-1] * (2 * levels)
        for level, node in combiner_regions("logsparse", p):
            row[2 * level + (row[2 * level] >= 0)] = node
        rows.append(tuple(row))
    return tuple(rows)


def _summaries(queries, key, value, n_full, levels, block_size, scaling, softcap, pooling):
    """Per level: pooled keys `[G, m, D]` and each span's value summary `[H, m, Dv]` (from its pooled query)."""
    heads, _, dim = queries.shape
    kv_heads = key.shape[0]
    group = heads // kv_heads
    s = block_size
    pooled_k = _pool(key[:, : n_full * s].unflatten(1, (n_full, s)), 2, pooling)
    pooled_q = _pool(queries[:, : n_full * s].unflatten(1, (n_full, s)), 2, pooling)
    out = []
    for level in range(levels):
        m, t = n_full >> level, s << level
        if level:
            # max- and mean-pooling over equal halves compose: a span's pool is the pool of its halves' pools
            pooled_k = _pool(pooled_k[:, : 2 * m].unflatten(1, (m, 2)), 2, pooling)
            pooled_q = _pool(pooled_q[:, : 2 * m].unflatten(1, (m, 2)), 2, pooling)
        k = key[:, : m * t].unflatten(1, (m, t))  # [G, m, t, D]
        v = value[:, : m * t].unflatten(1, (m, t))
        within = torch.einsum("gxmd,gmtd->gxmt", pooled_q.unflatten(0, (kv_heads, group)), k) * scaling
        probs = torch.softmax(cap_logits(within, softcap), dim=-1)
        summary = torch.einsum("gxmt,gmtd->gxmd", probs, v).flatten(0, 1)  # [H, m, Dv]
        out.append((pooled_k, summary))
    return out


def _rows(
    query, queries, key, value, factorisation, block_size, direct_blocks, sink_blocks, pooling, size_bias, scaling,
    window, softcap, dropout,
):  # fmt: skip
    """Combiner for rows whose first real token is key 0: query `[H, Q, D]` (the last `Q` of `L` positions),
    queries `[H, L, D]` (every position's, for the pooled region queries), key `[G, L, D]`, value `[G, L, Dv]`."""
    heads, q_len, dim = query.shape
    kv_heads, length, _ = key.shape
    group = heads // kv_heads
    dim_v = value.shape[-1]
    device = query.device
    s, sb = block_size, sink_blocks
    query, queries, key, value = (t.float() for t in (query, queries, key, value))

    q_first = length - q_len
    c_first, n = q_first // s, -(-length // s)
    nq = n - c_first
    front = q_first - c_first * s
    q = F.pad(query, (0, 0, front, nq * s - q_len - front)).unflatten(1, (nq, s))  # [H, nq, s, D]
    q = q.unflatten(0, (kv_heads, group))  # [G, x, nq, s, D]
    blocks = torch.arange(c_first, n, device=device)  # [nq]
    q_pos = blocks[:, None] * s + torch.arange(s, device=device)  # [nq, s]
    low = q_pos - window + 1 if window else None  # [nq, s]
    # blocks [0, p) are not direct: the sink blocks among them stay exact, the others [sb, p) are regions
    n_full = length // s
    p = (blocks - direct_blocks + 1).clamp(min=0, max=n_full)  # [nq]
    sinks = torch.minimum(p, torch.tensor(sb, device=device))  # [nq]
    n_r = max(n_full - sb, 0)  # complete blocks the regions can use, counted from block sb

    parts_logits: list[torch.Tensor] = []
    parts_values: list[tuple[str, torch.Tensor]] = []

    # regions: the value summary of every complete span (blocks from sb on), then each query block's spans
    levels = 1 if factorisation == "fixed" else max(n_r, 1).bit_length()
    index, valid, slot_level = _tables(factorisation, n_r, device)
    p_r = (p - sb).clamp(min=0)
    summaries = []
    if n_r:
        summaries = _summaries(
            queries[:, sb * s :], key[:, sb * s :], value[:, sb * s :], n_r, levels, s, scaling, softcap, pooling
        )
    slot_index = index[p_r]  # [nq, R] region spans, relative to block sb
    if summaries:
        if factorisation == "fixed":
            keys_r, values_r = summaries[0]  # [G, n_r, D], [H, n_r, Dv]
            region_logits = torch.einsum("gxcqd,gmd->gxcqm", q, keys_r) * scaling
            start = (sb + index[:1]) * s  # [1, R]
            size = torch.full_like(start, s)
        else:
            keys_r = torch.stack([summaries[lv][0][:, slot_index[:, r]] for r, lv in enumerate(slot_level)], 2)
            values_r = torch.stack(
                [summaries[lv][1][:, slot_index[:, r]] for r, lv in enumerate(slot_level)], 2
            )  # [H, nq, R, Dv]
            region_logits = torch.einsum("gxcqd,gcrd->gxcqr", q, keys_r) * scaling  # keys_r [G, nq, R, D]
            levels_r = torch.tensor(slot_level, device=device)
            start = (sb + (slot_index << levels_r)) * s  # [nq, R]
            size = (s << levels_r)[None].expand_as(start)
        region_logits = cap_logits(region_logits, softcap)
        if size_bias:
            region_logits = region_logits + size[:, None, :].float().log()
        used = valid[p_r][:, None, :]  # [nq, 1, R]
        if low is not None:
            used = used & (start[:, None, :] >= low[..., None])
        parts_logits.append(region_logits.masked_fill(~used, _LOW))
        parts_values.append(("fixed" if factorisation == "fixed" else "spans", values_r))

    def direct_mask(k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which keys at `k_pos` `[nq, K]` each query may attend directly `[nq, s, K]` (its causal support less the
        keys its regions cover), and each key's block `[nq, K]`."""
        allowed = (k_pos[:, None, :] <= q_pos[..., None]) & (k_pos >= 0)[:, None, :]
        if low is not None:
            allowed = allowed & (k_pos[:, None, :] >= low[..., None])
        k_block = k_pos.clamp(min=0) // s
        if low is not None and summaries:
            in_regions = (k_block >= sb) & (k_block < p[:, None])  # [nq, K]
            if factorisation == "fixed":
                region_start = k_block * s
            else:
                # the start of the region holding each key block, per query block
                region_start = torch.zeros_like(k_block)
                for r, lv in enumerate(slot_level):
                    first = sb + (slot_index[:, r : r + 1] << lv)
                    inside = valid[p_r][:, r : r + 1] & (k_block >= first) & (k_block < first + (1 << lv))
                    region_start = torch.where(inside, first * s, region_start)
            allowed = allowed & ~(in_regions[:, None, :] & (region_start[:, None, :] >= low[..., None]))
        return allowed, k_block

    # sink blocks: the first sb blocks, for the queries whose direct blocks do not reach them
    if sb:
        width = min(sb * s, length)
        sink_pos = torch.arange(width, device=device).expand(nq, -1)
        allowed, k_block = direct_mask(sink_pos)
        allowed = allowed & (k_block < sinks[:, None])[:, None, :]
        sink_logits = cap_logits(torch.einsum("gxcqd,gkd->gxcqk", q, key[:, :width]) * scaling, softcap)
        parts_logits.insert(0, sink_logits.masked_fill(~allowed, _LOW))
        parts_values.insert(0, ("shared", value[:, :width]))

    # direct part: per query block, the `band` key blocks that can hold direct keys, masked
    band = direct_blocks if not window else max(direct_blocks, -(-(window - 1) // s) + 1)
    band = min(band, n)
    kg, vg = (F.pad(t, (0, 0, (band - 1) * s, n * s - length)).unflatten(1, (n + band - 1, s)) for t in (key, value))
    pick = blocks[:, None] + torch.arange(band, device=device)  # [nq, band] in the front-padded grid
    k_band = kg[:, pick].flatten(2, 3)  # [G, nq, band*s, D]
    k_pos = ((pick - band + 1)[..., None] * s + torch.arange(s, device=device)).flatten(1)  # [nq, band*s]
    allowed, k_block = direct_mask(k_pos)
    allowed = allowed & ~(k_block < sinks[:, None])[:, None, :]
    band_logits = cap_logits(torch.einsum("gxcqd,gckd->gxcqk", q, k_band) * scaling, softcap)
    parts_logits.insert(0, band_logits.masked_fill(~allowed, _LOW))
    parts_values.insert(0, ("band", vg[:, pick].flatten(2, 3)))

    # one softmax over the direct, sink and region logits: Combiner's single normaliser
    probs = torch.softmax(torch.cat(parts_logits, -1), dim=-1)
    if dropout:
        probs = F.dropout(probs, p=dropout)
    out = q.new_zeros(kv_heads, group, nq, s, dim_v)
    offset = 0
    for logits, (kind, values) in zip(parts_logits, parts_values):
        weights = probs[..., offset : offset + logits.shape[-1]]
        offset += logits.shape[-1]
        if kind == "shared":  # [G, K, Dv]
            out = out + torch.einsum("gxcqk,gkd->gxcqd", weights, values)
        elif kind == "band":  # [G, nq, K, Dv]
            out = out + torch.einsum("gxcqk,gckd->gxcqd", weights, values)
        elif kind == "fixed":  # [H, R, Dv]
            out = out + torch.einsum("gxcqk,gxkd->gxcqd", weights, values.unflatten(0, (kv_heads, group)))
        else:  # logsparse regions, per query block [H, nq, R, Dv]
            out = out + torch.einsum("gxcqk,gxckd->gxcqd", weights, values.unflatten(0, (kv_heads, group)))
    out = out.flatten(0, 1).reshape(heads, nq * s, dim_v)
    return out[:, front : front + q_len]


def _shifted_rows(query, region_queries, key, value, offsets, options) -> torch.Tensor:
    """Combiner over a left-padded batch without a host sync (what runs under `torch.compile`): `[B, H, Q, Dv]`.

    Each row is shifted to start at its first real token (`offsets` `[B]`); its tail then repeats the last key, after
    every real position, so causality keeps it out of the real queries' blocks, regions and summaries. Every position
    is a query (a decode call's queries are no longer the last ones), and the real queries' outputs are shifted back;
    padding queries give zeros.
    """
    batch, heads, q_len, _ = query.shape
    total = key.shape[2]
    pos = torch.arange(total, device=query.device)
    index = (pos + offsets[:, None]).clamp(max=total - 1)[:, None, :, None]  # [B, 1, S, 1]
    queries, key, value = (
        t.gather(2, index.expand(-1, t.shape[1], -1, t.shape[-1])) for t in (region_queries, key, value)
    )
    out = torch.stack([_rows(queries[b], queries[b], key[b], value[b], *options) for b in range(batch)])
    back = pos[total - q_len :] - offsets[:, None]  # [B, Q]: each query's shifted position, negative on padding
    out = out.gather(2, back.clamp(min=0)[:, None, :, None].expand(-1, heads, -1, out.shape[-1]))
    return torch.where((back >= 0)[:, None, :, None], out, 0.0)


def combiner_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    factorisation: Factorisation = "fixed",
    block_size: int,
    direct_blocks: int = 1,
    sink_blocks: int = 0,
    pooling: Pooling = "max",
    size_bias: bool = False,
    scaling: float | None = None,
    padding: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    region_queries: torch.Tensor | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Combiner attention of `query` over `key`/`value`, blockwise (see the module docstring).

    Args:
        query (`torch.Tensor`): `[B, H, Q, D]` after RoPE; the queries are the last `Q` key positions.
        key, value (`torch.Tensor`): `[B, KV, S, D]`, not repeated for GQA (the whole cache when decoding).
        factorisation (`str`): `fixed` or `logsparse`.
        block_size (`int`): tokens per block (the finest region).
        direct_blocks (`int`, defaults to 1): the most recent blocks, the query's own included, attended directly.
        sink_blocks (`int`, defaults to 0): each row's first blocks, always attended directly (attention sinks; not
            in the paper): the regions start after them.
        pooling (`str`): `max` (the paper) or `mean`, for the region keys and region queries.
        size_bias (`bool`): add `log |Ω^r|` to each region's logit (the paper does not).
        scaling (`float`, *optional*): softmax scale (default `1/sqrt(D)`).
        padding (`torch.Tensor`, *optional*): `[B, S]` bool, True for real tokens (left padding: blocks start at
            each row's first real token; queries before it return zeros).
        window (`int`, *optional*): the layer's sliding window (query `i` attends key `j` only if `i - j < window`).
        softcap (`float`, *optional*): the layer's logit softcap, applied to every logit (direct, region, within).
        region_queries (`torch.Tensor`, *optional*): `[B, H, S, D]`, the queries of every key position (decode:
            the cached ones), for the pooled region queries; default `query` (then `Q == S`).
        dropout (`float`): attention dropout on the combined weights.

    Returns:
        `[B, Q, H, Dv]`, the layout transformers' attention functions return.
    """
    batch, heads, q_len, dim = query.shape
    total = key.shape[2]
    if region_queries is None:
        if q_len != total:
            raise ValueError("combiner_attention needs the queries of every key position (region_queries)")
        region_queries = query
    if heads % key.shape[1]:
        raise ValueError(f"{heads} query heads do not share {key.shape[1]} key heads evenly")
    scaling = dim**-0.5 if scaling is None else scaling
    options = (
        factorisation, block_size, direct_blocks, sink_blocks, pooling, size_bias, scaling, window, softcap, dropout
    )  # fmt: skip
    offsets = left_padding(padding, batch, query.device)
    if padding is not None and torch.compiler.is_compiling():
        with torch.autocast(query.device.type, enabled=False):
            out = _shifted_rows(query, region_queries, key, value, offsets, options)
        return out.to(query.dtype).transpose(1, 2)
    out = query.new_zeros(batch, heads, q_len, value.shape[-1])
    for first in [0] if padding is None else sorted(set(offsets.tolist())):
        rows = list(range(batch)) if padding is None else torch.nonzero(offsets == first).flatten().tolist()
        skip = max(0, first - (total - q_len))  # queries on padding positions stay zero
        if skip == q_len:
            continue
        # fp32 throughout, also under autocast (which would run the einsums in bf16)
        with torch.autocast(query.device.type, enabled=False):
            part = torch.stack(
                [
                    _rows(
                        query[row, :, skip:],
                        region_queries[row, :, first:],
                        key[row, :, first:],
                        value[row, :, first:],
                        *options,
                    )
                    for row in rows
                ]
            )
        part = F.pad(part.to(out.dtype), (0, 0, skip, 0))
        if len(rows) == batch:
            out = part
        else:
            out = out.index_put((torch.tensor(rows, device=out.device),), part)
    return out.transpose(1, 2)


def naive_combiner_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    factorisation: Factorisation = "fixed",
    block_size: int,
    direct_blocks: int = 1,
    sink_blocks: int = 0,
    pooling: Pooling = "max",
    size_bias: bool = False,
    scaling: float | None = None,
    padding: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    region_queries: torch.Tensor | None = None,
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The explicit definition, one query at a time, in fp32 (tests only): the combined weights `[B, H, Q, S]`
    (each region's mass `exp(s(q_i, k_r)) / Z` spread over its keys by `p(j|Ω^r)`), then `weights @ V`.

    Returns `[B, Q, H, Dv]`, and the weights with `return_weights=True`."""
    batch, heads, q_len, dim = query.shape
    total = key.shape[2]
    group = heads // key.shape[1]
    scaling = dim**-0.5 if scaling is None else scaling
    region_queries = query if region_queries is None else region_queries
    s = block_size
    offsets = left_padding(padding, batch, query.device).tolist()
    rows = []
    for b in range(batch):
        first = offsets[b]
        k = key[b].float().repeat_interleave(group, 0)  # [H, S, D]
        qa = region_queries[b].float()
        row_weights = []
        for t in range(q_len):
            i = total - q_len + t  # absolute position
            weights = query.new_zeros(heads, total, dtype=torch.float32)
            if i < first:
                row_weights.append(weights)
                continue
            rel = i - first
            p = max(0, rel // s - direct_blocks + 1)
            low = max(first, i - window + 1) if window else first
            spans = []
            for level, node in combiner_regions(factorisation, max(0, p - sink_blocks)):
                a, e = (first + (sink_blocks + (node << level)) * s, first + (sink_blocks + ((node + 1) << level)) * s)
                if a >= low:
                    spans.append((a, e))
            covered = torch.zeros(total, dtype=torch.bool)  # positions inside a region
            for a, e in spans:
                covered[a:e] = True
            direct = [j for j in range(low, i + 1) if not covered[j]]
            qi = query[b, :, t].float()
            direct_logits = cap_logits((k[:, direct] @ qi[:, :, None])[..., 0] * scaling, softcap)  # [H, n_direct]
            region_logits = []
            within = []
            for a, e in spans:
                key_r = _pool(k[:, a:e], 1, pooling)
                logit = cap_logits((key_r * qi).sum(-1) * scaling, softcap)
                region_logits.append(logit + (math.log(e - a) if size_bias else 0.0))
                query_r = _pool(qa[:, a:e], 1, pooling)
                scores = (k[:, a:e] @ query_r[:, :, None])[..., 0] * scaling
                within.append(torch.softmax(cap_logits(scores, softcap), -1))
            logits = torch.cat([direct_logits, *[r[:, None] for r in region_logits]], -1)
            probs = torch.softmax(logits, -1)
            direct_index = torch.tensor(direct, dtype=torch.long, device=query.device)
            weights = weights.index_add(1, direct_index, probs[:, : len(direct)])
            for r, (a, e) in enumerate(spans):
                spread = probs[:, len(direct) + r, None] * within[r]
                weights = weights.index_add(1, torch.arange(a, e, device=query.device), spread)
            row_weights.append(weights)
        rows.append(torch.stack(row_weights, 1))  # [H, Q, S]
    weights = torch.stack(rows)  # [B, H, Q, S]
    v = value.float().repeat_interleave(group, 1)
    out = (weights @ v).to(query.dtype).transpose(1, 2)
    return (out, weights) if return_weights else out
