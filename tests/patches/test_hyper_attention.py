"""HyperAttention (arXiv:2310.05869): exactness limits, the LSE merge, sortLSH, the approximation, the patch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_attn_zoo
from hf_attn_zoo.errors import InvalidOptionError
from hf_attn_zoo.families import family_specs
from hf_attn_zoo.kernels.hyper_attention import (
    attention_with_lse,
    gray_rank,
    hyper_attention,
    hyper_attention_with_lse,
    merge_attention,
)
from hf_attn_zoo.registry import get_patch
from tests.matrix import clone, tiny_model

SMALL = dict(block_size=16, sample_size=16, min_seq_len=32)


def _qkv(n=96, heads=4, kv_heads=2, dim=16, batch=2, dv=None):
    return (
        torch.randn(batch, heads, n, dim),
        torch.randn(batch, kv_heads, n, dim),
        torch.randn(batch, kv_heads, n, dv or dim),
    )


def _sdpa(q, k, v, causal=True):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def test_exact_below_min_seq_len_equals_sdpa():
    q, k, v = _qkv()
    torch.testing.assert_close(hyper_attention(q, k, v, min_seq_len=96), _sdpa(q, k, v), atol=1e-5, rtol=1e-5)
    out, lse = attention_with_lse(q, k, v, causal=True)
    scores = (q.unflatten(1, (2, 2)) @ k.unsqueeze(2).transpose(-1, -2)).flatten(1, 2) * 16**-0.5
    scores = scores.masked_fill(~torch.ones(96, 96, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(lse, scores.logsumexp(-1))
    torch.testing.assert_close(out, _sdpa(q, k, v), atol=1e-5, rtol=1e-5)


def test_one_block_without_residual_is_exact():
    q, k, v = _qkv()
    # block_size >= n: one sortLSH block holds every key, so the non-causal part (and every rectangle) is exact
    non_causal = hyper_attention(q, k, v, causal=False, block_size=96, sample_size=0, min_seq_len=8)
    torch.testing.assert_close(non_causal, _sdpa(q, k, v, causal=False), atol=1e-5, rtol=1e-5)
    causal = hyper_attention(q, k, v, block_size=96, sample_size=16, min_seq_len=8)
    torch.testing.assert_close(causal, _sdpa(q, k, v), atol=1e-5, rtol=1e-5)


def test_approximation_differs_from_exact_when_blocks_split():
    q, k, v = _qkv()
    assert not torch.allclose(hyper_attention(q, k, v, **SMALL), _sdpa(q, k, v), atol=1e-3)


def test_lse_merge_of_disjoint_key_sets_equals_attention_over_their_union():
    q, k, v = _qkv(n=40, dv=24)
    first, second = torch.arange(0, 40, 3), torch.tensor([i for i in range(40) if i % 3])
    out1, lse1 = attention_with_lse(q, k[:, :, first], v[:, :, first])
    out2, lse2 = attention_with_lse(q, k[:, :, second], v[:, :, second])
    merged, lse = merge_attention(out1, lse1, out2, lse2)
    full, full_lse = attention_with_lse(q, k, v)
    torch.testing.assert_close(merged, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, full_lse)
    torch.testing.assert_close(full, _sdpa(q, k, v, causal=False), atol=1e-5, rtol=1e-5)


def test_merge_with_an_empty_part_keeps_the_other():
    out, lse = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5)
    empty_out, empty_lse = torch.zeros(1, 2, 5, 4), torch.full((1, 2, 5), float("-inf"))
    merged, merged_lse = merge_attention(out, lse, empty_out, empty_lse)
    torch.testing.assert_close(merged, out)
    torch.testing.assert_close(merged_lse, lse)


def test_gray_rank_orders_buckets_so_neighbours_differ_by_one_bit():
    words = torch.tensor([[(w >> j) & 1 for j in range(5)] for w in range(32)], dtype=torch.bool)
    ranks = gray_rank(words)
    assert sorted(ranks.tolist()) == list(range(32))
    in_order = words[torch.argsort(ranks)]
    assert ((in_order[1:] ^ in_order[:-1]).sum(-1) == 1).all()


def _planted(n=2048, heads=4, kv_heads=2, dim=32):
    """Each query is a noisy, scaled copy of one earlier key: its attention mass sits mostly on that key, which
    sortLSH should put into the query's block."""
    generator = torch.Generator().manual_seed(3)
    k = torch.randn(1, kv_heads, n, dim, generator=generator)
    v = torch.randn(1, kv_heads, n, dim, generator=generator)
    match = (torch.rand(1, heads, n, generator=generator) * torch.arange(1, n + 1)).long()
    shared = k.repeat_interleave(heads // kv_heads, 1)
    q = 2 * shared.gather(2, match[..., None].expand(-1, -1, -1, dim))
    return q + 0.1 * torch.randn(1, heads, n, dim, generator=generator), k, v


def _relative_error(out, exact):
    return float((out - exact).norm() / exact.norm())


@pytest.mark.parametrize("causal", [False, True])
def test_approximation_error_is_small_on_structured_inputs(causal):
    q, k, v = _planted()
    options = dict(causal=causal, block_size=256, lsh_num_projs=7, min_seq_len=512)
    exact = _sdpa(q, k, v, causal=causal)
    # a baseline that ignores the scores: uniform attention over the allowed keys
    uniform = v.cumsum(2) / torch.arange(1, 2049)[:, None] if causal else v.mean(2, keepdim=True).expand_as(v)
    baseline = _relative_error(uniform.repeat_interleave(2, dim=1), exact)
    blocks_only = _relative_error(hyper_attention(q, k, v, sample_size=0, **options), exact)
    out = hyper_attention(q, k, v, sample_size=256, **options)
    error = _relative_error(out, exact)
    assert error < 0.5 * baseline, (error, baseline)
    # the importance-weighted residual recovers part of what the blocks miss
    assert error < blocks_only, (error, blocks_only)
    if causal:
        # the causal recursion's first leaf is exact attention
        torch.testing.assert_close(out[:, :, :512], exact[:, :, :512], atol=1e-5, rtol=1e-5)


def test_weighted_residual_estimates_the_log_partition_function():
    # near-uniform scores: the blocks hold 256 of 2048 keys; the samples outside the query's block, weighted by
    # n / m, stand for the rest (a missing weight or double-counted own-block samples shift the mean by >= 0.1)
    generator = torch.Generator().manual_seed(4)
    q, k, v = (0.5 * torch.randn(1, h, 2048, 32, generator=generator) for h in (4, 2, 2))
    _, exact = attention_with_lse(q, k, v)
    options = dict(causal=False, block_size=256, min_seq_len=512)
    _, lse = hyper_attention_with_lse(q, k, v, sample_size=256, **options)
    _, blocks_only = hyper_attention_with_lse(q, k, v, sample_size=0, **options)
    assert float((lse - exact).abs().mean()) < 0.05
    assert float((blocks_only - exact).abs().mean()) > 1.0


def test_seed_makes_results_reproducible():
    q, k, v = _qkv()
    first = hyper_attention(q, k, v, seed=5, **SMALL)
    assert torch.equal(first, hyper_attention(q, k, v, seed=5, **SMALL))
    generator = torch.Generator().manual_seed(5)
    assert torch.equal(first, hyper_attention(q, k, v, generator=generator, **SMALL))
    assert not torch.equal(first, hyper_attention(q, k, v, seed=6, **SMALL))


def test_rows_do_not_depend_on_their_batch():
    q, k, v = _qkv()
    batch = hyper_attention(q, k, v, **SMALL)
    alone = hyper_attention(q[1:], k[1:], v[1:], **SMALL)
    torch.testing.assert_close(batch[1:], alone, atol=1e-6, rtol=1e-6)


def test_gradients_reach_queries_keys_and_values():
    q, k, v = (t.requires_grad_() for t in _qkv(dv=8))
    out, lse = hyper_attention_with_lse(q, k, v, **SMALL)
    assert out.shape == (2, 4, 96, 8) and lse.shape == (2, 4, 96)
    (out.square().sum() + lse.sum()).backward()
    for tensor in (q, k, v):
        assert torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


def test_gradients_of_the_exact_limit_match_sdpa():
    q, k, v = _qkv()
    tensors = [t.clone().requires_grad_() for t in (q, k, v)]
    reference = [t.clone().requires_grad_() for t in (q, k, v)]
    weights = torch.randn(2, 4, 96, 16)
    (hyper_attention(*tensors, block_size=96, min_seq_len=8) * weights).sum().backward()
    (_sdpa(*reference) * weights).sum().backward()
    for ours, theirs in zip(tensors, reference):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "causal,options",
    [
        (True, SMALL),
        # one sample: the queries of its block have an empty residual
        (False, dict(block_size=16, sample_size=1, min_seq_len=8)),
    ],
)
def test_inference_kernel_and_differentiable_path_agree(causal, options):
    # without gradients the CPU flash kernel runs the exact parts; with them, the PyTorch path
    q, k, v = _qkv(n=200 if causal else 40)
    k[:, :, :20] = 8 * q[:, :2, :20]  # some queries attend sharply
    inference = hyper_attention_with_lse(q, k, v, causal=causal, **options)
    training = hyper_attention_with_lse(q.requires_grad_(), k, v, causal=causal, **options)
    for fast, slow in zip(inference, training):
        assert torch.isfinite(fast).all()
        torch.testing.assert_close(fast, slow.detach(), atol=1e-5, rtol=1e-5)


def test_causal_needs_as_many_queries_as_keys():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="decode steps"):
        hyper_attention(q[:, :, :1], k, v, **SMALL)


# the patch on a tiny model


GRID = dict(min_seq_len=4, block_size=2, sample_size=2)


def _llama(layers=2):
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=128,
        max_position_embeddings=256,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_patch_changes_long_prefill_and_keeps_short_inputs_exact():
    base = _llama()
    model = hf_attn_zoo.patch(clone(base), "hyper_attention", min_seq_len=8, block_size=2, sample_size=2)
    short, long = torch.randint(3, 128, (2, 8)), torch.randint(3, 128, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(short).logits, base(short).logits, atol=1e-5, rtol=0)
        assert not torch.allclose(model(long).logits, base(long).logits, atol=1e-3)


def test_decode_steps_attend_the_cache_exactly():
    from transformers import DynamicCache

    # one layer: the cached keys/values come from the embeddings, so both caches hold the same prefill
    base = _llama(layers=1)
    model = hf_attn_zoo.patch(clone(base), "hyper_attention", **GRID)
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        caches = [DynamicCache(config=m.config) for m in (model, base)]
        prefill = [m(ids[:, :10], cache=c, use_cache=True).logits for m, c in zip((model, base), caches)]
        assert not torch.allclose(*prefill, atol=1e-3)
        ours = model(ids[:, 10:11], cache=caches[0], use_cache=True).logits
        exact = base(ids[:, 10:11], cache=caches[1], use_cache=True).logits
    torch.testing.assert_close(ours, exact, atol=1e-5, rtol=0)


def test_left_padded_rows_equal_the_rows_alone_and_generate_works():
    model = hf_attn_zoo.patch(_llama(), "hyper_attention", **GRID)
    rows = [torch.randint(3, 128, (1, n)) for n in (11, 7)]
    ids = torch.cat([rows[0], torch.cat([torch.zeros(1, 4, dtype=torch.long), rows[1]], 1)])
    mask = (ids != 0).long()
    mask[0] = 1
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(logits[0:1], model(rows[0]).logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits[1:, 4:], model(rows[1]).logits, atol=1e-4, rtol=1e-4)
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, 15)
    alone = model.generate(rows[1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(generated[1, 4:], alone[0])


def test_training_gradients_flow_through_the_approximation():
    model = hf_attn_zoo.patch(_llama(), "hyper_attention", **GRID)
    model.train()
    ids = torch.randint(3, 128, (2, 16))
    model(ids, labels=ids).loss.backward()
    for name in ("q_proj", "k_proj", "v_proj"):
        grad = model.model.layers[1].self_attn.get_submodule(name).weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_neutral_setting_is_exact_attention():
    base = _llama()
    neutral = get_patch("hyper_attention").neutral_config(family_specs()["llama"], base.config)
    assert neutral.min_seq_len >= 256
    model = hf_attn_zoo.patch(clone(base), "hyper_attention", **neutral.to_dict())
    ids = torch.randint(3, 128, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-5, rtol=0)


def test_sliding_window_layers_keep_their_attention_and_all_local_models_are_refused():
    spec = family_specs()["mistral"]
    reason = get_patch("hyper_attention").check(spec, spec.tiny_config())
    assert reason is not None and "sliding window" in reason
    assert get_patch("hyper_attention").check(spec, spec.tiny_config(sliding_window=None)) is None
    model = hf_attn_zoo.patch(tiny_model("gemma3"), "hyper_attention", **GRID)
    handled = [hasattr(model.model.layers[i].self_attn, "_zoo_attention_handler") for i in range(3)]
    assert handled == [False, False, True]
    with pytest.raises(InvalidOptionError, match="sliding window"):
        hf_attn_zoo.patch(tiny_model("gemma3"), "hyper_attention", layers=[0, 1], **GRID)


@pytest.mark.parametrize(
    "option,value,match",
    [
        ("block_size", 0, "block_size=0"),
        ("block_size", 257, "max_position_embeddings"),
        ("sample_size", -1, "sample_size=-1"),
        ("lsh_num_projs", 0, "lsh_num_projs=0"),
        ("lsh_num_projs", 17, "<= 16"),
        ("min_seq_len", 0, "min_seq_len=0"),
        ("seed", -1, "seed=-1"),
    ],
)
def test_bad_options_are_refused_and_the_model_is_untouched(option, value, match):
    model = _llama()
    with pytest.raises(InvalidOptionError, match=match):
        hf_attn_zoo.patch(model, "hyper_attention", **{option: value})
    assert hf_attn_zoo.applied_patches(model) == []
    assert model.config._attn_implementation != "zoo"
