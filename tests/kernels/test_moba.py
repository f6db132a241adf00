"""MoBA kernels (arXiv:2502.13189, FlashMoBA arXiv:2511.11571) against the naive definition: forward and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_attn_zoo.kernels.moba import causal_key_conv, moba_attention, naive_moba_attention
from hf_attn_zoo.patches.moba import MoBAKeyConv
from tests.kernels.inputs import left_padding_mask, random_qkv
from tests.matrix import ATOL_FP32


CASES = [  # batch, heads, kv_heads, q_len, kv_len, block_size, top_k, left padding, window
    (2, 4, 4, 40, 40, 8, 2, None, None),
    (2, 6, 2, 37, 37, 5, 3, None, None),
    (3, 4, 1, 50, 50, 7, 2, [0, 4, 4], None),
    (2, 4, 2, 12, 45, 6, 3, [0, 9], None),  # cached prefill: queries are the last 12 positions
    (2, 4, 2, 1, 33, 4, 2, [0, 5], None),  # decode step
    (2, 4, 2, 30, 30, 4, 3, [0, 2], 6),  # a sliding-window layer (Gemma-3)
]


SOFTCAP = 0.5  # below the typical scaled score of the random inputs, so the cap changes the weights


@pytest.mark.parametrize("softcap", [None, SOFTCAP], ids=["plain", "softcap"])
@pytest.mark.parametrize("backend", ["masked", "gather"])
@pytest.mark.parametrize("case", CASES)
def test_kernels_equal_the_naive_definition(case, backend, softcap):
    batch, heads, kv_heads, q_len, kv_len, block, top_k, pads, window = case
    q, k, v = random_qkv(batch, heads, kv_heads, q_len, kv_len)
    options = dict(block_size=block, top_k=top_k, padding=left_padding_mask(kv_len, pads), window=window)
    expected = naive_moba_attention(q, k, v, softcap=softcap, **options)
    if softcap is not None:  # a cap small enough to change the result
        assert not torch.allclose(expected, naive_moba_attention(q, k, v, **options), atol=1e-3)
    out = moba_attention(q, k, v, backend=backend, softcap=softcap, **options)
    torch.testing.assert_close(out, expected, atol=ATOL_FP32, rtol=1e-5)


@pytest.mark.parametrize("softcap", [None, SOFTCAP], ids=["plain", "softcap"])
@pytest.mark.parametrize("backend", ["masked", "gather"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]])
def test_gradients_equal_the_naive_definitions(case, backend, softcap):
    batch, heads, kv_heads, q_len, kv_len, block, top_k, pads, window = case
    q, k, v = random_qkv(batch, heads, kv_heads, q_len, kv_len, grad=True)
    options = dict(block_size=block, top_k=top_k, padding=left_padding_mask(kv_len, pads), window=window)
    weights = torch.randn(batch, q_len, heads, 16, generator=torch.Generator().manual_seed(3))
    expected = torch.autograd.grad(
        (naive_moba_attention(q, k, v, softcap=softcap, **options) * weights).sum(), (q, k, v)
    )
    got = torch.autograd.grad(
        (moba_attention(q, k, v, backend=backend, softcap=softcap, **options) * weights).sum(), (q, k, v)
    )
    for name, a, b in zip("qkv", got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_top_k_of_all_blocks_is_causal_attention():
    q, k, v = random_qkv(1, 6, 2, 64, 64)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
    for backend in ("masked", "gather"):
        out = moba_attention(q, k, v, block_size=16, top_k=4, backend=backend)
        torch.testing.assert_close(out, dense, atol=ATOL_FP32, rtol=1e-5)


def test_a_query_attends_its_block_and_the_past_blocks_with_the_largest_mean_key_score():
    # 4 blocks of 2 keys; block 1's keys point along the query, so top-2 = the own block 3 + block 1
    dim = 4
    k = torch.zeros(1, 1, 8, dim)
    k[0, 0, :, 1] = torch.linspace(-0.5, 0.5, 8)
    k[0, 0, 2:4, 0] = 3.0
    k[0, 0, 0:2, 0] = -1.0
    v = torch.randn(1, 1, 8, dim, generator=torch.Generator().manual_seed(0))
    q = torch.zeros(1, 1, 1, dim)
    q[..., 0] = 1.0
    q[..., 1] = 0.3
    out = moba_attention(q, k, v, block_size=2, top_k=2, scaling=0.5)
    keys = [2, 3, 6, 7]  # block 1, and the own block (the query is position 7)
    probs = torch.softmax((q[0, 0] @ k[0, 0, keys].T) * 0.5, dim=-1)
    torch.testing.assert_close(out[0, 0, 0], (probs @ v[0, 0, keys])[0])


def test_flex_path_equals_the_gather_path():
    q, k, v = random_qkv(1, 4, 2, 1024, 1024, dim=32)
    gather = moba_attention(q, k, v, block_size=128, top_k=3, backend="gather")
    flex = moba_attention(q, k, v, block_size=128, top_k=3, backend="flex")
    torch.testing.assert_close(flex, gather, atol=1e-5, rtol=1e-4)


def test_key_conv_is_causal_and_its_identity_init_is_exact():
    key = torch.randn(2, 3, 10, 8)
    conv = MoBAKeyConv(3, list(range(4)) * 2, 5)
    assert torch.equal(conv(key), key)
    weight = torch.randn(3, 8, 4)
    out = causal_key_conv(key, weight, None)
    changed = key.clone()
    changed[:, :, 6:] += 1.0
    torch.testing.assert_close(causal_key_conv(changed, weight, None)[:, :, :6], out[:, :, :6])
    # left padding counts as zeros: a padded row's first real key sees no earlier key
    padding = torch.ones(2, 10, dtype=torch.bool)
    padding[1, :4] = False
    padded = causal_key_conv(key, weight, padding)
    alone = causal_key_conv(key[1:, :, 4:], weight, None)
    torch.testing.assert_close(padded[1:, :, 4:], alone)


def test_the_compiled_padded_path_applies_the_softcap():
    # what `moba_attention` runs under torch.compile with padding: every row's blocks shifted in one masked call
    from hf_attn_zoo.kernels.moba import _masked_shifted

    q, k, v = random_qkv(3, 4, 2, 30, 30)
    padding = left_padding_mask(30, [0, 3, 7])
    offsets = torch.tensor([0, 3, 7])
    expected = naive_moba_attention(q, k, v, block_size=4, top_k=3, padding=padding, window=6, softcap=SOFTCAP)
    out = _masked_shifted(q, k, v, offsets, 4, 3, 6, 16**-0.5, 0.0, SOFTCAP).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=ATOL_FP32, rtol=1e-5)


def test_flex_path_applies_the_softcap():
    q, k, v = random_qkv(1, 4, 2, 256, 256, dim=32)
    gather = moba_attention(q, k, v, block_size=64, top_k=2, backend="gather", softcap=SOFTCAP)
    flex = moba_attention(q, k, v, block_size=64, top_k=2, backend="flex", softcap=SOFTCAP)
    torch.testing.assert_close(flex, gather, atol=1e-5, rtol=1e-4)
