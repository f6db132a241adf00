"""MoH's head-sparse decode kernel against the naive reference."""

from __future__ import annotations

import torch

from hf_attn_zoo.kernels import head_sparse


def test_head_sparse_kernel_matches_the_naive_reference():
    query, key, value = torch.randn(3, 6, 1, 8), torch.randn(3, 3, 20, 8), torch.randn(3, 3, 20, 8)
    active = torch.rand(3, 6) > 0.4
    mask = torch.ones(3, 1, 1, 20, dtype=torch.bool)
    mask[1, ..., :5] = False
    got = head_sparse.head_sparse_decode_attention(query, key, value, mask, active, 0.3)
    expected = head_sparse.naive_head_sparse_decode_attention(query, key, value, mask, active, 0.3)
    torch.testing.assert_close(got, expected)
