"""HyperAttention kernels (arXiv:2310.05869) with a logit softcap against dense softcapped attention, where the
approximation is exact: forward and gradients (the approximation itself: tests/patches/test_hyper_attention.py)."""

from __future__ import annotations

import pytest
import torch

from hf_attn_zoo.kernels.hyper_attention import (
    attention_with_lse,
    hyper_attention,
    merge_attention,
    padded_hyper_attention,
)
from tests.kernels.inputs import random_qkv
from tests.matrix import ATOL_FP32

SOFTCAP = 0.5  # below the typical scaled score of the random inputs, so the cap changes the weights


def _dense(query, key, value, softcap, causal=True):
    """Softcapped softmax attention with the mask written out, in fp32: `[B, H, Nq, Dv]`."""
    group = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    scores = query @ k.transpose(-1, -2) * query.shape[-1] ** -0.5
    scores = softcap * torch.tanh(scores / softcap)
    if causal:
        n_q, n_k = scores.shape[-2:]
        allowed = torch.ones(n_q, n_k, dtype=torch.bool).tril(n_k - n_q)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1) @ v


EXACT = {  # settings under which HyperAttention is exact attention
    "leaf": dict(min_seq_len=64),  # one causal leaf
    "one_block": dict(block_size=64, sample_size=0, min_seq_len=8),  # the recursion, every rectangle one block
    "one_block_residual": dict(block_size=64, sample_size=16, min_seq_len=8),  # samples all in the own block
}


@pytest.mark.parametrize("setting", EXACT)
def test_exact_settings_apply_the_softcap(setting):
    q, k, v = random_qkv(2, 4, 2, 64, 64)
    expected = _dense(q, k, v, SOFTCAP)
    assert not torch.allclose(expected, _dense(q, k, v, 1e4), atol=1e-3)
    out = hyper_attention(q, k, v, softcap=SOFTCAP, **EXACT[setting])
    torch.testing.assert_close(out, expected, atol=ATOL_FP32, rtol=1e-5)


@pytest.mark.parametrize("setting", EXACT)
def test_softcapped_gradients_equal_dense_attention(setting):
    q, k, v = random_qkv(2, 4, 2, 64, 64, grad=True)
    weights = torch.randn(2, 4, 64, 16, generator=torch.Generator().manual_seed(3))
    expected = torch.autograd.grad((_dense(q, k, v, SOFTCAP) * weights).sum(), (q, k, v))
    got = torch.autograd.grad((hyper_attention(q, k, v, softcap=SOFTCAP, **EXACT[setting]) * weights).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_lse_merge_of_softcapped_parts_equals_softcapped_attention_over_their_union():
    q, k, v = random_qkv(1, 4, 2, 30, 30)
    first, second = torch.arange(0, 30, 3), torch.tensor([i for i in range(30) if i % 3])
    out1, lse1 = attention_with_lse(q, k[:, :, first], v[:, :, first], softcap=SOFTCAP)
    out2, lse2 = attention_with_lse(q, k[:, :, second], v[:, :, second], softcap=SOFTCAP)
    merged, _ = merge_attention(out1, lse1, out2, lse2)
    torch.testing.assert_close(merged, _dense(q, k, v, SOFTCAP, causal=False), atol=ATOL_FP32, rtol=1e-5)


def test_a_padded_row_keeps_the_softcap():
    q, k, v = random_qkv(2, 4, 2, 80, 80)
    padding = torch.ones(2, 80, dtype=torch.bool)
    padding[1, :13] = False
    options = dict(block_size=16, sample_size=16, min_seq_len=32, softcap=SOFTCAP)
    out = padded_hyper_attention(q, k, v, padding, **options)
    alone = hyper_attention(q[1:, :, 13:], k[1:, :, 13:], v[1:, :, 13:], **options)
    torch.testing.assert_close(out[1:, :, 13:], alone)
    assert not torch.allclose(
        alone, hyper_attention(q[1:, :, 13:], k[1:, :, 13:], v[1:, :, 13:], **options | {"softcap": None}), atol=1e-3
    )
