"""combiner: Combiner's factorised attention (arXiv:2107.05768) inside real models: the patched layers compute the
naive definition, decoding reads the cached queries, short inputs keep the model's own attention, bad options."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, StaticCache

import hf_attn_zoo
from hf_attn_zoo.errors import InvalidInputError, InvalidOptionError, UnsupportedArchitectureError
from hf_attn_zoo.kernels.combiner import naive_combiner_attention
from hf_attn_zoo.patches import combiner as combiner_patch
from hf_attn_zoo.patches.combiner import QueryCacheLayer
from tests.matrix import ATOL_FP32, clone, tiny_model


def _ids(batch: int = 2, length: int = 14) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(0))


def _naive(query, key, value, *, dropout=0.0, **options):
    return naive_combiner_attention(query, key, value, **options)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3", "deepseek_v3"])
@pytest.mark.parametrize("factorisation", ["fixed", "logsparse"])
def test_patched_layers_compute_the_naive_definition(family, factorisation, monkeypatch):
    """GQA, Gemma 2's softcap and sliding layers, Gemma 3's query scalar, MLA's head dims: the model's logits with
    the blockwise kernel equal those with the explicit definition in every layer."""
    options = dict(factorisation=factorisation, block_size=3, sink_blocks=1, pooling="max", size_bias=True)
    model = hf_attn_zoo.patch(tiny_model(family), "combiner", **options)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    blockwise = model(ids, attention_mask=mask).logits
    monkeypatch.setattr(combiner_patch, "combiner_attention", _naive)
    naive = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(blockwise, naive, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(blockwise, tiny_model(family)(ids, attention_mask=mask).logits, atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "gemma2", "mistral"])
@pytest.mark.parametrize("factorisation", ["fixed", "logsparse"])
def test_decoding_with_the_cache_equals_the_full_forward(family, factorisation):
    """Max pooling (the paper's), sliding windows and softcap: each step pools the cached queries and keys."""
    model = hf_attn_zoo.patch(
        tiny_model(family), "combiner", factorisation=factorisation, block_size=2, sink_blocks=int(family == "llama")
    )
    ids = _ids(2, 13)
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :5], cache=cache, use_cache=True).logits]
        steps += [model(ids[:, t : t + 2], cache=cache, use_cache=True).logits for t in range(5, 13, 2)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)
    layers = [layer for layer in cache.layers if isinstance(layer, QueryCacheLayer)]
    assert len(layers) == model.config.num_hidden_layers
    assert all(layer.queries.shape[2] == 13 and layer.keys.shape[2] == 13 for layer in layers)


def test_short_inputs_run_the_models_own_attention():
    """No query has a region while a row fits in its direct blocks: the layer calls the original implementation."""
    base = tiny_model("llama")
    model = hf_attn_zoo.patch(clone(base), "combiner", block_size=4, direct_blocks=2)
    ids = _ids(2, 8)
    torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=ATOL_FP32, rtol=0)
    longer = _ids(2, 9)
    assert not torch.allclose(model(longer).logits, base(longer).logits, atol=1e-4)


def test_more_direct_blocks_move_toward_the_dense_model():
    base = tiny_model("llama")
    ids = _ids(2, 40)
    dense = base(ids).logits
    errors = []
    for direct in (1, 4, 10):
        model = hf_attn_zoo.patch(clone(base), "combiner", block_size=4, direct_blocks=direct)
        errors.append((model(ids).logits - dense).abs().mean().item())
    assert errors[0] > errors[1] > errors[2] == pytest.approx(0.0, abs=1e-6)


def test_a_cache_without_queries_is_refused_with_the_fix():
    base = tiny_model("llama")
    ids = _ids(1, 8)
    cache = DynamicCache(config=base.config)
    with torch.no_grad():
        base(ids[:, :6], cache=cache, use_cache=True)  # filled before the patch: keys, but no queries
        model = hf_attn_zoo.patch(base, "combiner", block_size=2)
        with pytest.raises(UnsupportedArchitectureError, match="DynamicCache"):
            model(ids[:, 6:], cache=cache, use_cache=True)
    with torch.no_grad(), pytest.raises(InvalidInputError, match="the combiner patch decodes over a dynamic KV cache"):
        model(ids, cache=StaticCache(config=model.config, max_cache_len=16), use_cache=True)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"block_size": 0}, "block_size=0"),
        ({"block_size": 512}, "max_position_embeddings"),
        ({"block_size": 64, "direct_blocks": 5}, "direct_blocks=5"),
        ({"direct_blocks": 0}, "direct_blocks=0"),
        ({"block_size": 64, "sink_blocks": 5}, "sink_blocks=5"),
        ({"factorisation": "axial"}, "factorisation"),
        ({"pooling": "sum"}, "pooling"),
    ],
)
def test_bad_options_are_refused_and_the_model_is_untouched(options, match):
    model = tiny_model("llama")
    with pytest.raises(InvalidOptionError, match=match):
        hf_attn_zoo.patch(model, "combiner", **options)
    assert hf_attn_zoo.applied_patches(model) == []


def test_models_with_attention_sinks_are_refused():
    with pytest.raises(UnsupportedArchitectureError, match="sinks"):
        hf_attn_zoo.patch(tiny_model("gpt_oss"), "combiner")
