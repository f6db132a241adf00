"""HyperAttention: Long-context Attention in Near-Linear Time (arXiv:2310.05869), in PyTorch.

Non-causal approximation (the paper's Alg. 3 as the official code runs it):

1. sortLSH: `lsh_num_projs` Gaussian projections; the sign bits of a row form a Gray-code word and its bucket is
   the word's rank in the Gray order, so adjacent buckets differ by one bit. Queries and keys are stable-sorted by
   bucket, separately.
2. Exact attention inside matching equal blocks of the sorted orders (`block_size` keys per block, the queries split
   into as many blocks).
3. Residual: `sample_size` keys sampled uniformly with replacement, attended by every query except where a sample
   lies in the query's own diagonal block; `log(n_keys / sample_size)` is added to its log-sum-exp (importance
   weight).
4. The two parts are merged by log-sum-exp and the rows un-sorted.

Causal masking (Sec. 3.2, recursive): up to `min_seq_len` tokens exact causal attention; longer sequences are split
in halves, each half is attended causally by a recursive call, the second-half queries x first-half keys rectangle
by the non-causal approximation (exact below `min_seq_len` queries), merged by log-sum-exp.

Layout: query `[B, H, N, D]`, key/value `[B, KV, N, D]` (GQA groups share their keys, repeated only for the flash
kernel's causal leaves; the value head dim may differ, as in MLA). Internally queries are `[*L, G, N, D]` and keys
`[*L, N, D]`.

The exact parts (leaves, blocks, residual) run the CPU flash kernel, which returns the log-sum-exp, when nothing
needs a gradient (its backward ignores the log-sum-exp's gradient); otherwise, or on other devices, chunked PyTorch
attention, which is differentiable in both outputs. A logit `softcap` (Gemma 2: `softcap * tanh(s / softcap)` on the
scaled scores) applies to the scores of every exact part, so the merged result approximates the softcapped attention
(and equals it in the exact limits); the fused kernel cannot apply it, so with one the PyTorch path runs. The sortLSH
buckets depend on the queries and keys only.

Randomness (projections, then samples) comes from one generator seeded per call, so results are reproducible; the
samples are shared by the rows of a batch, so a row's output does not depend on the rest of its batch.
Official code: https://github.com/insuhan/hyper-attn
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .softcap import cap_logits

__all__ = [
    "attention_with_lse",
    "gray_rank",
    "hyper_attention",
    "hyper_attention_with_lse",
    "merge_attention",
    "padded_hyper_attention",
]

# query rows per exact-attention chunk: bounds the score matrix of the exact leaves
QUERY_CHUNK = 1024


@dataclass(frozen=True)
class _Options:
    scaling: float
    block_size: int
    sample_size: int
    min_seq_len: int
    softcap: float | None = None


def _attend(q, k, v, scaling, mask, softcap=None):
    """Exact attention with log-sum-exp; `mask` (True = attend) broadcasts to `[*L, Nq, Nk]`; `softcap` caps the
    scaled scores.

    Rows that attend no key give zeros and a log-sum-exp of -inf (no NaN, also in the backward).
    """
    groups, n_q = q.shape[-3], q.shape[-2]
    # fp32 scores, softmax and log-sum-exp: the parts are merged by their log-sum-exp
    scores = torch.matmul(q.flatten(-3, -2), k.transpose(-1, -2)).unflatten(-2, (groups, n_q)).float() * scaling
    scores = cap_logits(scores, softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask.unsqueeze(-3), float("-inf"))
    # the max shift cancels in the softmax and in the log-sum-exp, so it carries no gradient
    peak = scores.amax(-1, keepdim=True).detach()
    peak = torch.where(torch.isfinite(peak), peak, 0.0)
    weights = torch.exp(scores - peak)
    total = weights.sum(-1, keepdim=True)
    empty = total == 0
    total = torch.where(empty, 1.0, total)
    probs = (weights / total).to(v.dtype)
    out = torch.matmul(probs.flatten(-3, -2), v).unflatten(-2, (groups, n_q))
    lse = torch.where(empty, float("-inf"), total.log() + peak).squeeze(-1)
    return out, lse


def _fused_op():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _can_fuse(q, k, v) -> bool:
    """The CPU flash kernel returns the log-sum-exp but its backward ignores the log-sum-exp's gradient, so it serves
    inference only; training takes the PyTorch path."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return q.device.type == "cpu" and not needs_grad and q.shape[-1] == v.shape[-1] and _fused_op() is not None


def _fused(q, k, v, scaling, causal, mask):
    """`_exact` with the CPU flash kernel (causal only on square inputs); rows that attend no key give zeros."""
    groups, n_q, n_k = q.shape[-3], q.shape[-2], k.shape[-2]
    lead = k.shape[:-2]
    # autocast does not cover the raw kernel, which needs one dtype (autocast: bf16 values, fp32 rotated q/k)
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        bias = bias.expand(*lead, bias.shape[-2], n_k).reshape(-1, 1, bias.shape[-2], n_k)
    if causal or (bias is not None and bias.shape[-2] > 1):
        # the mask depends on the query, so the group shares its keys by an expand instead of folding
        q4 = q.reshape(-1, groups, n_q, q.shape[-1])
        k4 = k.reshape(-1, 1, n_k, k.shape[-1]).expand(-1, groups, -1, -1).contiguous()
        v4 = v.reshape(-1, 1, n_k, v.shape[-1]).expand(-1, groups, -1, -1).contiguous()
    else:
        q4 = q.reshape(-1, 1, groups * n_q, q.shape[-1])
        k4, v4 = k.reshape(-1, 1, n_k, k.shape[-1]), v.reshape(-1, 1, n_k, v.shape[-1])
    out, lse = _fused_op()(q4, k4, v4, 0.0, causal, attn_mask=bias, scale=scaling)
    out, lse = out.reshape(*lead, groups, n_q, v.shape[-1]), lse.reshape(*lead, groups, n_q)
    if mask is not None:
        empty = ~mask.any(-1).unsqueeze(-2)
        out, lse = out.masked_fill(empty.unsqueeze(-1), 0.0), lse.masked_fill(empty, float("-inf"))
    return out, lse


def _exact(q, k, v, scaling, causal=False, mask=None, softcap=None):
    """Exact attention in query chunks; causal aligns the last query with the last key."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    if not softcap and _can_fuse(q, k, v) and (not causal or n_q == n_k):
        return _fused(q, k, v, scaling, causal, mask)
    if not causal and n_q <= QUERY_CHUNK:
        return _attend(q, k, v, scaling, mask, softcap)
    outs, lses = [], []
    for start in range(0, n_q, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, n_q)
        chunk_mask = mask[..., start:stop, :] if mask is not None and mask.shape[-2] > 1 else mask
        keys = n_k
        if causal:
            keys = stop + n_k - n_q
            rows = torch.arange(start, stop, device=q.device)[:, None] + (n_k - n_q)
            allowed = torch.arange(keys, device=q.device) <= rows
            chunk_mask = allowed if chunk_mask is None else chunk_mask[..., :keys] & allowed
        out, lse = _attend(q[..., start:stop, :], k[..., :keys, :], v[..., :keys, :], scaling, chunk_mask, softcap)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, -2), torch.cat(lses, -1)


def merge_attention(out1, lse1, out2, lse2):
    """Attention over the union of two disjoint key sets from each one's output and log-sum-exp (Alg. 3, line 9).

    `out = c * out1 + (1 - c) * out2` with `c = 1 / (1 + exp(lse2 - lse1))`; `lse = log(exp(lse1) + exp(lse2))`.
    """
    # the weights from fp32 log-sum-exps, cast to each output's dtype
    peak = torch.maximum(lse1, lse2).detach()
    peak = torch.where(torch.isfinite(peak), peak, 0.0)
    w1, w2 = torch.exp(lse1 - peak), torch.exp(lse2 - peak)
    total = w1 + w2
    empty = total == 0
    total = torch.where(empty, 1.0, total)
    out = (w1 / total).unsqueeze(-1).to(out1.dtype) * out1 + (w2 / total).unsqueeze(-1).to(out2.dtype) * out2
    lse = torch.where(empty, float("-inf"), total.log() + peak)
    return out, lse


def gray_rank(bits: torch.Tensor) -> torch.Tensor:
    """The rank in the reflected Gray-code order of the words `bits` `[..., r]` (bit `j` has weight `2^j`).

    Consecutive ranks are words that differ in one bit. The rank inverts `g = b ^ (b >> 1)`: binary bit `j` is the
    XOR of the Gray bits `j..r-1`, a prefix XOR from the most significant bit done by shifts.
    """
    weights = 2.0 ** torch.arange(bits.shape[-1], device=bits.device)
    rank = torch.matmul(bits.float(), weights).long()
    shift = 1
    while shift < bits.shape[-1]:
        rank = rank ^ (rank >> shift)
        shift *= 2
    return rank


def _sort_order(x, projections):
    """Stable sortLSH order of the rows of `x` `[..., N, D]`."""
    # the official code indexes the Gray sequence by the binary word (gray(word)); the paper wants adjacent buckets
    # to differ by one bit, which ranks words in the Gray order (the inverse map)
    # fp32 projections (the generator draws fp32): the same buckets whatever the activations' dtype
    buckets = gray_rank(torch.matmul(x.float(), projections) > 0)
    return torch.sort(buckets, dim=-1, stable=True).indices


def _gather(x, index):
    """Rows `index` `[..., M]` of `x` `[..., N, D]`."""
    return x.gather(-2, index.unsqueeze(-1).expand(*index.shape, x.shape[-1]))


def _block_diagonal(q, k, v, block_size, scaling, softcap):
    """Exact attention of matching equal blocks of sorted queries `[*L, G, Nq, D]` and keys `[*L, Nk, D]`."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    blocks = -(-n_k // block_size)
    query_block = -(-n_q // blocks)
    key_pad, query_pad = blocks * block_size - n_k, blocks * query_block - n_q
    k_blocks = F.pad(k, (0, 0, 0, key_pad)).unflatten(-2, (blocks, block_size))  # [*L, nb, bk, D]
    v_blocks = F.pad(v, (0, 0, 0, key_pad)).unflatten(-2, (blocks, block_size))
    q_blocks = F.pad(q, (0, 0, 0, query_pad)).unflatten(-2, (blocks, query_block)).transpose(-4, -3)
    # the padding keys of the last block are masked out (the official code attends them as zero keys)
    mask = None
    if key_pad:
        mask = (torch.arange(blocks * block_size, device=k.device) < n_k).view(blocks, 1, block_size)
    out, lse = _exact(q_blocks, k_blocks, v_blocks, scaling, mask=mask, softcap=softcap)  # [*L, nb, G, qb, Dv]
    out = out.transpose(-4, -3).flatten(-3, -2)[..., :n_q, :]
    lse = lse.transpose(-3, -2).flatten(-2, -1)[..., :n_q]
    return out, lse, query_block


def _non_causal(q, k, v, options: _Options, projections, draws: list[torch.Tensor]):
    """The sortLSH block-diagonal + uniformly sampled residual approximation (exact below `min_seq_len` queries);
    takes its residual samples from the front of `draws`."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    if n_q < options.min_seq_len:
        return _exact(q, k, v, options.scaling, softcap=options.softcap)
    query_order = _sort_order(q, projections)  # [*L, G, Nq]
    key_order = _sort_order(k, projections)  # [*L, Nk]
    q_sorted = _gather(q, query_order)
    k_sorted, v_sorted = _gather(k, key_order), _gather(v, key_order)
    out, lse, query_block = _block_diagonal(
        q_sorted, k_sorted, v_sorted, options.block_size, options.scaling, options.softcap
    )
    if _samples(n_q, n_k, options):
        # one draw per KV head, shared by the rows of the batch
        picks = draws.pop(0).expand(*k.shape[:-2], options.sample_size)
        own_block = (torch.arange(n_q, device=q.device) // query_block)[:, None] == (picks // options.block_size)[
            ..., None, :
        ]
        res_out, res_lse = _exact(
            q_sorted,
            _gather(k_sorted, picks),
            _gather(v_sorted, picks),
            options.scaling,
            mask=~own_block,
            softcap=options.softcap,
        )
        out, lse = merge_attention(out, lse, res_out, res_lse + math.log(n_k / options.sample_size))
    inverse = torch.argsort(query_order, dim=-1)
    return _gather(out, inverse), lse.gather(-1, inverse)


def _causal(q, k, v, options: _Options, projections, draws: list[torch.Tensor]):
    """Recursive causal HyperAttention: exact diagonal leaves, approximated lower-left rectangles."""
    n = q.shape[-2]
    if n <= options.min_seq_len:
        return _exact(q, k, v, options.scaling, causal=True, softcap=options.softcap)
    # the official code pads odd lengths with a zero row to fold both halves into one call; unequal halves need none
    half = (n + 1) // 2
    up_out, up_lse = _causal(q[..., :half, :], k[..., :half, :], v[..., :half, :], options, projections, draws)
    down_out, down_lse = _causal(q[..., half:, :], k[..., half:, :], v[..., half:, :], options, projections, draws)
    rect_out, rect_lse = _non_causal(q[..., half:, :], k[..., :half, :], v[..., :half, :], options, projections, draws)
    down_out, down_lse = merge_attention(down_out, down_lse, rect_out, rect_lse)
    return torch.cat([up_out, down_out], -2), torch.cat([up_lse, down_lse], -1)


def _samples(n_q: int, n_k: int, options: _Options) -> bool:
    """Whether the rectangle of `n_q` queries over `n_k` keys attends a sampled residual."""
    return n_q >= options.min_seq_len and options.sample_size > 0 and n_k > options.block_size


def _draw_sizes(n: int, causal: bool, options: _Options) -> list[int]:
    """The key count of every rectangle that samples keys, in the order the recursion on `n` tokens reaches them."""
    if not causal:
        return [n] if _samples(n, n, options) else []
    if n <= options.min_seq_len:
        return []
    half = (n + 1) // 2
    rectangle = [half] if _samples(n - half, half, options) else []
    return _draw_sizes(half, True, options) + _draw_sizes(n - half, True, options) + rectangle


def _draw(
    generator: torch.Generator, dim: int, projs: int, sizes: list[int], kv_heads: int, samples: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LSH projections `[D, r]`, then per sampling rectangle (`sizes`: their key counts) the sampled keys of each
    KV head `[len(sizes), KV, samples]`, drawn in that order from `generator`."""
    projections = torch.randn(dim, projs, generator=generator, device=device)
    picks = [torch.randint(n, (kv_heads, samples), generator=generator, device=device) for n in sizes]
    return projections, torch.stack(picks) if picks else torch.empty(
        0, kv_heads, samples, dtype=torch.long, device=device
    )


@torch.library.custom_op("hf_attn_zoo::hyper_attention_draws", mutates_args=())
def _seeded_draws(
    seed: int, dim: int, projs: int, sizes: list[int], kv_heads: int, samples: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_draw` from a generator seeded with `seed`. An operator, so that `torch.compile` (which cannot trace a
    `torch.Generator`) calls it as it is, without a graph break, and the compiled model draws the same numbers."""
    return _draw(torch.Generator(device=device).manual_seed(seed), dim, projs, sizes, kv_heads, samples, device)


@_seeded_draws.register_fake
def _(seed, dim, projs, sizes, kv_heads, samples, device):
    return torch.empty(dim, projs, device=device), torch.empty(
        len(sizes), kv_heads, samples, dtype=torch.long, device=device
    )


def _grouped(query, key):
    """`[B, H, N, D]` queries as `[B, KV, G, N, D]` next to `[B, KV, N, D]` keys."""
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} key/value heads (GQA needs a multiple)")
    return query.unflatten(1, (kv_heads, heads // kv_heads))


def attention_with_lse(
    query, key, value, *, scaling: float | None = None, causal: bool = False, softcap: float | None = None
):
    """Exact attention and its log-sum-exp (chunked over queries, differentiable).

    Args:
        query (`torch.Tensor`): `[B, H, Nq, D]`.
        key, value (`torch.Tensor`): `[B, KV, Nk, D]` and `[B, KV, Nk, Dv]`; `H` a multiple of `KV` (GQA).
        scaling (`float`, *optional*): softmax scale. Default: `D ** -0.5`.
        causal (`bool`): causal mask aligned to the last key. Default: False.
        softcap (`float`, *optional*): logit softcap `softcap * tanh(s / softcap)` on the scaled scores (Gemma 2).

    Returns:
        `out` `[B, H, Nq, Dv]` and `lse` `[B, H, Nq]` (float32).
    """
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    out, lse = _exact(_grouped(query, key), key, value, scaling, causal=causal, softcap=softcap)
    return out.flatten(1, 2), lse.flatten(1, 2)


def hyper_attention_with_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scaling: float | None = None,
    causal: bool = True,
    block_size: int = 256,
    sample_size: int = 256,
    lsh_num_projs: int = 7,
    min_seq_len: int = 4096,
    generator: torch.Generator | None = None,
    seed: int = 0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`hyper_attention` that also returns the log-sum-exp `[B, H, N]` (float32) of each output row."""
    if min(block_size, lsh_num_projs, min_seq_len) < 1 or sample_size < 0:
        raise ValueError("block_size, lsh_num_projs and min_seq_len must be >= 1 and sample_size >= 0")
    if causal and query.shape[2] != key.shape[2]:
        raise ValueError(
            f"causal HyperAttention needs as many queries as keys, got {query.shape[2]} and "
            f"{key.shape[2]} (decode steps attend the cache exactly)"
        )
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    options = _Options(scaling, block_size, sample_size, min_seq_len, softcap or None)
    draw = (query.shape[-1], lsh_num_projs, _draw_sizes(query.shape[2], causal, options), key.shape[1], sample_size)
    if generator is None:
        projections, picks = _seeded_draws(seed, *draw, query.device)
    else:
        projections, picks = _draw(generator, *draw, query.device)
    run = _causal if causal else _non_causal
    out, lse = run(_grouped(query, key), key, value, options, projections, list(picks.unbind(0)))
    return out.flatten(1, 2), lse.flatten(1, 2)


def hyper_attention(query, key, value, **options) -> torch.Tensor:
    """HyperAttention output `[B, H, N, Dv]`.

    Args:
        query (`torch.Tensor`): `[B, H, N, D]` (after RoPE).
        key, value (`torch.Tensor`): `[B, KV, N, D]` and `[B, KV, N, Dv]`; `H` a multiple of `KV` (GQA).
        scaling (`float`, *optional*): softmax scale. Default: `D ** -0.5`.
        causal (`bool`): recursive causal HyperAttention, else the non-causal approximation. Default: True.
        block_size (`int`): keys per sortLSH block. Default: 256.
        sample_size (`int`): uniformly sampled residual keys (0: block-diagonal only). Default: 256.
        lsh_num_projs (`int`): LSH projections (2^r buckets). Default: 7.
        min_seq_len (`int`): exact attention up to this many tokens (causal leaves, short rectangles). Default: 4096.
        generator (`torch.Generator`, *optional*): source of the projections and samples, on the inputs' device.
        seed (`int`): seed of a fresh generator when `generator` is None. Default: 0.
        softcap (`float`, *optional*): the layer's logit softcap (Gemma 2), `softcap * tanh(s / softcap)` on the
            scaled scores of every exact part. Default: None.
    """
    return hyper_attention_with_lse(query, key, value, **options)[0]


def _each_row(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    padding: torch.Tensor,
    scaling: float | None,
    block_size: int,
    sample_size: int,
    lsh_num_projs: int,
    min_seq_len: int,
    seed: int,
    softcap: float | None,
) -> torch.Tensor:
    """`padded_hyper_attention`, eagerly: one causal call per row over its real tokens."""
    rows = []
    for b in range(query.shape[0]):
        index = padding[b].nonzero().squeeze(-1)
        row = query.new_zeros(*query.shape[1:3], value.shape[-1])
        if index.numel():  # else an all-padding row
            out = hyper_attention(
                query[b : b + 1, :, index],
                key[b : b + 1, :, index],
                value[b : b + 1, :, index],
                scaling=scaling,
                block_size=block_size,
                sample_size=sample_size,
                lsh_num_projs=lsh_num_projs,
                min_seq_len=min_seq_len,
                seed=seed,
                softcap=softcap,
            )
            row = row.index_copy(1, index, out[0])
        rows.append(row)
    return torch.stack(rows)


# `_each_row` as one operator: the number of real tokens of a row (which shapes its recursion) is data, so
# `torch.compile` calls the eager rows instead of tracing them (no graph break, the same numbers); `_each_row` itself
# stays the eager path, which keeps its gradients
_rows_op = torch.library.custom_op("hf_attn_zoo::hyper_attention_rows", _each_row, mutates_args=())


@_rows_op.register_fake
def _(query, key, value, padding, *options):
    return query.new_empty(*query.shape[:3], value.shape[-1])


def padded_hyper_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    padding: torch.Tensor,
    *,
    scaling: float | None = None,
    block_size: int = 256,
    sample_size: int = 256,
    lsh_num_projs: int = 7,
    min_seq_len: int = 4096,
    seed: int = 0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal `hyper_attention` of a padded batch, each row over its real tokens alone (`padding` `[B, N]` bool, True
    for real tokens): a row gets exactly the result it gets unpadded; padding queries output zeros. `[B, H, N, Dv]`.

    The rows' lengths are data, which no traced graph can follow: under `torch.compile` they run as one opaque
    operator, for inference (with gradients, Dynamo breaks the graph there and runs them eagerly)."""
    options = (scaling, block_size, sample_size, lsh_num_projs, min_seq_len, seed, softcap)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if torch.compiler.is_compiling() and not needs_grad:
        return _rows_op(query, key, value, padding, *options)
    return _each_row(query, key, value, padding, *options)
