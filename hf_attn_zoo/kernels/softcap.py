"""A layer's attention logit softcap (Gemma 2's `attn_logit_softcapping`): `c * tanh(s / c)` on the scaled scores.

Every kernel here that forms softmax logits applies it when the model's attention function is handed `softcap=`.
SDPA and the fused kernels cannot, so `softcap_attention` is the explicit form they fall back to: the scores are
materialised, as the family's own eager attention does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["cap_logits", "softcap_attention"]


def cap_logits(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """`softcap * tanh(scores / softcap)`, or `scores` unchanged when there is no softcap."""
    return scores if not softcap else softcap * torch.tanh(scores / softcap)


def softcap_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    dropout: float,
    softcap: float,
) -> torch.Tensor:
    """`kernels.masks.masked_sdpa` with a logit softcap. `query` `[B, H, Q, D]`, `key`/`value` `[B, KV, K, D]` (GQA
    not repeated), `mask` broadcastable to `[B, H, Q, K]` (True = attend); rows with no allowed key give zeros.
    Returns `[B, H, Q, Dv]`."""
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads * q_len, dim)
    scores = cap_logits((grouped @ key.transpose(-1, -2)).reshape(batch, heads, q_len, -1) * scaling, softcap)
    weights = torch.softmax(scores.float().masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0).to(value.dtype)
    weights = F.dropout(weights, p=dropout, training=dropout > 0)
    out = weights.reshape(batch, kv_heads, heads // kv_heads * q_len, -1) @ value
    return out.reshape(batch, heads, q_len, value.shape[-1])
