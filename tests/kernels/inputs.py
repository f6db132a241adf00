"""Inputs the kernel tests share: seeded random q/k/v and left-padding masks."""

from __future__ import annotations

import torch


def random_qkv(batch, heads, kv_heads, q_len, kv_len, dim=16, dim_v=None, grad=False, seed=0):
    """Seeded `(q [B, H, Q, D], k [B, KV, S, D], v [B, KV, S, Dv])`, leaf tensors requiring grad when `grad`."""
    g = torch.Generator().manual_seed(seed)

    def make(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    return (
        make(batch, heads, q_len, dim),
        make(batch, kv_heads, kv_len, dim),
        make(batch, kv_heads, kv_len, dim_v or dim),
    )


def left_padding_mask(kv_len, pads):
    """`[B, S]` bool mask with `pads[b]` padded (False) positions at the start of row `b`; None for no padding."""
    if pads is None:
        return None
    mask = torch.ones(len(pads), kv_len, dtype=torch.bool)
    for row, pad in enumerate(pads):
        mask[row, :pad] = False
    return mask
