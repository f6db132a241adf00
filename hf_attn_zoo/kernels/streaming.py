"""StreamingLLM positions for decoding past the prefill ("Efficient Streaming Language Models with Attention Sinks",
arXiv:2309.17453, Sec. 3.2): positions are counted *inside the cache*, not in the text.

The cache holds the `sinks` first tokens and the last `window` positions. StreamingLLM (and transformers v4's
`SinkCache`) gives them the cache positions `0..sinks-1` and `sinks..sinks+window-1` and the query the last one. RoPE
scores depend only on the distance between query and key, and the window keys are contiguous and end at the query, so
their distances are the same in text and cache positions; only the sinks move closer: a query at text position `p`
sees sink `s` at distance `sinks + window - 1 - s` instead of `p - s`. Here the keys keep their text positions (as
`SinkWindowLayer` stores them) and each query is rotated back by `delta = max(0, p - (sinks + window - 1))` for its
scores against the sinks only; the result equals re-rotating the whole cache at cache positions (tested), and every
distance stays below `sinks + window`, so decoding can run past `max_position_embeddings`.

A layer's logit softcap (Gemma 2) caps the scaled scores, `softcap * tanh(s / softcap)`, before every softmax here;
the secondary-sink scores of `sink_cache_attention` rank tokens by their raw logits (they are no softmax input).
"""

from __future__ import annotations

import torch

from ..errors import InvalidOptionError
from .masks import left_padding
from .softcap import cap_logits

__all__ = [
    "StreamingPositions",
    "extra_sink_spans",
    "naive_sink_cache_attention",
    "rotate",
    "sink_cache_attention",
    "streaming_rotary",
]

# RoPE variants whose frequencies do not depend on the sequence length (dynamic NTK and LongRoPE switch with it)
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE rotation of `x` `[..., Q, D]` by `positions` (broadcast to `[..., Q]`), in transformers' half-split layout
    (`rotate_half`); a negative position rotates back."""
    angles = positions.to(inv_freq.dtype)[..., None] * inv_freq  # [..., Q, D/2]
    angles = torch.cat([angles, angles], dim=-1)
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * angles.cos() + rotated_half * angles.sin()).to(x.dtype)


def streaming_rotary(model: torch.nn.Module, head_dim: int) -> torch.Tensor:
    """The inverse frequencies of `model`'s RoPE, or one clear error when StreamingLLM positions cannot apply."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None:
        raise InvalidOptionError(
            "sliding_window: stream=True needs a model with rotary position embeddings "
            "(`rotary_emb`); use stream=False."
        )
    if not isinstance(getattr(rotary, "inv_freq", None), torch.Tensor):
        raise InvalidOptionError(
            "sliding_window: stream=True is not supported on models whose RoPE differs per layer "
            "type (e.g. Gemma 3's local and global layers); use stream=False."
        )
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type not in _STATIC_ROPE:
        raise InvalidOptionError(
            f"sliding_window: stream=True needs RoPE frequencies that do not change with the "
            f"length; this model uses rope_type={rope_type!r} ({', '.join(_STATIC_ROPE)} work)."
        )
    if rotary.inv_freq.numel() * 2 != head_dim:
        raise InvalidOptionError(
            f"sliding_window: stream=True needs RoPE on the whole head ({head_dim} dims), this "
            f"model rotates {rotary.inv_freq.numel() * 2}; use stream=False."
        )
    return rotary.inv_freq


class StreamingPositions:
    """Attention of decode-time queries over a `SinkWindowLayer` cache with StreamingLLM's cache positions."""

    def __init__(self, inv_freq: torch.Tensor, sinks: int, window: int):
        self.inv_freq, self.sinks, self.window = inv_freq, sinks, window

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_positions: torch.Tensor,
        query_positions: torch.Tensor,
        padding: torch.Tensor | None,
        scaling: float | None,
        softcap: float | None = None,
        span: int | None = None,
    ) -> torch.Tensor:
        """`query` `[B, H, Q, D]` at text positions `query_positions` `[Q]`; `key`/`value` `[B, KV, K, D]` (the cache,
        GQA not repeated) at `key_positions` `[K]`; `padding` `[B, T]` (True = real token) or None; `scaling` (default
        `D ** -0.5`); `softcap` the layer's logit softcap or None; `span` the layer's own sliding window (Gemma 2's
        local layers: no key at this distance or more, sinks included) or None. Returns `[B, Q, H, D]`."""
        batch, heads = query.shape[:2]
        group = heads // key.shape[1]
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        offsets = left_padding(padding, batch, query.device)[:, None]  # [B, 1]: each row's first real position
        q_rel = query_positions[None, :] - offsets  # [B, Q]
        k_rel = key_positions[None, :] - offsets  # [B, K]
        distance = q_rel[:, :, None] - k_rel[:, None, :]  # [B, Q, K]
        sink = (k_rel >= 0) & (k_rel < self.sinks)
        allowed = (distance >= 0) & (k_rel[:, None, :] >= 0) & ((distance < self.window) | sink[:, None, :])
        if span is not None:
            allowed = allowed & (distance < span)
        if padding is not None:
            allowed = allowed & padding[:, key_positions][:, None, :]
        delta = (q_rel - (self.sinks + self.window - 1)).clamp(min=0)  # [B, Q]
        shifted = rotate(query, -delta[:, None, :], self.inv_freq.to(query.device))
        scores = torch.where(sink[:, None, None, :], shifted @ key.transpose(-1, -2), query @ key.transpose(-1, -2))
        # fp32 softmax, cast back to the values' dtype
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        scores = cap_logits(scores.float() * scaling, softcap).masked_fill(~allowed[:, None], float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # padding queries attend nothing: zeros
        return (weights.to(value.dtype) @ value).transpose(1, 2).contiguous()


QUERY_CHUNK = 256
ROTATE_CHUNK = 64


def _repeat(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def extra_sink_spans(
    scores: torch.Tensor, k_rel: torch.Tensor, candidate: torch.Tensor, held: torch.Tensor, extra: int, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """When each candidate is one of its row's `extra` kept sinks: `(appear, drop)` `[B, K]` (float, row-relative
    positions), visible past the window to the queries `appear <= q < drop`.

    A middle token leaves the window at `appear = k + window` (a held extra: -inf) with its final score; keeping the
    best `extra` of all that left (greedily, as a cache does token by token) keeps exactly the top `extra` of every
    token that left so far, so a candidate is dropped when the `extra`-th better candidate has appeared.
    """
    inf = torch.tensor(float("inf"), device=scores.device)
    appear = torch.where(held, -inf, (k_rel + window).to(scores.dtype))
    if extra == 0:  # nothing is kept past the window
        return appear, appear.clone()
    drop = torch.full_like(scores, float("inf"))
    if scores.shape[1] < extra:  # fewer keys than extras: no candidate is ever dropped
        return appear, drop
    for start in range(0, scores.shape[1], 1024):  # [B, 1024, K] comparisons at a time
        rows = slice(start, start + 1024)
        # candidate k ranks above row candidate c: a higher score, or the same and an earlier position
        s_c, s_k = scores[:, rows, None], scores[:, None, :]
        earlier = k_rel[:, None, :] < k_rel[:, rows, None]
        better = candidate[:, None, :] & ((s_k > s_c) | ((s_k == s_c) & earlier))
        drop[:, rows] = torch.where(better, appear[:, None, :], inf).kthvalue(extra, dim=-1).values
    return appear, drop


def _rotated_scores(
    query: torch.Tensor, key: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor
) -> torch.Tensor:
    """`q . k` with the query rotated back by `delta` `[B, Q, K]` per pair (RoPE, half-split layout): `[B, H, Q, K]`.

    With `z = x[:D/2] + i x[D/2:]`, RoPE multiplies `z` by `exp(i theta p)`, so the score at a distance shorter by
    `delta` is `sum_f Re(z_q conj(z_k)) cos(theta_f delta) + Im(z_q conj(z_k)) sin(theta_f delta)`."""
    half = query.shape[-1] // 2
    qa, qb = query[..., None, :half].float(), query[..., None, half:].float()  # [B, H, Q, 1, F]
    ka, kb = key[:, :, None, :, :half].float(), key[:, :, None, :, half:].float()  # [B, H, 1, K, F]
    angle = delta[:, None, :, :, None].float() * inv_freq.float()  # [B, 1, Q, K, F]
    real, imag = qa * ka + qb * kb, qb * ka - qa * kb
    return (real * angle.cos() + imag * angle.sin()).sum(-1)


def sink_cache_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_positions: torch.Tensor,
    query_positions: torch.Tensor,
    held: torch.Tensor,
    scores: torch.Tensor,
    padding: torch.Tensor | None,
    sinks: int,
    extra: int,
    window: int,
    scaling: float,
    inv_freq: torch.Tensor | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sinks + window + up to `extra` secondary sinks per row, detected online: one attention step.

    A token's sink score is the sum, over the `window` queries that see it in the window, of its mean logit over the
    query heads (the logits are at text distance in the window, so prefill and decoding agree); when it leaves the
    window it is kept if it is among the row's `extra` best so far (`extra_sink_spans`). Query `i` attends key `j <= i`
    when `j < sinks`, `i - j < window`, or `j` is a kept extra at `i`. The whole step is exact in any split of the
    sequence into calls (the prefill, then chunks or single tokens): the scores need only queries and keys, never the
    attention weights.

    With `inv_freq` (StreamingLLM positions), a key outside the window is seen at its distance inside the cache,
    `window + (kept keys after it)`, as if the cache were re-indexed `0..n-1` (sinks, extras, window in text order);
    the keys keep their text positions and the query is rotated back per pair.

    Args:
        query: `[B, H, Q, D]` at `query_positions` `[Q]`; key, value: `[B, KV, K, D]` (GQA) at `key_positions`
            `[B, K]` (-1: an empty slot); held: `[B, K]` the row's kept extras; scores: `[B, K]` sink scores so far;
            padding: `[B, T]` real tokens or None; softcap: the layer's logit softcap (Gemma 2) on the attention
            scores, or None (the sink scores stay raw logits).

    Returns:
        `(out [B, Q, H, D], scores [B, K], keep_extra [B, K])`: the new scores, and the row's kept extras from
        position `query_positions[-1] + 1` on.
    """
    batch, heads, q_len, _ = query.shape
    device = query.device
    offsets = left_padding(padding, batch, device)[:, None]
    q_rel = query_positions[None, :] - offsets  # [B, Q]
    k_rel = torch.where(key_positions >= 0, key_positions - offsets, -(1 << 40))  # [B, K]; empty slots never real
    real = k_rel >= 0
    if padding is not None:
        real = real & torch.gather(padding, 1, key_positions.clamp(min=0))
    key, value = _repeat(key, heads), _repeat(value, heads)
    # sink scores: mean logit over heads, summed over the queries that see the key in its window
    scores = scores.float().clone()
    for start in range(0, q_len, QUERY_CHUNK):
        q = q_rel[:, start : start + QUERY_CHUNK, None]
        logits = (query[:, :, start : start + QUERY_CHUNK].float() @ key.float().transpose(-1, -2)).mean(1) * scaling
        in_window = real[:, None] & ~held[:, None] & (q - k_rel[:, None] >= 0) & (q - k_rel[:, None] < window)
        scores += (logits * in_window).sum(1)
    first, last = q_rel[:, :1], q_rel[:, -1:]
    appear_at = k_rel + window
    candidate = real & (k_rel >= sinks) & (held | ((appear_at > first) & (appear_at <= last + 1)))
    appear, drop = extra_sink_spans(scores, k_rel, candidate, held & real, extra, window)
    keep_extra = candidate & (appear <= last + 1) & (last + 1 < drop)
    out = torch.empty(batch, q_len, heads, value.shape[-1], dtype=value.dtype, device=device)
    chunk = ROTATE_CHUNK if inv_freq is not None else QUERY_CHUNK
    for start in range(0, q_len, chunk):
        rows = slice(start, start + chunk)
        q = q_rel[:, rows, None]  # [B, C, 1]
        distance = q - k_rel[:, None]  # [B, C, K]
        kept = candidate[:, None] & (appear[:, None] <= q) & (q < drop[:, None])
        visible = real[:, None] & (q >= 0) & (distance >= 0) & ((k_rel[:, None] < sinks) | (distance < window) | kept)
        logits = query[:, :, rows].float() @ key.float().transpose(-1, -2)  # [B, H, C, K]
        outside = visible & (distance >= window)
        if inv_freq is not None and bool(outside.any()):
            after = (k_rel[:, :, None] > k_rel[:, None, :]).float()  # [B, K', K]: key k' lies after key k
            delta = (distance - window - outside.float() @ after).clamp(min=0) * outside  # [B, C, K]
            columns = outside.any(dim=(0, 1)).nonzero().flatten()  # rotate only the keys outside some window
            rotated = _rotated_scores(query[:, :, rows], key[:, :, columns], delta[:, :, columns], inv_freq.to(device))
            logits[..., columns] = torch.where(delta[:, None, :, columns] > 0, rotated, logits[..., columns])
        logits = cap_logits(logits * scaling, softcap).masked_fill(~visible[:, None], float("-inf"))
        weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        out[:, rows] = (weights.to(value.dtype) @ value).transpose(1, 2)
    return out, scores, keep_extra


def naive_sink_cache_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    sinks: int,
    extra: int,
    window: int,
    scaling: float,
    inv_freq: torch.Tensor,
    stream: bool,
    softcap: float | None = None,
) -> torch.Tensor:
    """Reference of `sink_cache_attention`, one row, token by token, as a StreamingLLM cache runs: `query`, `key`
    *before RoPE* `[H, T, D]` (`value` `[H, T, D]`, no GQA). At query `i` the token `i - window` leaves the window
    and joins the kept extras if among the best `extra` (its score: its mean logit over heads, at text distance,
    summed over the queries of its window); the query attends the sinks, the extras and the window, every key rotated
    at its text position, or with `stream`, at its index in the cache (StreamingLLM: the cache re-indexed `0..n-1`,
    the query at `n - 1`)."""
    heads, length, _ = query.shape
    text = torch.arange(length)
    q_rot, k_rot = rotate(query, text, inv_freq), rotate(key, text, inv_freq)
    logits_text = (q_rot @ k_rot.transpose(-1, -2)).mean(0) * scaling  # [T, T], text distance
    extras: list[int] = []
    score = {}
    out = []
    for i in range(length):
        leaving = i - window
        if leaving >= sinks:
            score[leaving] = float(logits_text[leaving : leaving + window, leaving].sum().detach())
            extras.append(leaving)
            extras.sort(key=lambda j: (-score[j], j))
            extras = extras[:extra]
        cache = sorted(set(range(min(sinks, i + 1))) | set(extras) | set(range(max(0, i - window + 1), i + 1)))
        keys = torch.tensor(cache)
        if stream:
            k = rotate(key[:, keys], torch.arange(len(cache)), inv_freq)
            q = rotate(query[:, i : i + 1], torch.tensor([len(cache) - 1]), inv_freq)
        else:
            k, q = k_rot[:, keys], q_rot[:, i : i + 1]
        weights = torch.softmax(cap_logits((q @ k.transpose(-1, -2)).float() * scaling, softcap), dim=-1)
        out.append(weights.to(value.dtype) @ value[:, keys])
    return torch.cat(out, dim=1).transpose(0, 1)  # [T, H, D]
