"""Head-sparse decode attention: compute only the heads a token selected, reading each needed KV head once.

For one query token, the selected query heads of a KV group are packed as "query positions" against that group's
key/value head (the same trick transformers' SDPA path uses for GQA decoding), so a KV head is read once however
many of its query heads are active, and a KV group none of whose heads is active is not read at all. Every slice
below is a view of the KV cache: gathering K/V per selected head would copy the cache and is several times slower
than dense attention (measured in `benchmarks/moh_decode.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["head_sparse_decode_attention", "naive_head_sparse_decode_attention", "active_runs"]


def active_runs(active: torch.Tensor) -> list[tuple[int, int]]:
    """Contiguous runs `[start, stop)` of `True` in a 1-D bool tensor."""
    runs, start = [], None
    for i, on in enumerate(active.tolist()):
        if on and start is None:
            start = i
        elif not on and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(active)))
    return runs


def head_sparse_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    active: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Attention of one query token per row over the active heads only.

    Args:
        query (`torch.Tensor`): `[B, H, 1, D]`, after RoPE.
        key, value (`torch.Tensor`): `[B, KV, S, D]`, the full cache (not repeated for GQA).
        attention_mask (`torch.Tensor`, *optional*): `[B, 1, 1, S]` boolean (True = attend) or additive float.
        active (`torch.Tensor`): `[B, H]` bool, the heads each row computes.
        scaling (`float`): softmax scale.

    Returns:
        `[B, 1, H, D]`, zero for inactive heads.
    """
    batch, num_heads, _, head_dim = query.shape
    group = num_heads // key.shape[1]
    out = query.new_zeros(batch, 1, num_heads, head_dim)
    active_cpu = active.cpu()
    for b in range(batch):
        mask = None if attention_mask is None else attention_mask[b : b + 1, :, -1:]
        for start, stop in active_runs(active_cpu[b]):
            h = start
            while h < stop:
                g = h // group
                full_groups = (stop - h) // group if h == g * group else 0
                # whole KV groups in one call (lets SDPA parallelise over them); a partial group on its own
                end = h + full_groups * group if full_groups else min(stop, (g + 1) * group)
                n_kv = max(full_groups, 1)
                # [1, n_kv, heads per KV head, D]: active query heads as query positions of their KV head
                q = query[b : b + 1, h:end, 0].reshape(1, n_kv, -1, head_dim)
                o = F.scaled_dot_product_attention(
                    q, key[b : b + 1, g : g + n_kv], value[b : b + 1, g : g + n_kv], attn_mask=mask, scale=scaling
                )
                out[b, 0, h:end] = o[0].reshape(-1, head_dim)
                h = end
    return out


def naive_head_sparse_decode_attention(query, key, value, attention_mask, active, scaling):
    """Reference: dense attention over all heads, inactive heads zeroed."""
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    mask = None if attention_mask is None else attention_mask[:, :, -1:]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)  # [B, H, 1, D]
    return (out * active[:, :, None, None].to(out.dtype)).transpose(1, 2)
