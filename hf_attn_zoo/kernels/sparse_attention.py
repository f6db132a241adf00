"""Static sparse causal attention: one pattern, three execution paths, the same numbers.

A method describes *which keys a query may attend* as an `AttentionPattern` (a vectorised predicate on token
positions, like FlexAttention's `mask_mod`). `sparse_attention` then runs it with:

- `flex`: `torch.compile`d FlexAttention with a `BlockMask` that skips empty 128x128 blocks; what `auto` runs on a
  GPU, where it compiles to Triton and also trains. Forward only on CPU (FlexAttention has no CPU backward). Lengths
  are rounded up to multiples of 1024, so the kernel is compiled once per pattern class and length bucket; the
  `BlockMask` is built once per (pattern, heads, lengths, device) and reused by every layer and step
  (`block_mask_cache_info()`); with padding it is rebuilt per call, since it then depends on the batch.
- `blocks`: SDPA over chunks of 256 queries, each gathering only the 128-key blocks its pattern touches; chunks
  whose gathered keys carry the same mask run as one call, GQA heads folded into the rows. The plan is cached like
  the `BlockMask`s; per-head patterns gather per KV head. It has a backward, and on CPU it is faster than compiled
  flex (`benchmarks/sparse_prefill.py`), so `auto` runs it on CPU for training and inference.
- `masked`: one SDPA call with the pattern as a boolean mask, for short inputs and decode steps (and for caches that
  keep only some positions: `key_positions`).

Under `torch.compile`, `auto` runs `masked` whatever the length (the `blocks` plan is built on the host from the
mask's values) and no path reads a tensor's values on the host: a model compiles without graph breaks.

Positions are counted from each row's first real token, so a left-padded row sees exactly the pattern of the same row
without padding (sinks are its first real tokens). Padding comes from the 2-D attention mask of the model call
(`PaddingTracker`), or, without one, from the mask transformers passes to the attention function.
"""

from __future__ import annotations

import abc
import functools
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .masks import key_padding, left_padding, masked_sdpa, padding_or_none
from .softcap import softcap_attention

__all__ = [
    "AttentionPattern",
    "Backend",
    "PaddingTracker",
    "block_mask_cache_info",
    "clear_block_mask_cache",
    "pattern_mask",
    "sparse_attention",
]

Backend = Literal["auto", "flex", "blocks", "masked"]

FLEX_BLOCK = 128
# below this many query x key pairs one masked SDPA call is cheapest (and what decode steps use): on a GPU up to
# 2048 x 2048; on CPU up to 512 x 512, past which the gathered blocks win for every pattern measured (sliding windows
# of 64-1024, PowerAttention; 0.4-0.8x the masked call's time at 1k, 0.2-0.5x at 2k: benchmarks/masked_cutoff.py)
MASKED_MAX_PAIRS = 1 << 22
MASKED_MAX_PAIRS_CPU = 1 << 18
QUERY_CHUNK = 256  # `blocks`: queries per chunk ...
KEY_BLOCK = 128  # ... and the granularity of the key blocks it gathers (measured best on CPU at 4k-16k)
GATHER_MAX_KEYS = 1 << 16  # gathered keys per SDPA call of `blocks` (bounds the copies)
FLEX_BUCKET = 1024
FLEX_RECOMPILE_LIMIT = 64


class AttentionPattern(abc.ABC):
    """Which keys each query may attend, as a function of positions (counted from the row's first real token).

    Subclasses implement `allowed` with broadcasting torch ops only (it is traced by FlexAttention), and
    `cache_key`, a hashable description of everything `allowed` depends on. Keep numeric parameters in tensors
    (`torch.tensor(window)`): compiled FlexAttention specialises on Python numbers, so every new window would compile
    a new kernel.
    """

    per_head: bool = False  # `allowed` depends on the query-head index

    @abc.abstractmethod
    def allowed(self, q: torch.Tensor, k: torch.Tensor, head: torch.Tensor | None) -> torch.Tensor:
        """Bool tensor, broadcast of `q`, `k` (int64 positions) and `head`: True where query `q` may attend key `k`.

        Must include causality (`k <= q`). `head` is `None` unless `per_head`.
        """

    @abc.abstractmethod
    def cache_key(self) -> Hashable:
        """Hashable identity of the pattern (used to cache `BlockMask`s)."""


class PaddingTracker:
    """The 2-D attention mask of the model call in progress, read by the sparse handlers.

    `install` adds a forward pre-hook (stores the mask) and a forward hook (clears it) on the causal LM. A forward
    that records gradients keeps it until the next call: activation checkpointing recomputes the layers during the
    backward, after the model call returned, and the recomputation must see the padding the forward saw.
    """

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.active = False

    def install(self, model: torch.nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        def before(module, args, kwargs):
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            self.active = True

        def after(module, args, kwargs, output):
            if not torch.is_grad_enabled():
                self.mask, self.active = None, False

        return [
            model.register_forward_pre_hook(before, with_kwargs=True),
            model.register_forward_hook(after, with_kwargs=True),
        ]

    def padding(self, attention_mask, batch: int, total: int) -> torch.Tensor | None:
        """Real tokens `[B, total]` (True = real) over every position seen so far, or `None` without padding."""
        if self.active and self.mask is None:
            return None
        if self.mask is not None:
            mask = self.mask.bool()
            if mask.shape[-1] < total:  # a static cache's unused tail
                mask = F.pad(mask, (0, total - mask.shape[-1]), value=False)
            return padding_or_none(mask[:, :total])
        return key_padding(attention_mask, batch, total)


def pattern_mask(
    pattern: AttentionPattern,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    offsets: torch.Tensor,
    padding: torch.Tensor | None,
    num_heads: int,
) -> torch.Tensor:
    """The pattern as a boolean mask `[B or 1, H or 1, Q, K]` for absolute positions `q_pos` `[Q]`, `k_pos` `[K]`."""
    shift = offsets[:, None, None, None]
    q = q_pos[None, None, :, None] - shift
    k = k_pos[None, None, None, :] - shift
    head = torch.arange(num_heads, device=q_pos.device)[None, :, None, None] if pattern.per_head else None
    mask = pattern.allowed(q, k, head) & (k >= 0)
    if padding is not None:
        mask = mask & padding[:, k_pos][:, None, None, :]
    if not torch.compiler.is_compiling() and not bool(offsets.any()):
        mask = mask[:1]  # one mask for every row (not worth a host sync under torch.compile)
    return mask


def _masked(query, key, value, pattern, q_pos, k_pos, offsets, padding, scaling, dropout):
    mask = pattern_mask(pattern, q_pos, k_pos, offsets, padding, query.shape[1])
    return masked_sdpa(query, key, value, mask, scaling, dropout)


def _softcapped(query, key, value, pattern, q_pos, k_pos, offsets, padding, scaling, dropout, softcap):
    mask = pattern_mask(pattern, q_pos, k_pos, offsets, padding, query.shape[1])
    return softcap_attention(query, key, value, mask, scaling or query.shape[-1] ** -0.5, dropout, softcap)


@dataclass(frozen=True)
class _Group:
    """Units whose gathered keys carry the same mask: one SDPA call (or a few, to bound the copies)."""

    units: torch.Tensor  # [g] index into the units (batch row, query chunk[, KV head])
    keys: torch.Tensor  # [g, n] flat index of the keys each unit gathers (past the end: masked off)
    mask: torch.Tensor  # [1, 1, G * QUERY_CHUNK, n] bool, shared by the units (empty rows all True); 4-D, as SDPA's
    # CPU flash kernel takes 2-D or 4-D masks (a 3-D one sends it to the 3x slower math path)
    empty: torch.Tensor | None  # same shape with n = 1: query rows with no allowed key (zeroed after)


@dataclass(frozen=True)
class _GatherPlan:
    chunks: int  # query chunks per batch row
    per_head: bool  # a unit is one KV head of a chunk (per-head patterns), else every KV head of it
    groups: tuple[_Group, ...]


def _gather_plan(pattern, q_pos, k_pos, offsets, padding, num_heads, kv_heads, batch) -> _GatherPlan:
    """Cut the queries into chunks, find the key blocks each chunk touches, group chunks with equal masks.

    A unit is a chunk of one batch row (all its KV heads share the keys and mask), or for a per-head pattern a chunk
    of one KV head, so each KV head gathers only the span of its own query heads.
    """
    q_len, kv_len = q_pos.shape[0], k_pos.shape[0]
    device = q_pos.device
    chunks, blocks = -(-q_len // QUERY_CHUNK), -(-kv_len // KEY_BLOCK)
    per_row = padding is not None or bool(offsets.any())
    per_head = pattern.per_head
    split = kv_heads if per_head else 1  # units per chunk
    group_size = num_heads // kv_heads
    block_offsets = torch.arange(KEY_BLOCK, device=device)
    # patterns are causal: with keys in position order, a chunk evaluates only the keys up to its last query
    ordered = bool((k_pos[1:] >= k_pos[:-1]).all())
    found: dict[tuple, list[tuple[torch.Tensor, list[int], list[torch.Tensor]]]] = {}  # -> (mask, units, keys)
    for row in range(batch if per_row else 1):
        for chunk in range(chunks):
            start = chunk * QUERY_CHUNK
            q = q_pos[start : start + QUERY_CHUNK]
            real = q.shape[0]
            q = F.pad(q, (0, QUERY_CHUNK - real), value=int(q[-1]))
            seen = int(torch.searchsorted(k_pos, q.max(), right=True)) if ordered else kv_len
            mask = pattern_mask(
                pattern,
                q,
                k_pos[:seen],
                offsets[row : row + 1],
                None if padding is None else padding[row : row + 1],
                num_heads,
            )[0]  # [H or 1, QC, seen]
            mask = F.pad(mask, (0, kv_len - seen))
            mask[:, real:] = False  # the last chunk's padding queries
            for head in range(split):
                heads = mask[head * group_size : (head + 1) * group_size] if per_head else mask
                touched = F.pad(heads, (0, blocks * KEY_BLOCK - kv_len)).unflatten(-1, (blocks, KEY_BLOCK)).any(-1)
                touched = touched.flatten(0, -2).any(0).nonzero().flatten()
                if touched.numel() == 0:
                    touched = touched.new_zeros(1)
                cols = (touched[:, None] * KEY_BLOCK + block_offsets).flatten()
                inside = cols < kv_len
                cols = cols.clamp(max=kv_len - 1)
                rel = heads[..., cols] & inside
                # the G query heads of a KV head share their keys: their rows stack
                rel = rel.reshape(1, -1, cols.shape[0]) if per_head else rel.repeat(1, group_size, 1)
                unit = (row * chunks + chunk) * split + head
                keys = (row * split + head) * kv_len + cols
                candidates = found.setdefault((rel.shape, int(rel.sum())), [])  # equal masks have equal sums
                for mask_, units, unit_keys in candidates:
                    if torch.equal(mask_, rel):
                        units.append(unit)
                        unit_keys.append(keys)
                        break
                else:
                    candidates.append((rel, [unit], [keys]))
    groups = []
    for mask, units, keys in (entry for candidates in found.values() for entry in candidates):
        if not per_row:  # one plan for every batch row
            units = [row * chunks * split + unit for row in range(batch) for unit in units]
            keys = [k + row * split * kv_len for row in range(batch) for k in keys]
        used = mask.flatten(0, -2).any(0)  # drop the gathered keys no query of the group attends (e.g. a sink
        used[0] |= not bool(used.any())  # block's non-sink keys), keeping one for a group of empty rows
        mask, keys = mask[..., used], torch.stack(keys)[:, used]
        empty = ~mask.any(-1, keepdim=True)
        groups.append(
            _Group(
                torch.tensor(units, device=device),
                keys,
                (mask | empty)[None],
                empty[None] if bool(empty.any()) else None,
            )
        )
    return _GatherPlan(chunks, per_head, tuple(groups))


_GATHER_PLANS: OrderedDict[Hashable, _GatherPlan] = OrderedDict()


def _blocks(query, key, value, pattern, q_pos, k_pos, offsets, padding, scaling, dropout, default_positions):
    """Chunks of `QUERY_CHUNK` queries, each over only the `KEY_BLOCK` key blocks its pattern touches.

    Chunks whose gathered keys carry the same mask (every full chunk of a sliding window, every chunk of a
    PowerAttention layer that reads the same number of blocks) run as one SDPA call with one shared mask, the `G`
    query heads of a KV head folded into the query rows (no repeated keys); per-head patterns gather per KV head. The
    plan is cached per pattern and shape like the `BlockMask`s, prefill lengths rounded up to whole chunks (rebuilt
    per call with padding). Gradients flow through the gathers.
    """
    batch, num_heads, real_len, dim = query.shape
    cacheable = default_positions and padding is None and not bool(offsets.any())
    extra = -real_len % QUERY_CHUNK if cacheable and real_len == key.shape[2] else 0
    if extra:
        # a prefill is rounded up to whole chunks: the last chunk's queries are computed anyway and the appended keys
        # come after every real query (causal patterns never attend them), so one plan serves 256 lengths
        query, key, value = (F.pad(t, (0, 0, 0, extra)) for t in (query, key, value))
        q_pos = k_pos = torch.arange(real_len + extra, device=query.device)
    q_len, kv_heads, kv_len = query.shape[2], key.shape[1], key.shape[2]
    cache_key = (
        pattern.cache_key(),
        num_heads if pattern.per_head else None,
        kv_heads,
        batch,
        q_len,
        kv_len,
        str(query.device),
    )
    build = functools.partial(_gather_plan, pattern, q_pos, k_pos, offsets, padding, num_heads, kv_heads, batch)
    plan = _cached(_GATHER_PLANS, cache_key, build) if cacheable else build()
    group = num_heads // kv_heads
    rows = group * QUERY_CHUNK
    heads = 1 if plan.per_head else kv_heads  # KV heads per unit
    queries = F.pad(query, (0, 0, 0, plan.chunks * QUERY_CHUNK - q_len))
    queries = queries.unflatten(1, (kv_heads, group)).unflatten(3, (plan.chunks, QUERY_CHUNK))  # [B, KV, G, C, QC, D]
    queries = queries.permute(0, 3, 1, 2, 4, 5).reshape(-1, heads, rows, dim)  # [units, heads, G * QC, D]
    # keys and values as [heads, B * S * KV / heads, D] (a view for one row), gathered with one flat index per call
    keys, values = (
        t.unflatten(1, (-1, heads)).permute(2, 0, 1, 3, 4).reshape(heads, -1, t.shape[-1]) for t in (key, value)
    )
    out = queries.new_empty(queries.shape[0], heads, rows, value.shape[-1])
    for g in plan.groups:
        step = max(1, GATHER_MAX_KEYS // g.keys.shape[1])
        for start in range(0, g.units.shape[0], step):
            units, index = g.units[start : start + step], g.keys[start : start + step]
            k, v = (
                t.index_select(1, index.flatten()).unflatten(1, index.shape).transpose(0, 1) for t in (keys, values)
            )  # [g, heads, n, D]
            o = F.scaled_dot_product_attention(queries[units], k, v, attn_mask=g.mask, dropout_p=dropout, scale=scaling)
            # under autocast SDPA returns its lower precision: the output keeps the queries' dtype
            o = o.to(out.dtype)
            out.index_copy_(0, units, o if g.empty is None else o.masked_fill(g.empty, 0.0))
    out = out.view(batch, plan.chunks, kv_heads, group, QUERY_CHUNK, -1).permute(0, 2, 3, 1, 4, 5)
    return out.reshape(batch, num_heads, plan.chunks * QUERY_CHUNK, -1)[:, :, :real_len]


_BLOCK_MASKS: OrderedDict[Hashable, object] = OrderedDict()
_BLOCK_MASK_CACHE_SIZE = 64
_stats = {"hits": 0, "misses": 0}


def _cached(cache: OrderedDict, key: Hashable, build):
    """`cache[key]`, built by `build()` on a miss; least recently used entries leave past the size limit."""
    if key in cache:
        _stats["hits"] += 1
        cache.move_to_end(key)
        return cache[key]
    _stats["misses"] += 1
    cache[key] = value = build()
    if len(cache) > _BLOCK_MASK_CACHE_SIZE:
        cache.popitem(last=False)
    return value


def block_mask_cache_info() -> dict[str, int]:
    """Hits, misses and size of the cache of `BlockMask`s (`flex`) and gather plans (`blocks`), one entry per
    pattern and shape."""
    return {**_stats, "size": len(_BLOCK_MASKS) + len(_GATHER_PLANS)}


def clear_block_mask_cache() -> None:
    _BLOCK_MASKS.clear()
    _GATHER_PLANS.clear()
    _stats.update(hits=0, misses=0)


@functools.cache
def _compiled_create_block_mask():
    """`create_block_mask` compiled: eager it evaluates the mask on every (head, query, key) at once with int64
    temporaries (MoA's 9 per-head masks at 8k took 6.4 GB), compiled it works block by block."""
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


def _block_mask(
    pattern: AttentionPattern,
    num_heads: int,
    q_len: int,
    kv_len: int,
    device: torch.device,
    offsets: torch.Tensor,
    padding: torch.Tensor | None,
):
    create_block_mask = _compiled_create_block_mask()
    shift_q = kv_len - q_len
    heads = num_heads if pattern.per_head else None

    if padding is None and not bool(offsets.any()):

        def mask_mod(b, h, q_idx, kv_idx):
            return pattern.allowed(q_idx + shift_q, kv_idx, h if pattern.per_head else None)

        key = (pattern.cache_key(), heads, q_len, kv_len, str(device))
        return _cached(
            _BLOCK_MASKS,
            key,
            lambda: create_block_mask(mask_mod, None, heads, q_len, kv_len, device=device, BLOCK_SIZE=FLEX_BLOCK),
        )

    real = padding if padding is not None else torch.ones(offsets.shape[0], kv_len, dtype=torch.bool, device=device)

    def padded_mask_mod(b, h, q_idx, kv_idx):
        shift = offsets[b]
        allowed = pattern.allowed(q_idx + shift_q - shift, kv_idx - shift, h if pattern.per_head else None)
        return allowed & (kv_idx >= shift) & real[b, kv_idx]

    return create_block_mask(
        padded_mask_mod, offsets.shape[0], heads, q_len, kv_len, device=device, BLOCK_SIZE=FLEX_BLOCK
    )


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(query, key, value, pattern, offsets, padding, scaling):
    q_len = query.shape[2]
    if q_len == key.shape[2]:
        # lengths rounded up to a bucket, so varying inputs reuse a few compiled kernels; the appended keys come
        # after every real query (causal: never attended) and the appended queries are dropped
        extra = -q_len % FLEX_BUCKET
        query, key, value = (F.pad(t, (0, 0, 0, extra)) for t in (query, key, value))
        if padding is not None:
            padding = F.pad(padding, (0, extra), value=False)
    # one compiled kernel (and mask builder) per (pattern class, bucket); above dynamo's default limit of 8 they
    # would silently fall back to the eager reference, which materialises every score
    with torch._dynamo.config.patch(recompile_limit=FLEX_RECOMPILE_LIMIT):
        mask = _block_mask(pattern, query.shape[1], query.shape[2], key.shape[2], query.device, offsets, padding)
        out = _compiled_flex()(
            query.contiguous(),
            key.contiguous(),
            value.contiguous(),
            block_mask=mask,
            scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1],
        )
    return out[:, :, :q_len]


def choose_backend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, compressed: bool) -> str:
    """`auto`: masked for short inputs (`MASKED_MAX_PAIRS`, `MASKED_MAX_PAIRS_CPU`), else flex on a GPU (Triton)
    and blocks on CPU (faster there than compiled flex, which has no CPU backward). Under `torch.compile` always
    masked: the blocks plan is built on the host from the mask's values, and flex keeps its own compiled kernels and
    `BlockMask` cache outside the caller's graph."""
    q_len, kv_len = query.shape[2], key.shape[2]
    cuda = query.device.type == "cuda"
    short = q_len * kv_len <= (MASKED_MAX_PAIRS if cuda else MASKED_MAX_PAIRS_CPU)
    if compressed or short or torch.compiler.is_compiling():
        return "masked"
    return "flex" if cuda and query.shape[-1] == value.shape[-1] else "blocks"


def sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pattern: AttentionPattern,
    *,
    scaling: float | None,
    padding: torch.Tensor | None = None,
    key_positions: torch.Tensor | None = None,
    query_positions: torch.Tensor | None = None,
    dropout: float = 0.0,
    backend: Backend = "auto",
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of `query` over the keys `pattern` allows.

    Args:
        query (`torch.Tensor`): `[B, H, Q, D]` after RoPE; the queries are the last `Q` positions.
        key, value (`torch.Tensor`): `[B, KV, S, D]`, not repeated for GQA (the whole cache when decoding).
        pattern (`AttentionPattern`): the allowed (query, key) pairs.
        scaling (`float`): softmax scale.
        padding (`torch.Tensor`, *optional*): `[B, T]` bool, True for real tokens, over every position seen (`T` is
            `S`, or the number of positions seen when `key_positions` is given).
        key_positions (`torch.Tensor`, *optional*): `[S]` absolute positions of the keys when a cache keeps only
            some of them, in any order (default: `0..S-1`).
        query_positions (`torch.Tensor`, *optional*): `[Q]` absolute positions of the queries (default: the last
            `Q` key positions).
        dropout (`float`): attention dropout (training).
        backend (`str`): `auto`, `flex`, `blocks` or `masked` (see the module docstring).
        softcap (`float`, *optional*): a logit softcap (Gemma 2's eager attention); the scores are then materialised
            whatever the backend, as the family's own eager attention does.

    Returns:
        `[B, Q, H, D]`, the layout transformers' attention functions return.
    """
    batch, _, q_len, _ = query.shape
    device = query.device
    k_pos = key_positions if key_positions is not None else torch.arange(key.shape[2], device=device)
    q_pos = query_positions if query_positions is not None else k_pos[-q_len:]
    offsets = left_padding(padding, batch, device)
    if softcap:
        out = _softcapped(query, key, value, pattern, q_pos, k_pos, offsets, padding, scaling, dropout, softcap)
        return out.transpose(1, 2).contiguous()
    if backend == "auto":
        backend = choose_backend(query, key, value, key_positions is not None)
    if backend == "flex":
        if key_positions is not None:
            raise ValueError("the flex backend needs the keys at positions 0..S-1; use 'masked' with key_positions")
        out = _flex(query, key, value, pattern, offsets, padding, scaling)
    elif backend == "blocks":
        out = _blocks(
            query,
            key,
            value,
            pattern,
            q_pos,
            k_pos,
            offsets,
            padding,
            scaling,
            dropout,
            key_positions is None and query_positions is None,
        )
    elif backend == "masked":
        out = _masked(query, key, value, pattern, q_pos, k_pos, offsets, padding, scaling, dropout)
    else:
        raise ValueError(f"unknown sparse-attention backend {backend!r}; use auto, flex, blocks or masked")
    return out.transpose(1, 2).contiguous()
