"""BAM Mixture-of-Attention: the paper's mixture against vanilla attention modules, routing, KV sharing, parallel
blocks, option checks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hf_attn_zoo
from hf_attn_zoo.errors import InvalidOptionError, PatchConflictError, UnsupportedArchitectureError
from hf_attn_zoo.families import family_specs
from hf_attn_zoo.patches.bam import ExpertLinear, ExpertOutputLinear
from hf_attn_zoo.registry import get_patch
from tests.matrix import ATOL_FP32, clone, tiny_model

N = 3


def _randomize(model: nn.Module, std: float = 0.1) -> None:
    """Distinct experts and a non-trivial router, at a scale that keeps the attention softmax unsaturated."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in hf_attn_zoo.new_parameters(model).items():
            scale = 1.0 if "attention_router" in name else std
            param.copy_(torch.randn(param.shape, generator=generator) * scale)


def _inputs(model: nn.Module, batch: int = 2, length: int = 7):
    x = torch.randn(batch, length, model.config.hidden_size)
    positions = torch.arange(length)[None].expand(batch, -1)
    return x, model.model.rotary_emb(x, positions)


def _vanilla_expert(base_attention: nn.Module, patched: nn.Module, j: int, kv: str) -> nn.Module:
    """A vanilla attention module carrying expert j's weights (with kv="shared": expert j's Q/O, the shared K/V)."""
    expert = copy.deepcopy(base_attention)
    projections = ("q_proj", "o_proj") if kv == "shared" else ("q_proj", "k_proj", "v_proj", "o_proj")
    with torch.no_grad():
        for name in projections:
            stacked = getattr(patched, name)
            getattr(expert, name).weight.copy_(stacked.expert_weight(j))
            if stacked.bias is not None:
                getattr(expert, name).bias.copy_(stacked.expert_bias(j))
    return expert


def _reference_gates(router_weight: torch.Tensor, x: torch.Tensor, top_k: int | None) -> torch.Tensor:
    logits = x @ router_weight.T
    if top_k is not None:
        kept = torch.full_like(logits, float("-inf"))
        index = logits.topk(top_k, dim=-1).indices
        logits = kept.scatter(-1, index, logits.gather(-1, index))
    return logits.softmax(-1)


@pytest.mark.parametrize(
    "family,options,attn,overrides",
    [
        ("llama", {"routing": "soft", "kv": "experts"}, "sdpa", {}),
        ("llama", {"routing": "top_k", "top_k": 2, "kv": "experts"}, "sdpa", {}),
        ("llama", {"routing": "soft", "kv": "shared"}, "sdpa", {}),
        ("llama", {"routing": "soft", "kv": "shared"}, "eager", {}),  # eager repeats K/V by num_key_value_groups
        ("llama", {"routing": "soft", "kv": "experts"}, "sdpa", {"attention_bias": True}),  # o_proj bias too
        ("qwen2", {"routing": "top_k", "top_k": 1, "kv": "shared"}, "sdpa", {}),  # biases on q/k/v
        ("qwen3", {"routing": "soft", "kv": "experts"}, "sdpa", {}),  # per-head q/k norms shared by the experts
    ],
    ids=["soft", "top_k", "shared_kv", "shared_kv-eager", "biases", "qwen2-shared-top1", "qwen3-qk_norm"],
)
def test_layer_equals_the_gated_sum_of_vanilla_attention_experts(family, options, attn, overrides):
    base = tiny_model(family, **overrides)
    base.set_attn_implementation(attn)
    with torch.no_grad():
        for name, param in base.named_parameters():
            if name.endswith("_proj.bias"):
                param.normal_(0.0, 0.1)  # initialised to 0: the gating of expert 0's bias would go unchecked
    model = hf_attn_zoo.patch(clone(base), "bam", num_experts=N, **options)
    model.set_attn_implementation(attn)
    _randomize(model)
    attention = model.model.layers[0].self_attn
    x, position_embeddings = _inputs(model)
    with torch.no_grad():
        out, _ = attention(hidden_states=x, position_embeddings=position_embeddings, attention_mask=None)
        gates = _reference_gates(attention.attention_router.weight, x, options.get("top_k"))
        expected = torch.zeros_like(out)
        for j in range(N):
            expert = _vanilla_expert(base.model.layers[0].self_attn, attention, j, options["kv"])
            mha_j, _ = expert(hidden_states=x, position_embeddings=position_embeddings, attention_mask=None)
            expected += gates[..., j : j + 1] * mha_j
    torch.testing.assert_close(out, expected, atol=ATOL_FP32, rtol=1e-4)
    assert not torch.allclose(out, mha_j, atol=1e-3), "the experts should differ"


def test_soft_gates_sum_to_one_and_top_k_gates_have_k_nonzeros():
    soft = hf_attn_zoo.patch(tiny_model("llama"), "bam", num_experts=4)
    top2 = hf_attn_zoo.patch(tiny_model("llama"), "bam", num_experts=4, routing="top_k", top_k=2)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    gates = soft.model.layers[0].self_attn.attention_router(x)
    assert gates.dtype == torch.float32 and gates.shape == (3, 5, 4)
    torch.testing.assert_close(gates.sum(-1), torch.ones(3, 5))
    assert (gates > 0).all()
    router = top2.model.layers[1].self_attn.attention_router
    gates = router(x.float())
    torch.testing.assert_close(gates.sum(-1), torch.ones(3, 5))
    assert ((gates > 0).sum(-1) == 2).all()
    chosen = gates.topk(2, -1).indices.sort(-1).values
    assert torch.equal(chosen, router.logits(x.float()).topk(2, -1).indices.sort(-1).values)


def test_router_starts_random_with_the_initializer_range_and_experts_as_copies():
    model = tiny_model("llama")
    q_weight = model.model.layers[0].self_attn.q_proj.weight
    hf_attn_zoo.patch(model, "bam", num_experts=N, expert_noise=0.1)
    attention = model.model.layers[0].self_attn
    router = attention.attention_router.weight
    assert router.shape == (N, 64)
    assert 0.01 < router.std().item() < 0.03  # initializer_range 0.02
    q_proj = attention.q_proj
    assert isinstance(q_proj, ExpertLinear) and isinstance(attention.o_proj, ExpertOutputLinear)
    assert q_proj.weight is q_weight, "expert 0 is the original parameter, not a copy"
    assert q_proj.experts_weight.shape == (N - 1, 64, 64) and q_proj.out_features == N * 64
    relative = (q_proj.experts_weight - q_weight) / q_weight.std()
    assert 0.08 < relative.std().item() < 0.12
    keys = set(model.state_dict())
    prefix = "model.layers.0.self_attn"
    assert {
        f"{prefix}.q_proj.weight",
        f"{prefix}.q_proj_experts.weight",
        f"{prefix}.o_proj_experts.weight",
        f"{prefix}.attention_router.weight",
    } <= keys
    assert hf_attn_zoo.new_module_names(model) == [
        "attention_router",
        "k_proj_experts",
        "o_proj_experts",
        "q_proj_experts",
        "v_proj_experts",
    ]


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_parallel_block_follows_its_formula(family):
    model = hf_attn_zoo.patch(tiny_model(family), "bam", num_experts=N, parallel_block=True, layers=[0])
    _randomize(model)
    layer = model.model.layers[0]
    x, position_embeddings = _inputs(model)
    with torch.no_grad():
        y = layer(x, position_embeddings=position_embeddings)
        attention, _ = layer.self_attn(
            hidden_states=layer.input_layernorm(x), position_embeddings=position_embeddings, attention_mask=None
        )
        expected = x + attention + layer.mlp(layer.post_attention_layernorm(x))
        sequential = x + attention + layer.mlp(layer.post_attention_layernorm(x + attention))
    torch.testing.assert_close(y, expected, atol=ATOL_FP32, rtol=1e-4)
    assert not torch.allclose(y, sequential, atol=1e-3)
    hf_attn_zoo.unpatch(model)
    with torch.no_grad():
        assert not torch.allclose(layer(x, position_embeddings=position_embeddings), expected, atol=1e-3)


@pytest.mark.parametrize("kv,kv_heads", [("experts", N * 2), ("shared", 2)])
def test_kv_cache_holds_the_experts_kv_heads(kv, kv_heads):
    model = hf_attn_zoo.patch(tiny_model("llama"), "bam", num_experts=N, kv=kv)
    _randomize(model)
    ids = torch.randint(3, 128, (2, 6))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        assert out.cache.layers[0].keys.shape == (2, kv_heads, 6, 16)
        step = model(ids[:, -1:], cache=out.cache, use_cache=True)
    assert out.cache.layers[0].keys.shape == (2, kv_heads, 7, 16)
    assert torch.isfinite(step.logits).all()
    if kv == "shared":
        assert model.model.layers[0].self_attn.num_key_value_groups == 2 * N


@pytest.mark.parametrize("kv", ["experts", "shared"])
def test_gradients_reach_the_router_and_every_expert(kv):
    model = hf_attn_zoo.patch(tiny_model("qwen2"), "bam", num_experts=N, kv=kv, routing="top_k", top_k=2)
    _randomize(model)
    model.train()
    ids = torch.randint(3, 128, (2, 8))
    model(ids, labels=ids).loss.backward()
    params = hf_attn_zoo.new_parameters(model)
    projections = {"q_proj", "o_proj"} if kv == "shared" else {"q_proj", "k_proj", "v_proj", "o_proj"}
    expected = {f"model.layers.{i}.self_attn.{p}_experts.weight" for i in range(2) for p in projections}
    expected |= {f"model.layers.{i}.self_attn.{p}_experts.bias" for i in range(2) for p in projections - {"o_proj"}}
    expected |= {f"model.layers.{i}.self_attn.attention_router.weight" for i in range(2)}
    assert set(params) == expected
    for name, param in params.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_gradients():
    model = hf_attn_zoo.patch(tiny_model("llama"), "bam", num_experts=N, parallel_block=True)
    _randomize(model)
    model.train()
    ids = torch.randint(3, 128, (2, 8))
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in hf_attn_zoo.new_parameters(model).items()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


@pytest.mark.parametrize(
    "family,kv", [("llama", "shared"), ("qwen3", "shared"), ("mixtral", "shared"), ("gemma3", "experts")]
)
def test_identical_experts_reproduce_the_dense_model(family, kv):
    base = tiny_model(family)
    neutral = get_patch("bam").neutral_config(family_specs()[family], base.config).to_dict()
    model = hf_attn_zoo.patch(clone(base), "bam", **{**neutral, "kv": kv})
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=ATOL_FP32, rtol=0)


def test_mixtral_mixes_attention_experts_and_unpatches():
    base = tiny_model("mixtral")
    model = hf_attn_zoo.patch(clone(base), "bam", num_experts=N, kv="shared", routing="top_k", top_k=2)
    _randomize(model)
    attention = model.model.layers[1].self_attn
    assert attention.q_proj.out_features == N * base.model.layers[1].self_attn.q_proj.out_features
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.isfinite(logits).all() and not torch.allclose(logits, base(ids).logits, atol=1e-3)
        hf_attn_zoo.unpatch(model)
        assert torch.equal(model(ids).logits, base(ids).logits)
    assert type(attention.q_proj) is nn.Linear and attention.num_key_value_groups == 2
    assert not hasattr(attention, "attention_router") and not hasattr(attention, "q_proj_experts")


def test_save_and_reload_shared_kv_parallel_block(tmp_path):
    model = hf_attn_zoo.patch(
        tiny_model("qwen2"), "bam", num_experts=N, kv="shared", routing="top_k", parallel_block=True
    )
    _randomize(model)
    ids = torch.randint(3, 128, (2, 8))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    reloaded = hf_attn_zoo.from_pretrained(tmp_path).eval()
    assert hf_attn_zoo.applied_patches(reloaded)[0]["options"]["top_k"] == 1  # the default, recorded
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)


@pytest.mark.parametrize(
    "family,options,error,match",
    [
        ("llama", {"num_experts": 1}, InvalidOptionError, "num_experts=1 is out of range: it must be >= 2"),
        (
            "llama",
            {"routing": "top_k", "top_k": 4},
            InvalidOptionError,
            r"top_k=4 is out of range: it must be >= 1 and <= num_experts \(3\)",
        ),
        ("llama", {"routing": "top_k", "top_k": 0}, InvalidOptionError, "top_k=0 is out of range: it must be >= 1"),
        ("llama", {"top_k": 2}, InvalidOptionError, "top_k=2 is only used with routing='top_k'"),
        ("llama", {"expert_noise": -0.1}, InvalidOptionError, "expert_noise=-0.1 is out of range: it must be >= 0"),
        ("llama", {"router_init_std": -1.0}, InvalidOptionError, "router_init_std=-1.0 is out of range: it must be"),
        ("llama", {"kv": "none"}, InvalidOptionError, "wrong type; expected one of 'experts', 'shared'"),
        ("gemma3", {"parallel_block": True}, InvalidOptionError, "parallel_block needs pre-norm .*gemma3 has sandwich"),
        ("olmo2", {"parallel_block": True}, UnsupportedArchitectureError, "q_norm/k_norm normalise the whole"),
        ("olmo2", {}, UnsupportedArchitectureError, "bam cannot patch a olmo2 model"),
    ],
)
def test_bad_options_raise_one_clear_error_and_leave_the_model_untouched(family, options, error, match):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(3, 128, (1, 6))
    with torch.no_grad():
        logits = model(ids).logits
    with pytest.raises(error, match=match):
        hf_attn_zoo.patch(model, "bam", **{"num_experts": N, **options})
    assert hf_attn_zoo.applied_patches(model) == []
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)


def test_moh_cannot_share_a_layer_with_bam():
    model = hf_attn_zoo.patch(tiny_model("llama"), "bam", layers=[0])
    with pytest.raises(PatchConflictError, match=r"layers \[0\] already carry a 'bam' patch"):
        hf_attn_zoo.patch(model, "moh", layers="all")
    hf_attn_zoo.patch(model, "moh", layers=[1])
