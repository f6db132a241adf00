"""MoBA block-sparse attention: per-query top-k key blocks gated by mean-pooled keys, three execution paths.

MoBA: Mixture of Block Attention for Long-Context LLMs (arXiv:2502.13189), Sec. 2. Per query head, the keys of a
row are cut into blocks of `block_size` tokens counted from the row's first real token. A block is represented by
the mean of its keys; the gate is `s = q . mean(K_block)` in fp32 without scaling; future blocks get -inf, the
query's own block +inf; the query attends the union of its top-k blocks (its own block with a token-level causal
mask, so k-1 past blocks), with the usual softmax scale. With GQA a query head gates on its KV head's block means.
An optional layer `window` (Gemma-3's sliding layers) further limits every query to its last `window` keys, and an
optional logit `softcap` (Gemma 2) caps the attention scores, `softcap * tanh(s / softcap)`, before the softmax (not the
gates, which only rank the blocks). SDPA cannot apply a softcap: with one, every path materialises its scores.

Paths, equal up to floating-point error (`naive_moba_attention` is the naive dense-mask definition they are tested
against):

- `masked`: one SDPA call with the token-level mask; short inputs and decode steps. Trains.
- `gather`: FlashMoBA-style gather-and-densify (Optimizing Mixture of Block Attention, arXiv:2511.11571): every
  query attends its own block (one batched causal call over the block diagonal), then, per past key block, the
  queries that selected it are gathered and attend it densely; the partial softmaxes are merged by their
  log-sum-exp. Work is proportional to the selected (query, block) pairs. With gradients it is plain PyTorch ops
  (gradients reach q, k, v and whatever produced them, e.g. the key convolution); CPU inference runs the pieces
  with PyTorch's fused CPU flash kernel, which returns the log-sum-exp (without a gradient for it).
- `flex`: compiled FlexAttention with a `BlockMask` built from block-level indices (`BlockMask.from_kv_blocks`) and
  a lookup `mask_mod` for token-level exactness. Inference only on CPU (no FlexAttention backward there).

`auto` picks `masked` for short inputs and `gather` otherwise. Measured at 8K tokens (B=1, 9 heads, 3 KV heads,
D=64, fp32, 512-token blocks, top-3, 2 busy CPU cores): `gather` 1.8-2.1x faster than SDPA `is_causal` with one
thread; `flex` 3-7x slower than SDPA, because its 128-query blocks visit the union of their queries' per-token
selections (nearly every past block).

Under `torch.compile`, `auto` always picks `masked` (gather sizes its calls from the selection's values, a host sync),
and a left-padded batch runs as one masked call with each row's block grid shifted to its first real token, instead
of one call per distinct padding length.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F

from .masks import left_padding, masked_sdpa
from .softcap import cap_logits, softcap_attention

__all__ = ["Backend", "causal_key_conv", "moba_attention", "naive_moba_attention", "moba_selection"]

Backend = Literal["auto", "masked", "gather", "flex"]

FLEX_BLOCK = 128
# below this many query x key pairs one masked SDPA call is cheapest (the decode steps are always below it)
MASKED_MAX_PAIRS = 1 << 20
_LOW = torch.finfo(torch.float32).min


def causal_key_conv(key: torch.Tensor, weight: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    """Depthwise causal convolution over the sequence (FlashMoBA's key convolution), per KV head and channel.

    Args:
        key (`torch.Tensor`): `[B, KV, S, D]`.
        weight (`torch.Tensor`): `[KV, D, K]`; tap `K-1` weighs the current position, tap `K-1-i` the i-th previous.
        padding (`torch.Tensor`, *optional*): `[B, S]` bool, True for real tokens; padding counts as zeros, so a
            row's first real key sees no earlier key, with or without left padding.
    """
    batch, kv_heads, seq, dim = key.shape
    size = weight.shape[-1]
    if padding is not None:
        key = key * padding[:, None, -seq:, None].to(key.dtype)
    x = key.permute(0, 1, 3, 2).reshape(batch, kv_heads * dim, seq)
    out = F.conv1d(
        F.pad(x, (size - 1, 0)), weight.reshape(kv_heads * dim, 1, size).to(key.dtype), groups=kv_heads * dim
    )
    out = out.reshape(batch, kv_heads, dim, seq).permute(0, 1, 3, 2)
    # in the input's memory layout: downstream kernels round alike, so the identity kernel is bit-exact
    return torch.empty_like(key).copy_(out)


def moba_selection(
    query: torch.Tensor, key: torch.Tensor, block_size: int, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks each query attends, for one group of rows whose first real token is key 0.

    Args:
        query (`torch.Tensor`): `[H, Q, D]`, the last `Q` of the `L` key positions.
        key (`torch.Tensor`): `[G, L, D]` with `H` a multiple of `G` (query head `h` gates on key head `h // (H/G)`).

    Returns:
        `chosen` `[H, Q, n]` bool (block `j` selected), and the block index of each query `[Q]`.
    """
    heads, q_len, _ = query.shape
    kv_heads, length, dim = key.shape
    n = -(-length // block_size)
    with torch.no_grad():
        # fp32 block means and gates (as the paper): bf16 sums over a block lose precision and the top-k ties
        sums = F.pad(key.float(), (0, 0, 0, n * block_size - length)).unflatten(1, (n, block_size)).sum(2)
        counts = (length - torch.arange(n, device=key.device) * block_size).clamp(max=block_size)
        means = sums / counts[:, None]  # [G, n, D]
        gates = query.float().unflatten(0, (kv_heads, heads // kv_heads)) @ means.transpose(-1, -2)[:, None]
        gates = gates.flatten(0, 1)  # [H, Q, n]
        current = torch.arange(length - q_len, length, device=key.device) // block_size
        blocks = torch.arange(n, device=key.device)
        gates = gates.masked_fill(blocks > current[:, None], -math.inf)
        gates = gates.masked_fill(blocks == current[:, None], math.inf)
        values, index = gates.topk(min(top_k, n), dim=-1)
        chosen = torch.zeros_like(gates, dtype=torch.bool).scatter_(-1, index, values > -math.inf)
    return chosen, current


def _masked(query, key, value, chosen, block_size, window, scaling, dropout, softcap):
    q_len, length = query.shape[1], key.shape[1]
    k_pos = torch.arange(length, device=key.device)
    q_pos = k_pos[length - q_len :, None]
    allowed = (k_pos <= q_pos) & (q_pos - k_pos < window if window else True)
    mask = chosen[:, :, k_pos // block_size] & allowed
    if softcap:
        return softcap_attention(query[None], key[None], value[None], mask[None], scaling, dropout, softcap)[0]
    return F.scaled_dot_product_attention(
        query[None],
        key[None],
        value[None],
        attn_mask=mask[None],
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=query.shape[0] != key.shape[0],
    )[0]


def _partial(query, key, value, mask, causal, scaling, dropout, fused, softcap):
    """Softmax attention of `query` `[N, h, R, D]` over `key`/`value` `[N, 1, C, D]`, and its log-sum-exp `[N, h, R]`.

    `causal` is top-left aligned (query `i` attends keys `<= i`); `mask` `[N, h, R, C]` further restricts it.
    `fused` runs PyTorch's CPU flash kernel, which returns the log-sum-exp but gives it no gradient (inference only);
    it cannot apply a `softcap` (callers pass `fused=False` with one).
    """
    if fused:
        # autocast does not cover the raw kernel, which needs one dtype (autocast: bf16 values, fp32 rotated q/k)
        dtype = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
        query, key, value = (t.to(dtype) for t in (query, key, value))
        heads = query.shape[1]
        if heads > 1:
            key, value = (t.expand(-1, heads, -1, -1).contiguous() for t in (key, value))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, is_causal=causal, scale=scaling
        )
        return out.float(), lse
    # fp32 scores, softmax and log-sum-exp: the partial results are merged by their log-sum-exp below
    scores = cap_logits((query @ key.transpose(-1, -2)).float() * scaling, softcap)
    if causal:
        tri = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
        mask = tri if mask is None else mask & tri
    if mask is not None:
        scores = scores.masked_fill(~mask, _LOW)
    m = scores.amax(-1, keepdim=True)
    e = torch.exp(scores - m)
    if mask is not None:
        e = e.masked_fill(~mask, 0.0)
    # rows without an allowed key (a sliding window can empty a block) get weight exp(_LOW) = 0 in the merge
    total = e.sum(-1, keepdim=True).clamp_min(1e-30)
    if dropout:
        e = F.dropout(e, p=dropout)
    out = (e.to(value.dtype) @ value).float() / total
    return out, (m + total.log()).squeeze(-1)


def _gather(query, key, value, chosen, current, block_size, window, scaling, dropout, fused, softcap):
    """Gather-and-densify: each query's own block (one batched causal call over the block diagonal), then, per
    past key block, the queries that selected it; the partial softmaxes are merged by their log-sum-exp."""
    heads, q_len, dim = query.shape
    kv_heads, length, _ = key.shape
    group = heads // kv_heads
    q_first = length - q_len
    device = query.device
    fused = fused and window is None and not softcap
    parts = []

    # own blocks: queries aligned to the block grid (front padding), keys of the same blocks
    first = q_first // block_size
    front = q_first - first * block_size
    n_own = -(-(q_len + front) // block_size)
    grid = n_own * block_size
    q = F.pad(query, (0, 0, front, grid - q_len - front)).unflatten(1, (n_own, block_size))  # [H, n_own, bs, D]
    q = q.unflatten(0, (kv_heads, group)).transpose(1, 2).flatten(0, 1)  # [G * n_own, group, bs, D]
    start = first * block_size
    k, v = (
        F.pad(t[:, start:], (0, 0, 0, start + grid - length)).unflatten(1, (n_own, block_size)).flatten(0, 1)[:, None]
        for t in (key, value)
    )
    mask = None
    if window:
        pos = torch.arange(block_size, device=device)
        mask = pos[:, None] - pos < window
    out, lse = _partial(q, k, v, mask, True, scaling, dropout, fused, softcap)
    out = out.unflatten(0, (kv_heads, n_own)).transpose(1, 2).flatten(0, 1).flatten(1, 2)[:, front : front + q_len]
    lse = lse.unflatten(0, (kv_heads, n_own)).transpose(1, 2).flatten(0, 1).flatten(1, 2)[:, front : front + q_len]
    parts.append((torch.arange(heads * q_len, device=device), lse.flatten(), out.flatten(0, 1)))

    rows = torch.arange(heads, device=device)[:, None] * q_len
    blocks = torch.arange(chosen.shape[-1], device=device)
    past = (chosen & (blocks != current[:, None])).transpose(1, 2)  # [H, n, Q]
    counts = past.sum(-1)  # [H, n]
    widths = counts.amax(0).tolist()
    # per block, the queries that selected it come first in each head's row (stable: in order)
    order = torch.sort(past.to(torch.int8), dim=-1, descending=True, stable=True).indices
    trash = heads * q_len  # padding rows of the gathered queries land in an extra, discarded row
    for j, width in enumerate(widths):
        if width == 0:
            continue
        picked = order[:, j, :width]  # [H, M], padded to the longest row
        q = query.gather(1, picked[..., None].expand(-1, -1, dim)).unflatten(0, (kv_heads, group)).flatten(1, 2)
        start, stop = j * block_size, min((j + 1) * block_size, length)
        mask = None
        if window:
            mask = (picked + q_first)[..., None] - torch.arange(start, stop, device=device) < window
            mask = mask.unflatten(0, (kv_heads, group)).flatten(1, 2)[:, None]
        # one call per KV head: its query heads' rows side by side attend the block's keys (no GQA expansion)
        out, lse = _partial(
            q[:, None],
            key[:, None, start:stop],
            value[:, None, start:stop],
            mask,
            False,
            scaling,
            dropout,
            fused,
            softcap,
        )
        real = torch.arange(width, device=device) < counts[:, j, None]
        index = torch.where(real, rows + picked, trash).flatten()
        parts.append((index, lse.flatten(), out.flatten(0, 2)))

    # the log-sum-exp merge in fp32, cast back to the queries' dtype at the end
    # the shift cancels in the ratio: only a stabiliser, so no gradient through it
    top = torch.full((trash + 1,), _LOW, device=device)
    for index, lse, _ in parts:
        top = top.scatter_reduce(0, index, lse.detach(), "amax")
    num = torch.zeros(trash + 1, parts[0][2].shape[-1], device=device)
    den = torch.zeros(trash + 1, device=device)
    for index, lse, out in parts:
        w = torch.exp(lse - top[index])
        num = num.index_add(0, index, w[:, None] * out)
        den = den.index_add(0, index, w)
    num, den = num[:trash], den[:trash]
    return (num / den[:, None]).unflatten(0, (heads, q_len)).to(query.dtype)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(query, key, value, chosen, block_size, window, scaling, softcap):
    """Compiled FlexAttention over the selected blocks: block-level indices plus a token-level lookup mask."""
    from torch.nn.attention.flex_attention import BlockMask

    heads, q_len, _ = query.shape
    length = key.shape[1]
    n = chosen.shape[-1]
    n_q, n_kv = -(-q_len // FLEX_BLOCK), -(-length // FLEX_BLOCK)
    q_first = length - q_len
    padded = F.pad(chosen, (0, 1, 0, n_q * FLEX_BLOCK - q_len))  # lookups past the end read False
    # a 128-query block visits the union of its queries' blocks, expressed in 128-key flex blocks
    kv_start = torch.arange(n_kv, device=query.device) * FLEX_BLOCK
    first_blk = kv_start // block_size
    last_blk = (torch.clamp(kv_start + FLEX_BLOCK, max=length) - 1) // block_size
    per_q = padded[..., :n].unflatten(1, (n_q, FLEX_BLOCK)).any(2)  # [H, n_q, n]
    spans = torch.arange(n, device=query.device)
    covers = (spans >= first_blk[:, None]) & (spans <= last_blk[:, None])  # [n_kv, n]
    visit = (per_q.float() @ covers.T.float()) > 0  # [H, n_q, n_kv]
    num_blocks = visit.sum(-1, dtype=torch.int32)
    indices = torch.sort(visit.to(torch.int8), dim=-1, descending=True, stable=True).indices.to(torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        pos = q_idx + q_first
        allowed = padded[h, q_idx, kv_idx // block_size] & (kv_idx <= pos)
        return allowed & (pos - kv_idx < window) if window else allowed

    block_mask = BlockMask.from_kv_blocks(
        num_blocks[None], indices[None], BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, seq_lengths=(q_len, length)
    )
    out = _compiled_flex()(
        query[None].contiguous(),
        key[None].contiguous(),
        value[None].contiguous(),
        block_mask=block_mask,
        score_mod=_softcap_mod(softcap) if softcap else None,
        scale=scaling,
        enable_gqa=query.shape[0] != key.shape[0],
    )
    return out[0]


@functools.cache
def _softcap_mod(softcap: float):
    """FlexAttention's `score_mod` for a logit softcap (it receives the scaled score); one per value, so compiled
    kernels are reused across calls and layers."""

    def score_mod(score, b, h, q_idx, kv_idx):
        return cap_logits(score, softcap)

    return score_mod


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _rows(query, key, value, block_size, top_k, window, scaling, dropout, backend, softcap):
    """MoBA for rows that start at key 0: query `[H, Q, D]`, key/value `[G, L, D]` -> `[H, Q, Dv]`."""
    chosen, current = moba_selection(query, key, block_size, top_k)
    if backend == "auto":
        # under torch.compile always masked: gather sizes its calls by the selection's values (host syncs)
        short = query.shape[1] * key.shape[1] <= MASKED_MAX_PAIRS
        backend = "masked" if short or torch.compiler.is_compiling() else "gather"
    if backend == "masked":
        return _masked(query, key, value, chosen, block_size, window, scaling, dropout, softcap)
    if backend == "gather":
        fused = query.device.type == "cpu" and not _needs_grad(query, key, value) and not dropout
        return _gather(query, key, value, chosen, current, block_size, window, scaling, dropout, fused, softcap)
    if backend == "flex":
        if _needs_grad(query, key, value) and query.device.type == "cpu":
            raise ValueError("the flex MoBA backend has no backward on CPU; use backend='gather' for training")
        return _flex(query, key, value, chosen, block_size, window, scaling, softcap)
    raise ValueError(f"unknown MoBA backend {backend!r}; use auto, masked, gather or flex")


def _masked_shifted(query, key, value, offsets, block_size, top_k, window, scaling, dropout, softcap):
    """`_masked` for a whole left-padded batch at once, each row's blocks counted from its first real key
    (`offsets` `[B]`): no host sync, which is what runs under `torch.compile`. `[B, H, Q, Dv]`, zero on padding."""
    batch, heads, q_len, _ = query.shape
    kv_heads, total = key.shape[1], key.shape[2]
    n = -(-total // block_size)
    device = query.device
    pos = torch.arange(total, device=device)
    rel = pos - offsets[:, None]  # [B, S]: positions from each row's first real key, negative on padding
    length = total - offsets  # [B] real keys per row
    with torch.no_grad():
        # the row's keys shifted to start at its first real one (zeros past its end), summed per block as
        # `moba_selection` does; the empty blocks past a row's end are in every query's future
        shifted = key.float().gather(2, (pos + offsets[:, None]).clamp(max=total - 1)[:, None, :, None].expand_as(key))
        shifted = shifted * (pos < length[:, None])[:, None, :, None]
        sums = F.pad(shifted, (0, 0, 0, n * block_size - total)).unflatten(2, (n, block_size)).sum(3)
        counts = (length[:, None] - torch.arange(n, device=device) * block_size).clamp(min=1, max=block_size)
        means = sums / counts[:, None, :, None]  # [B, G, n, D]
        gates = query.float().unflatten(1, (kv_heads, heads // kv_heads)) @ means.transpose(-1, -2)[:, :, None]
        gates = gates.flatten(1, 2)  # [B, H, Q, n]
        current = torch.div(rel[:, total - q_len :], block_size, rounding_mode="floor")[:, None, :, None]
        blocks = torch.arange(n, device=device)
        gates = gates.masked_fill(blocks > current, -math.inf).masked_fill(blocks == current, math.inf)
        values, index = gates.topk(min(top_k, n), dim=-1)
        chosen = torch.zeros_like(gates, dtype=torch.bool).scatter_(-1, index, values > -math.inf)
    q_pos = pos[total - q_len :, None]
    allowed = (pos <= q_pos) & (q_pos - pos < window if window else True)  # [Q, S]
    k_block = rel.clamp(min=0) // block_size
    mask = chosen.gather(-1, k_block[:, None, None, :].expand(batch, heads, q_len, total))
    mask = mask & allowed & (rel >= 0)[:, None, None, :]
    if softcap:
        return softcap_attention(query, key, value, mask, scaling, dropout, softcap).to(query.dtype)
    return masked_sdpa(query, key, value, mask, scaling, dropout).to(query.dtype)  # padding queries: zeros


def moba_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    block_size: int,
    top_k: int,
    scaling: float | None = None,
    padding: torch.Tensor | None = None,
    window: int | None = None,
    dropout: float = 0.0,
    backend: Backend = "auto",
    softcap: float | None = None,
) -> torch.Tensor:
    """MoBA attention of `query` over `key`/`value` (see the module docstring).

    Args:
        query (`torch.Tensor`): `[B, H, Q, D]` after RoPE; the queries are the last `Q` key positions.
        key, value (`torch.Tensor`): `[B, KV, S, D]`, not repeated for GQA (the whole cache when decoding).
        block_size (`int`), top_k (`int`): MoBA's block size and number of selected blocks (current one included).
        scaling (`float`, *optional*): softmax scale (default `1/sqrt(D)`).
        padding (`torch.Tensor`, *optional*): `[B, S]` bool, True for real tokens (left padding: blocks start at
            each row's first real token, and queries before it return zeros).
        window (`int`, *optional*): the layer's sliding window (query `i` attends key `j` only if `i - j < window`).
        dropout (`float`): attention dropout.
        backend (`str`): `auto`, `masked`, `gather` or `flex`.
        softcap (`float`, *optional*): the layer's logit softcap (Gemma 2), `softcap * tanh(s / softcap)` on the
            scaled attention scores before the softmax; the block gates stay uncapped.

    Returns:
        `[B, Q, H, Dv]`, the layout transformers' attention functions return.
    """
    batch, heads, q_len, dim = query.shape
    total = key.shape[2]
    scaling = dim**-0.5 if scaling is None else scaling
    if padding is not None and torch.compiler.is_compiling():
        offsets = left_padding(padding, batch, query.device)
        out = _masked_shifted(query, key, value, offsets, block_size, top_k, window, scaling, dropout, softcap)
        return out.transpose(1, 2)
    offsets = left_padding(padding, batch, query.device)
    firsts = [0] if padding is None else sorted(set(offsets.tolist()))
    if firsts == [0]:
        out = _rows(
            query.flatten(0, 1),
            key.flatten(0, 1),
            value.flatten(0, 1),
            block_size,
            top_k,
            window,
            scaling,
            dropout,
            backend,
            softcap,
        )
        return out.unflatten(0, (batch, heads)).transpose(1, 2)
    out = query.new_zeros(batch, heads, q_len, value.shape[-1])
    # rows with the same left padding share their block boundaries, so they run as one group
    for first in firsts:
        rows = torch.nonzero(offsets == first).flatten()
        skip = max(0, first - (total - q_len))  # queries on padding positions stay zero
        if skip == q_len:
            continue
        part = _rows(
            query[rows, :, skip:].flatten(0, 1),
            key[rows, :, first:].flatten(0, 1),
            value[rows, :, first:].flatten(0, 1),
            block_size,
            top_k,
            window,
            scaling,
            dropout,
            backend,
            softcap,
        )
        # under autocast the masked path's SDPA returns its lower precision: the output keeps the queries' dtype
        part = F.pad(part.unflatten(0, (len(rows), heads)).to(out.dtype), (0, 0, skip, 0))
        out = out.index_put((rows[:, None], torch.arange(heads, device=query.device)), part)
    return out.transpose(1, 2)


def naive_moba_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    block_size: int,
    top_k: int,
    scaling: float | None = None,
    padding: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The naive definition: block means, gates, top-k and one dense masked softmax, in fp32 (tests only)."""
    batch, heads, q_len, dim = query.shape
    total = key.shape[2]
    group = heads // key.shape[1]
    scaling = dim**-0.5 if scaling is None else scaling
    k = key.float().repeat_interleave(group, 1)
    v = value.float().repeat_interleave(group, 1)
    q = query.float()
    offsets = left_padding(padding, batch, query.device)
    pos = torch.arange(total, device=query.device)
    rel_k = pos[None] - offsets[:, None]  # [B, S]
    rel_q = rel_k[:, total - q_len :]  # [B, Q]
    n = -(-total // block_size)
    k_block = torch.where(rel_k >= 0, rel_k // block_size, -1)
    member = (k_block[..., None] == torch.arange(n, device=query.device)).float()  # [B, S, n]
    means = torch.einsum("bhsd,bsn->bhnd", k, member) / member.sum(1).clamp(min=1)[:, None, :, None]
    gates = torch.einsum("bhqd,bhnd->bhqn", q, means)
    q_block = torch.div(rel_q, block_size, rounding_mode="floor")[:, None, :, None]
    blocks = torch.arange(n, device=query.device)
    gates = gates.masked_fill(blocks > q_block, -math.inf).masked_fill(blocks == q_block, math.inf)
    values, index = gates.topk(min(top_k, n), dim=-1)
    chosen = torch.zeros_like(gates, dtype=torch.bool).scatter_(-1, index, values > -math.inf)
    allowed = chosen.gather(-1, k_block.clamp(min=0)[:, None, None, :].expand(batch, heads, q_len, total))
    allowed = allowed & (rel_k >= 0)[:, None, None, :] & (pos <= pos[total - q_len :, None])
    if window:
        allowed = allowed & (pos[total - q_len :, None] - pos < window)
    scores = cap_logits(q @ k.transpose(-1, -2) * scaling, softcap).masked_fill(~allowed, -math.inf)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs @ v).to(query.dtype).transpose(1, 2)
