"""NaLaFormer (arXiv:2506.21137) as a patch: the `linearize` patch with the norm-aware map, pure linear by default.
Kernels and map: tests/kernels/test_linear_attention.py; the shared machinery: tests/patches/test_linearize.py."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import hf_attn_zoo
from hf_attn_zoo.errors import InvalidOptionError
from hf_attn_zoo.kernels.feature_maps import FEATURE_MAPS
from hf_attn_zoo.kernels.linear_attention import LinearFeatures, naive_hybrid_attention
from hf_attn_zoo.kernels.linear_cache import LinearStateLayer
from hf_attn_zoo.patches.linearize import linear_attention_layers
from tests.matrix import clone, tiny_model


def test_defaults_are_pure_norm_aware_linear_attention_with_rope_on_the_features():
    model = hf_attn_zoo.patch(tiny_model("llama"), "nalaformer")
    (record,) = hf_attn_zoo.applied_patches(model)
    assert record["options"]["feature_map"] == "nala" and record["options"]["window"] == 0
    assert record["options"]["rope"] == "features"
    maps = next(iter(linear_attention_layers(model).values()))
    assert not hasattr(maps, "window_logit")  # nothing to mix without a window


def test_a_layer_computes_the_causal_nalaformer_equation():
    """o_t = (R phi(q_t))^T sum_j R phi(k_j) v_j^T / (phi(q_t)^T sum_j phi(k_j)), with RoPE on the feature blocks,
    written out here from the family's own q/k/v (captured before RoPE) and rotation."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    base = tiny_model("llama")
    model = hf_attn_zoo.patch(clone(base), "nalaformer", layers=[0])
    attention = model.model.layers[0].self_attn
    captured = {}
    attention.register_forward_pre_hook(lambda m, args, kwargs: captured.update(kwargs), with_kwargs=True)
    attention.register_forward_hook(lambda m, args, kwargs, out: captured.update(out=out[0]), with_kwargs=True)
    ids = torch.randint(3, 128, (1, 9))
    with torch.no_grad():
        model(ids)
        hidden, (cos, sin) = captured["hidden_states"], captured["position_embeddings"]
        shape = (1, 9, -1, attention.head_dim)
        q = attention.q_proj(hidden).view(shape).transpose(1, 2)
        k = attention.k_proj(hidden).view(shape).transpose(1, 2)
        v = attention.v_proj(hidden).view(shape).transpose(1, 2)
        nala = FEATURE_MAPS["nala"]
        fq, fk = nala(q, True), nala(k, False)

        def rotate(f):  # each of the two d-sized blocks with the positions' RoPE
            parts = [apply_rotary_pos_emb(block, block, cos, sin)[0] for block in f.split(attention.head_dim, -1)]
            return torch.cat(parts, -1)

        features = LinearFeatures(rotate(fq), rotate(fk), fq, fk)
        out = naive_hybrid_attention(q, k, v, features, window=0, window_weight=None, scaling=attention.scaling)
        expected = attention.o_proj(out.reshape(1, 9, -1))
    torch.testing.assert_close(captured["out"], expected, atol=1e-5, rtol=1e-5)


def test_the_decode_cache_is_a_fixed_size_state():
    model = hf_attn_zoo.patch(tiny_model("llama"), "nalaformer")
    ids = torch.randint(3, 128, (1, 30))
    cache = DynamicCache(config=model.config)
    sizes = []
    with torch.no_grad():
        model(ids[:, :4], cache=cache, use_cache=True)
        for t in range(4, 30):
            model(ids[:, t : t + 1], cache=cache, use_cache=True)
            sizes.append(sum(layer.nbytes for layer in cache.layers))
    assert all(isinstance(layer, LinearStateLayer) and layer.keys.shape[2] == 0 for layer in cache.layers)
    assert len(set(sizes)) == 1


def test_other_feature_maps_are_refused_with_the_way_out():
    model = tiny_model("llama")
    with pytest.raises(InvalidOptionError, match="use the linearize patch"):
        hf_attn_zoo.patch(model, "nalaformer", feature_map="hedgehog")
    assert hf_attn_zoo.applied_patches(model) == []
