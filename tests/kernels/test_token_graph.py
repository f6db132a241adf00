"""Graph-of-tokens mixing kernel (arXiv:2505.00792) against its dense reference: forward and gradients."""

from __future__ import annotations

import pytest
import torch

from hf_attn_zoo.kernels.token_graph import naive_token_graph_mix, token_graph_mix
from tests.matrix import ATOL_FP32


def _keep(batch: int, q_len: int, kv_len: int, pads: list[int]) -> torch.Tensor:
    """Causal (queries are the last `q_len` positions) and left padding of `pads[b]` keys."""
    pos_q = torch.arange(q_len)[:, None] + kv_len - q_len
    keep = (torch.arange(kv_len)[None, :] <= pos_q)[None, None].expand(batch, 1, q_len, kv_len).clone()
    for row, pad in enumerate(pads):
        keep[row, :, :, :pad] = False
    return keep


def _inputs(batch, heads, kv_heads, q_len, kv_len, experts=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, q_len, 8, generator=g, requires_grad=True)
    key = torch.randn(batch, kv_heads, kv_len, 8, generator=g, requires_grad=True)
    dists = torch.softmax(torch.randn(batch, kv_len, experts, generator=g), -1).requires_grad_(True)
    fallback = torch.softmax(torch.randn(batch, q_len, experts, generator=g), -1)
    return query, key, dists, fallback


CASES = [  # batch, heads, kv_heads, q_len, kv_len, left padding, chunk
    (2, 4, 4, 16, 16, [0, 0], 1024),
    (2, 6, 2, 13, 13, [0, 5], 4),  # GQA, padding, several chunks
    (2, 4, 1, 3, 20, [0, 7], 2),  # cached prefill: the queries are the last 3 positions
    (2, 4, 2, 1, 9, [2, 0], 1024),  # a decode step
]


@pytest.mark.parametrize("case", CASES)
def test_mix_matches_the_dense_reference_forward_and_backward(case):
    batch, heads, kv_heads, q_len, kv_len, pads, chunk = case
    query, key, dists, fallback = _inputs(batch, heads, kv_heads, q_len, kv_len)
    keep = _keep(batch, q_len, kv_len, pads)
    expected = naive_token_graph_mix(query, key, dists, keep, 0.3, fallback)
    got = token_graph_mix(query, key, dists, keep, 0.3, fallback, chunk=chunk)
    torch.testing.assert_close(got, expected, atol=ATOL_FP32, rtol=1e-5)
    grad = torch.randn_like(expected)
    want = torch.autograd.grad(expected, (query, key, dists), grad)
    have = torch.autograd.grad(got, (query, key, dists), grad)
    for a, b in zip(have, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_rows_stay_distributions_and_only_earlier_tokens_count():
    query, key, dists, fallback = _inputs(1, 2, 2, 10, 10)
    keep = _keep(1, 10, 10, [0])
    mixed = token_graph_mix(query, key, dists, keep, 1.0, fallback)
    torch.testing.assert_close(mixed.sum(-1), torch.ones(1, 10))
    # the first token has only itself to mix with
    torch.testing.assert_close(mixed[0, 0], dists[0, 0])
    # changing a later token's distribution leaves earlier rows alone
    changed = dists.detach().clone()
    changed[0, 6] = torch.softmax(torch.randn(5), -1)
    again = token_graph_mix(query, key, changed, keep, 1.0, fallback)
    torch.testing.assert_close(again[0, :6], mixed[0, :6])
    assert not torch.allclose(again[0, 6:], mixed[0, 6:])


def test_a_row_with_no_key_returns_its_fallback():
    query, key, dists, fallback = _inputs(1, 2, 2, 6, 6)
    keep = _keep(1, 6, 6, [3])  # the first 3 queries see only padding
    mixed = token_graph_mix(query, key, dists, keep, 1.0, fallback)
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed[0, :3], fallback[0, :3])
    torch.testing.assert_close(mixed, naive_token_graph_mix(query, key, dists, keep, 1.0, fallback))


def test_sharp_scores_reduce_to_the_own_distribution():
    # identical unit keys per token and a large scale: each token mixes (almost) only with itself
    eye = torch.eye(6)[None, None]
    dists = torch.softmax(torch.randn(1, 6, 4), -1)
    mixed = token_graph_mix(eye, eye, dists, _keep(1, 6, 6, [0]), 100.0, dists)
    torch.testing.assert_close(mixed, dists, atol=1e-6, rtol=0)
