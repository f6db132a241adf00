"""Mixing per-token distributions over a causal graph of tokens: `out_i = mean_h sum_j S^h_ij G_j` with
`S^h = softmax_j(scale * q^h_i . k^h_j + mask)`, i.e. attention whose values are the distributions `G`.

Graph-of-tokens MoE routing (arXiv:2505.00792) mixes each token's gate distribution with those of similar tokens;
computed as attention with `V := G` it never materialises the `(Tq, Tk)` similarity matrix where the SDPA backend
does not (flash / memory-efficient), and `chunk` bounds the memory of the math backend to `chunk x Tk` per head.
A row whose mask keeps no key (a padding query under left padding) returns its own `fallback` row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["naive_token_graph_mix", "token_graph_mix"]


def _prepare(
    query: torch.Tensor, key: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys repeated to the query heads, the mask with empty rows opened (they are replaced afterwards) and the
    `(B, Tq)` empty-row flags."""
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads % kv_heads:
        raise ValueError(f"token_graph_mix: {heads} query heads are not a multiple of {kv_heads} key heads")
    if kv_heads != heads:
        key = key.repeat_interleave(heads // kv_heads, dim=1)
    keep = keep.expand(query.shape[0], -1, query.shape[2], key.shape[2])[:, :1]
    empty = ~keep.any(dim=-1)  # [B, 1, Tq]
    return key, keep | empty.unsqueeze(-1), empty[:, 0], keep


def naive_token_graph_mix(
    query: torch.Tensor,
    key: torch.Tensor,
    dists: torch.Tensor,
    keep: torch.Tensor,
    scale: float,
    fallback: torch.Tensor,
) -> torch.Tensor:
    """Reference: the dense `(B, H, Tq, Tk)` similarity matrix, explicitly.

    Args:
        query (`torch.Tensor`): `[B, H, Tq, D]`.
        key (`torch.Tensor`): `[B, Hkv, Tk, D]` (`H` a multiple of `Hkv`).
        dists (`torch.Tensor`): `[B, Tk, E]` the distributions mixed (one per key token).
        keep (`torch.Tensor`): bool, broadcastable to `[B, 1, Tq, Tk]`: which keys each query may mix.
        scale (`float`): factor on the scores.
        fallback (`torch.Tensor`): `[B, Tq, E]`, the result of a query whose mask keeps no key.

    Returns:
        `torch.Tensor`: `[B, Tq, E]`, the head-averaged mixture.
    """
    key, keep, empty, _ = _prepare(query, key, keep)
    scores = torch.einsum("bhqd,bhkd->bhqk", query, key) * scale
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)  # [B, H, Tq, Tk]
    mixed = torch.einsum("bhqk,bke->bhqe", probs, dists.to(probs.dtype)).mean(dim=1)
    return torch.where(empty.unsqueeze(-1), fallback.to(mixed.dtype), mixed)


def token_graph_mix(
    query: torch.Tensor,
    key: torch.Tensor,
    dists: torch.Tensor,
    keep: torch.Tensor,
    scale: float,
    fallback: torch.Tensor,
    chunk: int = 1024,
) -> torch.Tensor:
    """`naive_token_graph_mix` as SDPA with the distributions as values, over query chunks of `chunk` tokens (same
    arguments; `chunk` >= 1)."""
    key, keep, empty, _ = _prepare(query, key, keep)
    values = dists.to(query.dtype).unsqueeze(1).expand(-1, key.shape[1], -1, -1)  # [B, H, Tk, E]
    outs = []
    for start in range(0, query.shape[2], max(1, chunk)):
        stop = start + max(1, chunk)
        part = F.scaled_dot_product_attention(
            query[:, :, start:stop], key, values, attn_mask=keep[:, :, start:stop], scale=scale
        )
        outs.append(part.mean(dim=1))
    mixed = torch.cat(outs, dim=1)
    return torch.where(empty.unsqueeze(-1), fallback.to(mixed.dtype), mixed)
