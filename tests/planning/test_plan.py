"""`hf-attn-zoo plan`: shipped configs on the meta device, patching without allocation, the memory arithmetic on a
hand-computed case, KV-cache and kernel figures of the methods, the CLI table, and every bad input's error."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoConfig

import hf_attn_zoo
from hf_attn_zoo.cli import main
from hf_attn_zoo.errors import (
    InvalidOptionError,
    PlanError,
    UnknownMethodError,
    UnknownModelError,
    UnsupportedArchitectureError,
)
from hf_attn_zoo.planning import plan, shipped_models
from hf_attn_zoo.planning.figures import kv_cache, layer_activations
from hf_attn_zoo.planning.memory import GiB, ModelFigures, Setup, memory_per_gpu
from hf_attn_zoo.planning.models import build_plan_models, load_config

# published sizes from the model cards
PUBLISHED = {
    "llama3-8b": 8.03e9,
    "llama3-70b": 70.6e9,
    "mixtral-8x7b": 46.7e9,
    "qwen3-30b-a3b": 30.5e9,
    "deepseek-v3": 671e9,
}


def _tiny_llama(**overrides):
    return AutoConfig.for_model(
        "llama",
        **{
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 128,
            "max_position_embeddings": 256,
            **overrides,
        },
    )


def _all_meta(model: torch.nn.Module) -> bool:
    return all(t.device.type == "meta" for t in (*model.parameters(), *model.buffers()))


# --- shipped configs ---


def test_every_shipped_config_is_tested():
    assert set(shipped_models()) == set(PUBLISHED) | {"default"}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shipped_config_builds_on_meta_with_the_published_size(name):
    config, source = load_config(name)
    built = build_plan_models(config, "none", {})
    count = sum(p.numel() for p in built.after.parameters())
    assert abs(count - PUBLISHED[name]) / PUBLISHED[name] < 0.01, (name, count)
    assert _all_meta(built.after) and source == f"shipped config {name}"


def test_active_parameters_of_the_moe_configs():
    assert abs(plan("mixtral-8x7b", train="none").params_active - 12.9e9) / 12.9e9 < 0.01
    assert abs(plan("qwen3-30b-a3b", train="none").params_active - 3.3e9) / 3.3e9 < 0.03


# --- patching on meta allocates nothing ---

OWN_CASES = ("mote", "bam", "graph_routing")  # need options or a MoE model: listed below
CASES = [("llama3-8b", method, {}) for method in sorted(hf_attn_zoo.PATCHES) if method not in OWN_CASES] + [
    ("llama3-8b", "bam", {"num_experts": 2}),
    ("mixtral-8x7b", "mote", {"off": {"all": [0]}}),
    ("mixtral-8x7b", "graph_routing", {"mode": "similarity", "learned": True}),
    ("llama3-8b", "upcycle", {"mode": "bam", "num_experts": 4}),
]


@pytest.mark.parametrize("model,method,options", CASES, ids=[c[1] for c in CASES])
def test_patching_an_8b_meta_model_allocates_nothing(model, method, options):
    config, _ = load_config(model)
    built = build_plan_models(config, method, options)
    assert built.non_meta == {} and _all_meta(built.after) and _all_meta(built.before)
    assert built.records and built.records[-1]["method"] == ("bam" if method == "upcycle" else method)


def test_plan_of_an_8b_model_is_fast():
    result = plan("llama3-8b", "moh", gpus=8)
    assert result.build_seconds < 2.0 and not result.warnings


def test_new_parameters_of_bam_and_upcycle():
    bam = plan("llama3-8b", "bam", {"num_experts": 2}, train="new")
    attention = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024)  # one extra copy of q, k, v, o per layer
    assert bam.params_new - attention == 32 * 4096 * 2  # + the routers (hidden x experts)
    assert bam.params_trainable == bam.params_new and bam.params_after == bam.params_before + bam.params_new
    up = plan("llama3-8b", "upcycle", {"mode": "sparse", "num_experts": 4})
    mlp = 3 * 4096 * 14336
    assert up.params_after - up.params_before == 32 * (3 * mlp + 4 * 4096)  # 3 more expert copies + routers
    assert up.architecture == "MixtralForCausalLM" and up.options["top_k"] == 2


# --- memory arithmetic, by hand ---

TINY = ModelFigures(
    params=1000,
    trainable=1000,
    num_layers=4,
    root_params=200,
    largest_layer_params=200,
    hidden_size=8,
    vocab_size=100,
    layer_activations=(50, 50, 50, 50),
    kv_cache_bytes=300,
)


def test_memory_arithmetic_fsdp_by_hand():
    m = memory_per_gpu(TINY, Setup(gpus=2, sharding="fsdp", dtype="bf16", seq_len=10, batch=2))
    assert m.weights == 1000 * 2 // 2
    assert m.gradients == 1000 * 2 // 2
    assert m.optimizer == 1000 * (8 + 4) // 2  # two fp32 AdamW moments + fp32 master copy, sharded
    assert m.gathered == (200 + 2 * 200) * 2  # root unit + 2 layers in bf16
    assert m.activations == 20 * 4 * 50 * 2  # tokens x layers x elements x bytes
    assert m.logits == 20 * 100 * (2 + 8)
    assert m.total == 1000 + 1000 + 6000 + 1200 + 8000 + 20000


def test_memory_arithmetic_other_shardings_and_options_by_hand():
    ddp = memory_per_gpu(TINY, Setup(gpus=2, sharding="ddp", seq_len=10, batch=2))
    assert (ddp.weights, ddp.gradients, ddp.optimizer, ddp.gathered) == (2000, 2000, 12000, 0)
    zero2 = memory_per_gpu(TINY, Setup(gpus=2, sharding="zero2", seq_len=10, batch=2))
    assert (zero2.weights, zero2.gradients, zero2.optimizer, zero2.gathered) == (2000, 1000, 6000, 0)
    fp32 = memory_per_gpu(TINY, Setup(gpus=1, dtype="fp32", seq_len=10, batch=2))
    assert (fp32.weights, fp32.gradients, fp32.optimizer) == (4000, 4000, 8000)  # no master copy in fp32
    checkpointed = memory_per_gpu(TINY, Setup(gpus=1, seq_len=10, batch=2, gradient_checkpointing=True))
    assert checkpointed.activations == 20 * (4 * 8 * 2 + 50 * 2)  # layer inputs + one recomputed layer
    inference = memory_per_gpu(TINY, Setup(gpus=1, train="none", seq_len=10, batch=2))
    assert (inference.gradients, inference.optimizer, inference.logits) == (0, 0, 0)
    assert inference.kv_cache == 2 * 300 and inference.activations == 20 * 50 * 2
    scores = ModelFigures(**{**TINY.__dict__, "layer_scores": (3, 0, 0, 0)})
    assert memory_per_gpu(scores, Setup(gpus=1, seq_len=10, batch=2)).activations == 20 * (4 * 50 * 2 + 3 * 8)


def test_activation_and_kv_figures_of_a_tiny_llama_by_hand():
    built = build_plan_models(_tiny_llama(), "none", {})
    # per token and layer: 2 norms (fp32 input + output: 6h) + q, k, v + 2 x attention output + SwiGLU 4 x intermediate
    assert layer_activations(built.after, built.family_after, []) == (6 * 64 + 64 + 32 + 32 + 2 * 64 + 4 * 128,) * 2
    kv = kv_cache(built.after, built.family_after, [], 100, 2)
    assert kv.bytes_per_token == 2 * (2 * 2 * 16) * 2  # layers x (K+V) x kv heads x head_dim x bf16
    assert kv.bytes_at_seq_len == 100 * kv.bytes_per_token and kv.bounded_layers == 0


def test_kv_cache_of_the_methods():
    per_token = 32 * 2 * 8 * 128 * 2  # Llama-3-8B: 128 KiB
    dense = plan("llama3-8b", seq_len=8192, train="none")
    assert dense.kv_before.bytes_per_token == per_token and dense.kv_before.bytes_at_seq_len == 8192 * per_token
    sliding = plan("llama3-8b", "sliding_window", {"window": 1024, "sinks": 4}, seq_len=8192, train="none")
    assert sliding.kv_after.bytes_at_seq_len == 1028 * per_token and sliding.kv_after.bounded_layers == 32
    assert sliding.memory.kv_cache == sliding.kv_after.bytes_at_seq_len
    moa = plan("llama3-8b", "moa", {"beta": 0.25}, seq_len=8192, train="none")  # span 0.25 x 8192 = 2048
    assert moa.kv_after.bytes_at_seq_len == 2048 * per_token
    bam = plan("llama3-8b", "bam", {"num_experts": 3}, train="none")
    assert bam.kv_after.bytes_per_token == 3 * per_token
    shared = plan("llama3-8b", "bam", {"num_experts": 3, "kv": "shared"}, train="none")
    assert shared.kv_after.bytes_per_token == per_token
    partial = plan("llama3-8b", "sliding_window", {"window": 512}, layers=[0, 1], seq_len=4096, train="none")
    assert partial.kv_after.bytes_at_seq_len == (30 * 4096 + 2 * 516) * per_token // 32


def test_kernel_choice_follows_the_kernels_auto_rules():
    long = plan("llama3-8b", "sliding_window", seq_len=8192, train="none")
    assert long.kernels[0].layers == tuple(range(32)) and long.kernels[0].train_prefill.startswith("flex")
    assert (
        plan("llama3-8b", "power_attention", seq_len=8192, device="cpu").kernels[0].train_prefill.startswith("blocks")
    )
    assert plan("llama3-8b", "power_attention", seq_len=1024).kernels[0].train_prefill.startswith("masked")
    moh = plan(
        "llama3-8b",
        "moh",
        {"granularity": "group", "shared_heads": 8, "routed_heads": 24, "top_k": 8},
        seq_len=8192,
        train="none",
    )
    assert "head-sparse decode" in moh.kernels[0].decode
    assert "no head skipping" in plan("llama3-8b", "moh", seq_len=8192, train="none").kernels[0].decode
    mixed = plan("llama3-8b", "sliding_window", layers=[0, 1], seq_len=8192)
    assert [k.layers for k in mixed.kernels] == [(0, 1), tuple(range(2, 32))]
    assert mixed.kernels[1].method == "none"
    moba = plan("llama3-8b", "moba", seq_len=8192)
    assert (
        moba.kernels[0].score_keys == 3 * 512
        and moba.memory.activations > plan("llama3-8b", seq_len=8192).memory.activations
    )
    assert plan("mixtral-8x7b", train="none").experts_kernel.startswith("MoE layers 0-31:")


def test_moa_on_multi_head_latent_attention():
    # DeepSeek-V3: q/k head dim 192 != v head dim 128, so `auto` cannot take flex; the latent cache keeps the union
    mla = plan("deepseek-v3", "moa", {"beta": 0.01}, seq_len=8192, train="none")
    assert mla.kernels[0].train_prefill.startswith("blocks")
    from transformers.models.deepseek_v3 import modeling_deepseek_v3

    span = int(0.01 * 163840)  # beta x the reference length (max_position_embeddings)
    # recent transformers cache the compressed latent, older ones every head's expanded keys and values
    latent = hasattr(modeling_deepseek_v3.DeepseekV3Attention, "expand_kv")
    position = (512 + 64) * 2 if latent else 128 * (192 + 128) * 2
    assert mla.kv_after.bytes_at_seq_len == 61 * position * span
    assert mla.kv_before.bytes_at_seq_len == 61 * position * 8192


# --- sources ---


def test_local_folder_json_file_and_default(tmp_path):
    _tiny_llama().save_pretrained(tmp_path)
    folder = plan(str(tmp_path), "moh", train="lora")
    assert folder.source == str(tmp_path) and folder.params_trainable > folder.params_new > 0
    assert plan(str(tmp_path / "config.json")).params_after == folder.params_before
    default = plan("default")  # SmolLM2-135M, tied embeddings
    assert abs(default.params_after - 134.5e6) / 134.5e6 < 0.01


# --- the command line ---


def test_cli_prints_the_table_for_a_shipped_config(capsys):
    assert main(["plan", "llama3-8b", "moh", "top_k=12", "--gpus", "8", "--seq-len", "2048"]) == 0
    out = capsys.readouterr().out
    assert "| before the patch | 8.03B |" in out and "| memory per GPU | GiB | how |" in out
    assert "of 80 GiB: fits" in out and "| KV cache (inference, bf16) | before | after |" in out
    assert "| layers 0-31 | moh |" in out and "assumptions:" in out and "top_k=12" in out


def test_cli_json(capsys):
    assert main(["plan", "mixtral-8x7b", "none", "--gpus", "16", "--gradient-checkpointing", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] and data["params_after"] == 46702792704 and data["setup"]["gpus"] == 16
    assert data["memory"]["total"] < 80 * GiB


def test_cli_usage_lists_plan(capsys):
    assert main([]) == 0
    assert "plan      MODEL METHOD" in capsys.readouterr().out


# --- bad input ---


def test_unknown_model_lists_the_shipped_names(capsys):
    with pytest.raises(UnknownModelError, match="llama3-70b, llama3-8b, mixtral-8x7b, qwen3-30b-a3b"):
        plan("llama3-9b")
    assert main(["plan", "llama3-9b", "none"]) == 2
    assert "unknown model 'llama3-9b'" in capsys.readouterr().err


def test_folder_without_config(tmp_path):
    with pytest.raises(UnknownModelError, match="without a config.json"):
        plan(str(tmp_path))


def test_more_gpus_than_fsdp_units_is_refused(capsys):
    with pytest.raises(PlanError, match="--gpus 33 with --sharding fsdp: the FSDP units are the 32 decoder layers"):
        plan("llama3-8b", gpus=33)
    assert plan("llama3-8b", gpus=33, sharding="zero2").setup.gpus == 33
    assert main(["plan", "llama3-70b", "none", "--gpus", "81", "--sharding", "zero3"]) == 2
    assert "at most 80 GPUs" in capsys.readouterr().err


def test_memory_that_does_not_fit_exits_2_with_the_figures(capsys):
    result = plan("llama3-70b", gpus=8, sharding="ddp")
    assert not result.fits and result.total_gib > 1000
    with pytest.raises(
        PlanError,
        match=r"needs 11\d\d\.\d GiB per GPU \(weights 131\.4, gradients 131\.4, "
        r"optimizer 788\.5",
    ):
        result.check()
    assert main(["plan", "mixtral-8x7b", "none", "--gpus", "8"]) == 2
    captured = capsys.readouterr()
    total = plan("mixtral-8x7b", gpus=8).total_gib
    gpus = re.search(r"fits with (\d+) GPUs \(fsdp\)", captured.out).group(1)
    assert "DOES NOT FIT" in captured.out and 8 < int(gpus) <= 32
    assert plan("mixtral-8x7b", gpus=int(gpus)).fits and not plan("mixtral-8x7b", gpus=int(gpus) - 1).fits
    assert f"error: mixtral-8x7b + none needs {total:.1f} GiB per GPU" in captured.err
    assert f"Try --gpus {gpus}, or --gradient-checkpointing" in captured.err


def test_bad_method_option_gets_the_patch_error(capsys):
    with pytest.raises(InvalidOptionError, match="moh: top_k=99 is out of range"):
        plan("llama3-8b", "moh", {"top_k": 99})
    with pytest.raises(InvalidOptionError, match="unknown option"):
        plan("llama3-8b", "sliding_window", {"windw": 3})
    with pytest.raises(UnknownMethodError, match="unknown method 'mohh'"):
        plan("llama3-8b", "mohh")
    with pytest.raises(UnsupportedArchitectureError, match="moh cannot patch a deepseek_v3 model"):
        plan("deepseek-v3", "moh")
    assert main(["plan", "llama3-8b", "moh", "top_k=99"]) == 2
    assert "moh: top_k=99" in capsys.readouterr().err


def test_bad_upcycle_and_setup_options():
    with pytest.raises(InvalidOptionError, match=r"upcycle: unknown option\(s\) \['kv'\]"):
        plan("llama3-8b", "upcycle", {"mode": "bam", "kv": "shared"})
    with pytest.raises(InvalidOptionError, match="top_k=5 must be between 1 and the number of experts"):
        plan("llama3-8b", "upcycle", {"num_experts": 4, "top_k": 5})
    with pytest.raises(UnsupportedArchitectureError, match="cannot upcycle a 'mixtral' model"):
        plan("mixtral-8x7b", "upcycle")
    with pytest.raises(InvalidOptionError, match="kv="):
        plan("llama3-8b", "upcycle", {"mode": "bam", "bam_options": {"kv": "some"}})
    with pytest.raises(InvalidOptionError, match="method none"):
        plan("llama3-8b", "none", {"top_k": 2})
    with pytest.raises(InvalidOptionError, match="seq_len=0 must be a positive integer"):
        plan("llama3-8b", seq_len=0)
    with pytest.raises(InvalidOptionError, match="sharding='tp' is not one of"):
        plan("llama3-8b", sharding="tp")


def test_kv_cache_of_a_linearized_model_stops_growing():
    """State (KV heads x 2d features x (d + 1) fp32) + the last window - 1 keys with their two fp32 feature vectors."""
    per_token = 32 * 2 * 8 * 128 * 2
    short, long = (
        plan("llama3-8b", "linearize", {"feature_map": "hedgehog", "window": 64}, seq_len=n, train="none")
        for n in (4096, 32768)
    )
    assert short.kv_after.bytes_at_seq_len == long.kv_after.bytes_at_seq_len and long.kv_after.bounded_layers == 32
    recent = per_token // 32 + 8 * 2 * 256 * 4  # one position: bf16 K and V of 8 KV heads + 2 x 256 fp32 features
    state = 8 * 256 * 129 * 4
    assert long.kv_after.bytes_at_seq_len == 32 * (63 * recent + state)
    assert long.kernels[0].decode == "fixed-size state + the last 63 keys"
