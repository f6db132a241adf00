"""Routing-attention kernels against the naive definitions: forward and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_attn_zoo.kernels.routing_attention import naive_routing_attention, routing_attention
from tests.matrix import ATOL_FP32


def _loop_reference(query, key, value, qc, kc, routing, window, sinks, real, span=None, softcap=None):
    """Attention with the mask written out pair by pair from the method's definition."""
    batch, heads, q_len, dim = query.shape
    kv_heads, total = key.shape[1], key.shape[2]
    group = heads // kv_heads
    out = torch.zeros(batch, q_len, heads, value.shape[-1])
    for b in range(batch):
        first = int(real[b].float().argmax()) if real is not None else 0
        for h in range(heads):
            for qi in range(q_len):
                i = total - q_len + qi
                if real is not None and not real[b, i]:
                    continue
                allowed = []
                for j in range(total):
                    if j > i or (real is not None and not real[b, j]) or j < first:
                        continue
                    if span is not None and i - j >= span:
                        continue
                    local = i - j < window or j - first < sinks
                    routed = bool(routing[h]) and int(qc[b, h, qi]) == int(kc[b, h // group, j])
                    if local or routed:
                        allowed.append(j)
                scores = key[b, h // group, allowed] @ query[b, h, qi] / dim**0.5
                if softcap:
                    scores = softcap * torch.tanh(scores / softcap)
                out[b, qi, h] = torch.softmax(scores, -1) @ value[b, h // group, allowed]
    return out


def _inputs(batch=2, heads=6, kv_heads=2, total=40, q_len=40, dim=8, clusters=3, seed=0, pad=(0, 5)):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, q_len, dim, generator=g)
    key = torch.randn(batch, kv_heads, total, dim, generator=g)
    value = torch.randn(batch, kv_heads, total, dim, generator=g)
    qc = torch.randint(0, clusters, (batch, heads, q_len), generator=g)
    kc = torch.randint(0, clusters, (batch, kv_heads, total), generator=g)
    real = torch.ones(batch, total, dtype=torch.bool)
    for b, p in enumerate(pad):
        real[b, :p] = False
    return query, key, value, qc, kc, real


@pytest.mark.parametrize("backend", ["masked", "sorted"])
@pytest.mark.parametrize("q_len,span", [(40, None), (7, None), (40, 9)])
def test_kernel_matches_the_pairwise_definition(backend, q_len, span):
    query, key, value, qc, kc, real = _inputs(q_len=q_len)
    routing = torch.tensor([False, True, True, False, False, True])
    out = routing_attention(
        query, key, value, qc, kc, routing, window=4, sinks=2, scaling=None, padding=real, span=span, backend=backend
    )
    expected = _loop_reference(query, key, value, qc, kc, routing, 4, 2, real, span)
    torch.testing.assert_close(out, expected, atol=ATOL_FP32, rtol=1e-5)
    naive = naive_routing_attention(
        query, key, value, qc, kc, routing, window=4, sinks=2, scaling=8**-0.5, padding=real, span=span
    )
    torch.testing.assert_close(naive, expected, atol=ATOL_FP32, rtol=1e-5)


def test_sorted_and_masked_paths_have_the_same_gradients():
    query, key, value, qc, kc, real = _inputs(total=70, q_len=70, pad=(3, 0))
    routing = torch.tensor([True, False, True, True, False, True])
    grads = []
    for backend in ("masked", "sorted"):
        q, k, v = (t.clone().requires_grad_() for t in (query, key, value))
        out = routing_attention(
            q, k, v, qc, kc, routing, window=5, sinks=1, scaling=None, padding=real, backend=backend
        )
        (out * torch.arange(out.numel()).reshape(out.shape).sin()).sum().backward()
        grads.append([t.grad for t in (q, k, v)])
        assert all(g.abs().sum() > 0 for g in grads[-1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_one_cluster_and_a_full_window_is_dense_causal():
    query, key, value, _, _, _ = _inputs(pad=(0, 0))
    qc = torch.zeros(2, 6, 40, dtype=torch.long)
    kc = torch.zeros(2, 2, 40, dtype=torch.long)
    dense = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True).transpose(1, 2)
    for backend in ("masked", "sorted"):
        # routing alone (window 1: only the query itself is local) with one cluster is dense too
        for window, routing in ((40, torch.zeros(6, dtype=torch.bool)), (1, torch.ones(6, dtype=torch.bool))):
            out = routing_attention(
                query, key, value, qc, kc, routing, window=window, sinks=0, scaling=None, backend=backend
            )
            torch.testing.assert_close(out, dense, atol=ATOL_FP32, rtol=1e-5)


def test_benchmark_helper_runs_a_routing_layer():
    from hf_attn_zoo.kernels.routing_attention import routing_attention_benchmark

    query, key, value, _, _, _ = _inputs(pad=(0, 0))
    out = routing_attention_benchmark(num_clusters=3, window=4, scaling=None)(query, key, value)
    assert out.shape == (2, 40, 6, 8) and torch.isfinite(out).all()
    dense = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True).transpose(1, 2)
    assert not torch.allclose(out, dense)


SOFTCAP = 0.5  # below the typical scaled score of the random inputs, so the cap changes the weights


@pytest.mark.parametrize("backend", ["masked", "sorted"])
@pytest.mark.parametrize("q_len,span", [(40, None), (7, None), (40, 9)])
def test_kernel_applies_the_softcap_as_the_pairwise_definition(backend, q_len, span):
    query, key, value, qc, kc, real = _inputs(q_len=q_len)
    routing = torch.tensor([False, True, True, False, False, True])
    options = dict(window=4, sinks=2, padding=real, span=span)
    out = routing_attention(
        query, key, value, qc, kc, routing, scaling=None, backend=backend, softcap=SOFTCAP, **options
    )
    expected = _loop_reference(query, key, value, qc, kc, routing, 4, 2, real, span, softcap=SOFTCAP)
    assert not torch.allclose(
        expected, _loop_reference(query, key, value, qc, kc, routing, 4, 2, real, span), atol=1e-3
    )
    torch.testing.assert_close(out, expected, atol=ATOL_FP32, rtol=1e-5)
    naive = naive_routing_attention(query, key, value, qc, kc, routing, scaling=8**-0.5, softcap=SOFTCAP, **options)
    torch.testing.assert_close(naive, expected, atol=ATOL_FP32, rtol=1e-5)


@pytest.mark.parametrize("backend", ["masked", "sorted"])
def test_softcapped_gradients_equal_the_naive_definitions(backend):
    query, key, value, qc, kc, real = _inputs(total=70, q_len=70, pad=(3, 0))
    routing = torch.tensor([True, False, True, True, False, True])
    options = dict(window=5, sinks=1, padding=real, softcap=SOFTCAP)
    weights = torch.arange(70 * 6 * 8).reshape(1, 70, 6, 8).sin()
    grads = []
    for fn in (
        lambda *t: naive_routing_attention(*t, qc, kc, routing, scaling=8**-0.5, **options),
        lambda *t: routing_attention(*t, qc, kc, routing, scaling=None, backend=backend, **options),
    ):
        q, k, v = (t.clone().requires_grad_() for t in (query, key, value))
        grads.append(torch.autograd.grad((fn(q, k, v) * weights).sum(), (q, k, v)))
    for name, got, expected in zip("qkv", grads[1], grads[0]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=name)
