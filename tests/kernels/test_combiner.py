"""Combiner kernels (arXiv:2107.05768) against the naive definition (explicit combined weights): forward, gradients,
and the factorisation's properties (one normaliser, full support, size-1 regions = exact attention)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hf_attn_zoo.kernels.combiner import combiner_attention, combiner_regions, naive_combiner_attention
from tests.kernels.inputs import left_padding_mask, random_qkv
from tests.matrix import ATOL_FP32


# batch, heads, kv_heads, length, block, direct blocks, pooling, size bias, left padding, window, softcap, sinks
CASES = [
    (2, 4, 4, 40, 8, 1, "max", False, None, None, None, 0),
    (2, 6, 2, 37, 5, 1, "max", False, None, None, None, 0),
    (3, 4, 1, 50, 4, 2, "mean", True, [0, 4, 7], None, None, 0),
    (2, 4, 2, 33, 3, 1, "max", True, [0, 5], 10, None, 0),  # a sliding-window layer: regions only inside it
    (2, 4, 2, 29, 2, 1, "max", False, None, None, 3.0, 0),  # Gemma 2's logit softcap
    (1, 2, 1, 64, 1, 1, "max", False, None, None, None, 0),  # regions of single blocks of one token
    (2, 4, 2, 47, 3, 1, "max", False, [0, 5], None, None, 2),  # sink blocks
    (2, 4, 2, 41, 3, 2, "mean", True, [0, 2], 12, None, 1),  # sink blocks on a sliding-window layer
]
FACTORISATIONS = ["fixed", "logsparse"]


def _options(case, factorisation):
    _, _, _, _, block, direct, pooling, size_bias, pads, window, softcap, sinks = case
    return dict(
        factorisation=factorisation,
        block_size=block,
        direct_blocks=direct,
        sink_blocks=sinks,
        pooling=pooling,
        size_bias=size_bias,
        padding=left_padding_mask(case[3], pads),
        window=window,
        softcap=softcap,
    )


@pytest.mark.parametrize("factorisation", FACTORISATIONS)
@pytest.mark.parametrize("case", CASES)
def test_blockwise_equals_the_naive_definition(case, factorisation):
    batch, heads, kv_heads, length = case[:4]
    q, k, v = random_qkv(batch, heads, kv_heads, length, length, dim_v=12)
    options = _options(case, factorisation)
    expected = naive_combiner_attention(q, k, v, **options)
    torch.testing.assert_close(combiner_attention(q, k, v, **options), expected, atol=ATOL_FP32, rtol=1e-5)


@pytest.mark.parametrize("factorisation", FACTORISATIONS)
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[3], CASES[7]])
def test_gradients_equal_the_naive_definition(case, factorisation):
    batch, heads, kv_heads, length = case[:4]
    q, k, v = random_qkv(batch, heads, kv_heads, length, length, grad=True)
    options = _options(case, factorisation)
    weights = torch.randn(batch, length, heads, 16, generator=torch.Generator().manual_seed(3))
    expected = torch.autograd.grad((naive_combiner_attention(q, k, v, **options) * weights).sum(), (q, k, v))
    grads = torch.autograd.grad((combiner_attention(q, k, v, **options) * weights).sum(), (q, k, v))
    for got, want, name in zip(grads, expected, "qkv"):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=f"d{name}")


@pytest.mark.parametrize("factorisation", FACTORISATIONS)
@pytest.mark.parametrize("q_len", [1, 3, 9])
def test_cached_queries_equal_the_full_forward_rows(factorisation, q_len):
    """A decode step (the last queries, every position's queries for the region pools) is the full forward's rows."""
    q, k, v = random_qkv(2, 4, 2, 31, 31)
    options = dict(factorisation=factorisation, block_size=3, sink_blocks=1, padding=left_padding_mask(31, [0, 6]))
    full = combiner_attention(q, k, v, **options)
    step = combiner_attention(q[:, :, -q_len:], k, v, region_queries=q, **options)
    torch.testing.assert_close(step, full[:, -q_len:], atol=ATOL_FP32, rtol=1e-5)


@pytest.mark.parametrize("factorisation", FACTORISATIONS)
@pytest.mark.parametrize("window,sinks", [(None, 0), (11, 0), (None, 2)])
def test_weights_sum_to_one_over_the_full_support(factorisation, window, sinks):
    """One normaliser for the direct and the region terms; every key of the (causal, windowed) support gets weight."""
    length, pad = 45, 4
    q, k, v = random_qkv(2, 4, 2, length, length)
    padding = left_padding_mask(length, [0, pad])
    _, weights = naive_combiner_attention(
        q,
        k,
        v,
        factorisation=factorisation,
        block_size=3,
        sink_blocks=sinks,
        padding=padding,
        window=window,
        return_weights=True,
    )
    pos = torch.arange(length)
    for row, first in enumerate([0, pad]):
        support = (pos[None] <= pos[:, None]) & (pos[None] >= first) & (pos[:, None] >= first)
        if window:
            support &= pos[:, None] - pos[None] < window
        w = weights[row]  # [H, Q, S]
        real = pos >= first
        torch.testing.assert_close(w.sum(-1)[:, real], torch.ones(4, int(real.sum())), atol=1e-5, rtol=0)
        assert bool((w[:, support] > 0).all()), "a key of the support has no weight"
        assert bool((w[:, ~support] == 0).all()), "weight outside the causal support"


def test_regions_of_single_tokens_are_exact_attention():
    """block_size 1: every region is one key, its summary is that key's value and its logit the key's own logit."""
    q, k, v = random_qkv(2, 6, 3, 24, 24)
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
    for factorisation in FACTORISATIONS[:1]:
        out = combiner_attention(q, k, v, factorisation=factorisation, block_size=1)
        torch.testing.assert_close(out, exact, atol=ATOL_FP32, rtol=1e-5)
    # logsparse merges single tokens into larger spans: exact only while each span holds one token
    out = combiner_attention(q[:, :, :3], k[:, :, :3], v[:, :, :3], factorisation="logsparse", block_size=1)
    torch.testing.assert_close(out, exact[:, :3], atol=ATOL_FP32, rtol=1e-5)


def test_no_regions_is_exact_causal_attention():
    q, k, v = random_qkv(2, 4, 2, 20, 20)
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
    for factorisation in FACTORISATIONS:
        out = combiner_attention(q, k, v, factorisation=factorisation, block_size=20)
        torch.testing.assert_close(out, exact, atol=ATOL_FP32, rtol=1e-5)


def test_region_summary_is_the_pooled_query_distribution():
    """One region: its value summary is `softmax(q_r . k_j) v_j` with `q_r` the max-pool of the region's queries, and
    its share of the normaliser is `exp(q_i . max_j k_j)`."""
    q, k, v = random_qkv(1, 1, 1, 5, 5, dim=4, dim_v=3)
    scale = 0.5
    out = combiner_attention(q, k, v, factorisation="fixed", block_size=4, scaling=scale)[0, 4, 0]
    region_q, region_k = q[0, 0, :4].amax(0), k[0, 0, :4].amax(0)
    summary = torch.softmax(k[0, 0, :4] @ region_q * scale, 0) @ v[0, 0, :4]
    logits = torch.stack([region_k @ q[0, 0, 4] * scale, k[0, 0, 4] @ q[0, 0, 4] * scale])
    p = torch.softmax(logits, 0)
    torch.testing.assert_close(out, p[0] * summary + p[1] * v[0, 0, 4], atol=ATOL_FP32, rtol=1e-5)


@pytest.mark.parametrize("p", list(range(0, 70)))
def test_logsparse_regions_tile_the_past_with_doubling_sizes(p):
    regions = combiner_regions("logsparse", p)
    spans = [(node << level, (node + 1) << level) for level, node in regions]
    covered = sorted(b for a, e in spans for b in range(a, e))
    assert covered == list(range(p)), "regions must tile blocks [0, p) exactly once"
    ends = [e for _, e in spans]
    assert ends == sorted(ends, reverse=True) and (not spans or ends[0] == p), "nearest first, contiguous"
    levels = [level for level, _ in regions]
    assert levels == sorted(levels) and all(levels.count(x) <= 2 for x in set(levels))
    assert len(regions) <= 2 * max(p, 1).bit_length()
    for level, node in regions:  # sizes grow with the distance: a span is at most one block longer than its gap
        assert 1 << level <= p - ((node + 1) << level) + 1


def test_fixed_regions_are_every_earlier_block():
    assert combiner_regions("fixed", 4) == [(0, 3), (0, 2), (0, 1), (0, 0)]


def test_bf16_inputs_keep_their_dtype_and_match_fp32():
    q, k, v = random_qkv(1, 4, 2, 40, 40)
    options = dict(factorisation="logsparse", block_size=4)
    out = combiner_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), **options)
    assert out.dtype == torch.bfloat16
    ref = combiner_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), **options)
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)


def test_cost_is_subquadratic():
    """Logsparse: the combined softmax (the kernel's last) has `block + 2 log2(L/block)` entries per query, not `L`."""
    length, block = 1024, 32
    seen: list[int] = []
    original = torch.softmax

    def spy(x, dim=-1, **kwargs):
        seen.append(x.shape[-1])
        return original(x, dim=dim, **kwargs)

    q, k, v = random_qkv(1, 2, 1, length, length)
    torch.softmax = spy
    try:
        combiner_attention(q, k, v, factorisation="logsparse", block_size=block)
    finally:
        torch.softmax = original
    assert seen[-1] <= block + 2 * math.ceil(math.log2(length // block)) + 2


def test_sink_blocks_are_attended_exactly():
    """With sink blocks, each row's first blocks get their exact softmax weights relative to the direct keys."""
    q, k, v = random_qkv(1, 2, 2, 30, 30)
    _, weights = naive_combiner_attention(q, k, v, block_size=3, sink_blocks=2, return_weights=True)
    scores = (q[0] @ k[0].transpose(-1, -2)) * 16**-0.5  # [H, Q, S]
    i = 29  # own block 27..29 and sinks 0..5 are direct: their weight ratios are exp(score) ratios
    ratio = weights[0, :, i, 2] / weights[0, :, i, 28]
    torch.testing.assert_close(ratio, torch.exp(scores[:, i, 2] - scores[:, i, 28]), atol=1e-5, rtol=1e-4)
