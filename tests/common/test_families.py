"""Family adapters: every spec resolves on a tiny model of its family; unknown architectures are refused."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

import hf_attn_zoo
from hf_attn_zoo.errors import UnsupportedArchitectureError
from hf_attn_zoo.families import family_specs, resolve_family, supported_model_types
from tests.matrix import FAMILIES, tiny_model


def test_the_issue_families_are_supported():
    assert {"llama", "mistral", "qwen2", "qwen3", "olmo2", "gemma3_text"} <= set(supported_model_types())


@pytest.mark.parametrize("family", FAMILIES)
def test_spec_resolves_modules_and_heads(family):
    spec = family_specs()[family]
    model = tiny_model(family)
    assert resolve_family(model.config) == spec
    layers = spec.decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    assert spec.decoder_layers(model.model) is layers
    attention = spec.attention_module(model, 0)
    if spec.attention.kind != "standard":
        # e.g. DeepSeek-V3 MLA: only the module is named, attention patches refuse the family
        assert isinstance(attention, torch.nn.Module)
        return
    layout = spec.head_layout(model.config)
    q, o = getattr(attention, spec.attention.q), getattr(attention, spec.attention.o)
    assert q.out_features == layout.num_heads * layout.head_dim == o.in_features
    assert getattr(attention, spec.attention.k).out_features == layout.num_kv_heads * layout.head_dim
    for norm in spec.attention.qk_norm or ():
        assert isinstance(getattr(attention, norm), torch.nn.Module)


def test_gemma3_tiny_model_mixes_sliding_and_global_layers():
    model = tiny_model("gemma3")
    assert model.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]


def test_an_architecture_of_another_shape_is_refused_with_what_did_not_fit():
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    expected = (
        "model_type 'gpt2' is not recognised by hf_attn_zoo: GPT2LMHeadModel has no list of 1 decoder layers "
        "named `layers` to patch. Family files exist for .*llama.*qwen3"
    )
    with pytest.raises(UnsupportedArchitectureError, match=expected):
        hf_attn_zoo.patch(model, "moh")
    assert hf_attn_zoo.applied_patches(model) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_families_name_their_router_and_experts(family):
    spec = family_specs()[family]
    model = tiny_model(family)
    moe_layers = spec.moe_layers(model)
    if spec.mlp.kind == "dense":
        assert moe_layers == []
        return
    # DeepSeek-V3 keeps its first `first_k_dense_replace` MLPs dense
    first_moe = getattr(model.config, "first_k_dense_replace", 0)
    assert moe_layers == list(range(first_moe, model.config.num_hidden_layers))
    assert not hasattr(spec.mlp_module(model, 0), spec.mlp.router) or first_moe == 0
    mlp = spec.mlp_module(model, moe_layers[0])
    router, experts = getattr(mlp, spec.mlp.router), getattr(mlp, spec.mlp.experts)
    assert router.top_k == model.config.num_experts_per_tok
    assert experts.gate_up_proj.shape[0] == router.weight.shape[0]


def test_moe_layers_skip_dense_layers_of_mixed_models():
    model = tiny_model("qwen3_moe", mlp_only_layers=[0])
    assert family_specs()["qwen3_moe"].moe_layers(model) == [1]


def test_attention_spec_kinds():
    from pydantic import ValidationError

    from hf_attn_zoo.families.spec import AttentionSpec

    assert AttentionSpec(module="self_attn", kind="mla").q is None
    with pytest.raises(ValidationError, match="names all of q, k, v and o"):
        AttentionSpec(module="self_attn", q="q_proj")
    with pytest.raises(ValidationError, match="names no q/k/v/o"):
        AttentionSpec(module="self_attn", kind="mla", q="q_proj")
