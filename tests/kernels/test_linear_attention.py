"""Linear / hybrid attention kernels against the naive definitions (forward and gradients), the state, feature maps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_attn_zoo.kernels.feature_maps import FEATURE_MAPS, register_feature_map
from hf_attn_zoo.kernels.linear_attention import (
    LinearFeatures,
    absorb,
    hybrid_attention,
    naive_hybrid_attention,
)

B, H, KV, D, DV = 2, 6, 2, 8, 5


def _inputs(q_len: int, k_len: int, seed: int = 0, rotated: bool = True):
    g = torch.Generator().manual_seed(seed)
    query, key = torch.randn(B, H, q_len, D, generator=g), torch.randn(B, KV, k_len, D, generator=g)
    value = torch.randn(B, KV, k_len, DV, generator=g)
    fq, fk = (
        FEATURE_MAPS["elu"](torch.randn(B, H, q_len, D, generator=g), True),
        FEATURE_MAPS["elu"](torch.randn(B, KV, k_len, D, generator=g), False),
    )
    # numerator features that differ from the normaliser's (NaLaFormer rotates them; they may be negative)
    num_q = fq + 0.3 * torch.randn(fq.shape, generator=g) if rotated else fq
    num_k = fk + 0.3 * torch.randn(fk.shape, generator=g) if rotated else fk
    real = torch.ones(B, k_len, dtype=torch.bool)
    real[0, :3] = False
    weight = torch.rand(H, generator=g)
    return query, key, value, LinearFeatures(num_q, num_k, fq, fk), real, weight


def _pairwise(query, key, value, features, window, weight, scaling, real, span=None, softcap=None):
    """The definition written out query by query (no shared masks or broadcasting)."""
    group = H // KV
    k_len, q_len = key.shape[2], query.shape[2]
    out = torch.zeros(B, q_len, H, DV)
    for b in range(B):
        for h in range(H):
            kh = h // group
            for qi in range(q_len):
                i = k_len - q_len + qi
                win = [j for j in range(i + 1) if i - j < window and real[b, j]]
                lin = [j for j in range(i + 1) if i - j >= window and (span is None or i - j < span) and real[b, j]]
                num, den = torch.zeros(DV), torch.tensor(0.0)
                if win:
                    s = torch.stack([query[b, h, qi] @ key[b, kh, j] * scaling for j in win])
                    if softcap:
                        s = softcap * torch.tanh(s / softcap)
                    e = weight[h] * torch.exp(s - s.max())
                    num = num + e @ value[b, kh, win]
                    den = den + e.sum()
                for j in lin:
                    num = num + (features.q[b, h, qi] @ features.k[b, kh, j]) * value[b, kh, j]
                    den = den + features.q_norm[b, h, qi] @ features.k_norm[b, kh, j]
                out[b, qi, h] = num / den.clamp_min(1e-12)
    return out


CASES = [  # q_len, k_len, window, span, chunk
    (19, 19, 4, None, 4),  # blocked window + chunked linear
    (19, 19, 0, None, 4),  # pure linear
    (19, 19, 40, None, 4),  # the window covers everything: softmax
    (9, 19, 4, None, 4),  # queries after cached keys
    (19, 19, 3, 8, 4),  # a bounded linear span (a layer with its own sliding window)
    (1, 6, 7, None, 4),  # a decode step
]


@pytest.mark.parametrize("q_len,k_len,window,span,chunk", CASES)
def test_naive_matches_the_pairwise_definition(q_len, k_len, window, span, chunk):
    query, key, value, features, real, weight = _inputs(q_len, k_len)
    expected = _pairwise(query, key, value, features, window, weight, 0.3, real, span)
    out = naive_hybrid_attention(
        query, key, value, features, window=window, window_weight=weight, scaling=0.3, span=span, key_real=real
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q_len,k_len,window,span,chunk", CASES + [(37, 50, 6, None, 8), (40, 40, 5, 30, 16)])
def test_chunked_matches_naive_forward_and_gradients(q_len, k_len, window, span, chunk):
    query, key, value, features, real, weight = _inputs(q_len, k_len)
    leaves = [query, key, value, *features, weight]
    for t in leaves:
        t.requires_grad_(True)
    options = dict(window=window, window_weight=weight, scaling=0.3, span=span, key_real=real)
    out = hybrid_attention(query, key, value, features, chunk=chunk, **options)
    ref = naive_hybrid_attention(query, key, value, features, **options)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((out * probe).sum(), leaves, allow_unused=True)
    ref_grads = torch.autograd.grad((ref * probe).sum(), leaves, allow_unused=True)
    for leaf, got, want in zip(leaves, grads, ref_grads, strict=True):
        zeros = torch.zeros_like(leaf)  # an input a path does not use (the window's, at window 0) has no gradient
        torch.testing.assert_close(zeros if got is None else got, zeros if want is None else want, atol=1e-4, rtol=1e-4)


def test_a_window_over_every_key_is_softmax_attention():
    query, key, value, features, _, weight = _inputs(12, 12)
    out = hybrid_attention(query, key, value, features, window=12, window_weight=weight, scaling=D**-0.5)
    expected = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("window", [0, 3])
def test_state_of_absorbed_keys_continues_the_sequence(window):
    """Keys folded into a state give the same output as keeping them: what decoding relies on."""
    query, key, value, features, _, weight = _inputs(20, 20, rotated=False)
    full = hybrid_attention(query, key, value, features, window=window, window_weight=weight, scaling=0.3)
    cut = 12 - max(window - 1, 0)  # keys before `cut` are out of every window of the queries from position 12 on
    state = absorb(None, features.k[:, :, :cut], features.k_norm[:, :, :cut], value[:, :, :cut])
    tail = LinearFeatures(
        features.q[:, :, 12:], features.k[:, :, cut:], features.q_norm[:, :, 12:], features.k_norm[:, :, cut:]
    )
    out = hybrid_attention(
        query[:, :, 12:],
        key[:, :, cut:],
        value[:, :, cut:],
        tail,
        window=window,
        window_weight=weight,
        scaling=0.3,
        state=state,
    )
    torch.testing.assert_close(out, full[:, 12:], atol=1e-5, rtol=1e-5)


def test_padding_keys_are_ignored():
    query, key, value, features, real, weight = _inputs(10, 10)
    options = dict(window=3, window_weight=weight, scaling=0.3, key_real=real, chunk=4)
    out = hybrid_attention(query, key, value, features, **options)
    noisy = key.clone(), value.clone()
    noisy[0][0, :, :3] += 100
    noisy[1][0, :, :3] -= 50
    torch.testing.assert_close(hybrid_attention(query, *noisy, features, **options)[0, 3:], out[0, 3:])


@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
def test_feature_maps_are_non_negative_with_finite_gradients(name):
    x = torch.randn(3, 4, 5, 8)
    x[0, 0, 0] = 0.0  # a zero vector: NaLaFormer's power and its norm must stay finite
    x.requires_grad_(True)
    fmap = FEATURE_MAPS[name]
    for is_query in (True, False):
        out = fmap(x, is_query)
        assert out.shape[-1] == fmap.blocks * 8
        assert (out >= 0).all()
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert torch.isfinite(grad).all()


def test_nala_sharpens_with_the_query_norm():
    """NaLaFormer's point: a longer query gives a lower-entropy distribution over the same keys."""
    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(8, generator=g), torch.randn(64, 8, generator=g)
    fmap = FEATURE_MAPS["nala"]

    def entropy(scale: float) -> float:
        scores = fmap(keys, False) @ fmap(q * scale, True)
        p = scores / scores.sum()
        return float(-(p * p.clamp_min(1e-30).log()).sum())

    assert entropy(0.1) > entropy(1.0) > entropy(5.0)
    # the direction is what the features see; the norm enters only through the power p = 3 (0.5 + tanh |q|)
    power = 3 * (0.5 + torch.tanh(q.norm()))
    direction = q / q.norm()
    expected = torch.cat([F.relu(direction) ** power, F.relu(-direction) ** power])
    torch.testing.assert_close(fmap(q, True), expected)
    torch.testing.assert_close(fmap(keys, False), torch.cat([F.relu(keys**3), F.relu(-(keys**3))], -1))


def test_register_feature_map_refuses_a_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        register_feature_map("nala", blocks=1, summary="again")(lambda x, is_query: x)


def _reference_chunk_linear_attn(
    q, k, v, scale=None, initial_state=None, output_final_state=False, normalize=True, head_first=False
):
    """flash-linear-attention's `chunk_linear_attn` as its docstring defines it ([B, T, H, K] layout), for the test
    of our integration on machines without fla's Triton kernels: o_t = scale * q_t (S_0 + sum_{j<=t} k_j v_j^T)."""
    assert not head_first and not normalize
    scores = torch.einsum("bthf,bshf->bhts", q, k).tril()
    out = torch.einsum("bhts,bshd->bthd", scores, v)
    if initial_state is not None:
        out = out + torch.einsum("bthf,bhfd->bthd", q, initial_state)
    return out * scale, None


@pytest.mark.parametrize("q_len,k_len,window,span,chunk", CASES + [(37, 50, 6, None, 8)])
def test_the_fla_backend_computes_the_same_attention(q_len, k_len, window, span, chunk, monkeypatch):
    """Our use of fla (shifted keys, GQA, initial state, the separate normaliser) against the torch path; fla itself
    needs a GPU (benchmarks/gpu_check.py compares the real kernels there)."""
    import sys
    import types

    module = types.ModuleType("fla.ops.linear_attn")
    module.chunk_linear_attn = _reference_chunk_linear_attn
    for name in ("fla", "fla.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "fla.ops.linear_attn", module)
    query, key, value, features, real, weight = _inputs(q_len, k_len)
    options = dict(window=window, window_weight=weight, scaling=0.3, span=span, key_real=real, chunk=chunk)
    torch.testing.assert_close(
        hybrid_attention(query, key, value, features, backend="fla", **options),
        hybrid_attention(query, key, value, features, **options),
        atol=1e-5,
        rtol=1e-5,
    )


SOFTCAP = 0.5  # below the typical scaled score of the random inputs, so the cap changes the weights
SOFTCAP_CASES = [case for case in CASES if case[2] > 0] + [(37, 50, 6, None, 8)]


@pytest.mark.parametrize("q_len,k_len,window,span,chunk", SOFTCAP_CASES)
def test_the_softcap_caps_the_window_scores_forward_and_gradients(q_len, k_len, window, span, chunk):
    query, key, value, features, real, weight = _inputs(q_len, k_len)
    expected = _pairwise(query, key, value, features, window, weight, 0.3, real, span, softcap=SOFTCAP)
    assert not torch.allclose(expected, _pairwise(query, key, value, features, window, weight, 0.3, real, span))
    leaves = [query, key, value, *features, weight]
    for t in leaves:
        t.requires_grad_(True)
    options = dict(window=window, window_weight=weight, scaling=0.3, span=span, key_real=real, softcap=SOFTCAP)
    out = hybrid_attention(query, key, value, features, chunk=chunk, **options)
    ref = naive_hybrid_attention(query, key, value, features, **options)
    torch.testing.assert_close(ref, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((out * probe).sum(), leaves, allow_unused=True)
    ref_grads = torch.autograd.grad((ref * probe).sum(), leaves, allow_unused=True)
    for leaf, got, want in zip(leaves, grads, ref_grads, strict=True):
        zeros = torch.zeros_like(leaf)
        torch.testing.assert_close(zeros if got is None else got, zeros if want is None else want, atol=1e-4, rtol=1e-4)


def test_a_window_over_every_key_is_softcapped_softmax_attention():
    query, key, value, features, _, weight = _inputs(12, 12)
    out = hybrid_attention(
        query, key, value, features, window=12, window_weight=weight, scaling=D**-0.5, softcap=SOFTCAP
    )
    scores = query @ key.repeat_interleave(H // KV, 1).transpose(-1, -2) * D**-0.5
    scores = (SOFTCAP * torch.tanh(scores / SOFTCAP)).masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), -1e9)
    expected = (torch.softmax(scores, -1) @ value.repeat_interleave(H // KV, 1)).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
