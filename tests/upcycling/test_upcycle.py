"""Upcycling dense checkpoints into MoEs: exactness, provenance of every weight, round trips and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import hf_attn_zoo
from hf_attn_zoo.errors import IncompatibleModelsError, InvalidOptionError, UnsupportedArchitectureError
from hf_attn_zoo.upcycling import Expert, mergekit_upcycle_kwargs, upcycle, upcycle_from_mergekit
from tests.matrix import ATOL_FP32


def _ids(vocab: int = 250) -> torch.Tensor:
    return torch.randint(4, vocab, (2, 12), generator=torch.Generator().manual_seed(0))


def _dense(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _tensor(path, name):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(name)


@pytest.mark.parametrize("layers,expected_class", [("all", "MixtralForCausalLM"), ([1], "Qwen2MoeForCausalLM")])
@pytest.mark.parametrize("mode", ["sparse", "btx", "bam"])
def test_identical_experts_reproduce_the_dense_model(dense_models, mode, layers, expected_class):
    seed = dense_models["seed"]
    experts = [] if mode == "sparse" else [seed, seed]
    model = upcycle(seed, experts, mode=mode, num_experts=3, layers=layers, top_k=2).eval()
    assert type(model).__name__ == expected_class
    ids = _ids()
    torch.testing.assert_close(model(ids).logits, _dense(seed)(ids).logits, atol=ATOL_FP32, rtol=0)


@pytest.mark.parametrize(
    "family,expected",
    [
        ("qwen3", ("Qwen3MoeForCausalLM", "Qwen3MoeForCausalLM")),
        ("qwen2", ("Qwen2MoeForCausalLM", "Qwen2MoeForCausalLM")),
        ("mistral", ("MixtralForCausalLM", "Qwen2MoeForCausalLM")),
    ],
)
def test_other_seed_families_upcycle_exactly(dense_models, family, expected):
    seed = dense_models[family]
    for layers, cls in zip(("all", [0]), expected):
        model = upcycle(seed, mode="sparse", num_experts=2, layers=layers).eval()
        assert type(model).__name__ == cls
        ids = _ids(120)
        torch.testing.assert_close(model(ids).logits, _dense(seed)(ids).logits, atol=ATOL_FP32, rtol=0)


def test_btx_takes_each_experts_mlp_and_averages_the_rest(dense_models):
    paths = [dense_models[k] for k in ("seed", "code", "prose")]
    model = upcycle(paths[0], paths[1:], mode="btx", top_k=1)
    assert model.config.num_local_experts == 3 and model.config.num_experts_per_tok == 1
    experts = model.model.layers[1].mlp.experts
    for e, path in enumerate(paths):
        gate = _tensor(path, "model.layers.1.mlp.gate_proj.weight")
        up = _tensor(path, "model.layers.1.mlp.up_proj.weight")
        assert torch.equal(experts.gate_up_proj[e], torch.cat([gate, up]))
        assert torch.equal(experts.down_proj[e], _tensor(path, "model.layers.1.mlp.down_proj.weight"))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.norm.weight", "model.embed_tokens.weight"):
        mean = torch.stack([_tensor(p, name) for p in paths]).mean(0)
        torch.testing.assert_close(model.get_parameter(name), mean)
    assert model.config.hf_attn_zoo_upcycling["mode"] == "btx"


def test_sparse_noise_breaks_symmetry_and_is_reproducible(dense_models):
    seed = dense_models["seed"]
    a = upcycle(seed, mode="sparse", num_experts=4, noise=0.01)
    b = upcycle(seed, mode="sparse", num_experts=4, noise=0.01)
    weights = a.model.layers[0].mlp.experts.gate_up_proj
    assert not torch.equal(weights[0], weights[1])
    assert torch.equal(weights, b.model.layers[0].mlp.experts.gate_up_proj)
    dense = _tensor(seed, "model.layers.0.mlp.up_proj.weight")
    relative = (weights[0, 128:] - dense).std() / dense.std()
    assert 0.005 < relative < 0.02


@pytest.mark.parametrize("mode", ["sparse", "btx"])
def test_ffn_only_results_load_with_plain_transformers_exactly(dense_models, tmp_path, mode):
    seed = dense_models["seed"]
    experts = [] if mode == "sparse" else [dense_models["code"], dense_models["prose"]]
    model = upcycle(seed, experts, mode=mode, noise=0.01 if mode == "sparse" else 0.0, output_dir=tmp_path).eval()
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys  # transformers v5 fused layout
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mixtral"
    script = (
        "import sys, torch; from transformers import AutoModelForCausalLM; "
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval(); "
        "ids = torch.randint(4, 250, (2, 12), generator=torch.Generator().manual_seed(0)); "
        "torch.save(m(ids).logits, sys.argv[2]); print(type(m).__name__, 'hf_attn_zoo' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), str(tmp_path / "logits.pt")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split() == ["MixtralForCausalLM", "False"]
    # the weights round-trip bit for bit; logits across processes only up to the CPU kernels' reduction order
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    assert reloaded.keys() == model.state_dict().keys()
    assert all(torch.equal(reloaded[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), model(_ids()).logits, atol=1e-6, rtol=0)
    assert (tmp_path / "tokenizer.json").is_file()


@pytest.mark.parametrize("kv", ["experts", "shared"])
def test_bam_attention_experts_come_from_each_model_and_round_trip(dense_models, tmp_path, kv):
    paths = [dense_models[k] for k in ("seed", "code", "prose")]
    model = upcycle(paths[0], paths[1:], mode="bam", bam_options={"kv": kv}, output_dir=tmp_path).eval()
    assert [r["method"] for r in hf_attn_zoo.applied_patches(model)] == ["bam"]
    attention = model.model.layers[1].self_attn
    name = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(attention.q_proj.weight, _tensor(paths[0], name))
    for e in (1, 2):
        assert torch.equal(attention.q_proj.experts_weight[e - 1], _tensor(paths[e], name))
        assert torch.equal(
            attention.o_proj.experts_weight[e - 1], _tensor(paths[e], "model.layers.1.self_attn.o_proj.weight")
        )
    k_name = "model.layers.1.self_attn.k_proj.weight"
    if kv == "shared":
        torch.testing.assert_close(attention.k_proj.weight, torch.stack([_tensor(p, k_name) for p in paths]).mean(0))
    else:
        assert torch.equal(attention.k_proj.experts_weight[1], _tensor(paths[2], k_name))
    assert model.config.num_experts_per_tok == 1  # BAM's top-1 FFN routing
    reloaded = hf_attn_zoo.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded(_ids()).logits, model(_ids()).logits)


def test_layer_subset_keeps_other_layers_dense(dense_models):
    paths = [dense_models[k] for k in ("seed", "code")]
    model = upcycle(paths[0], paths[1:], mode="bam", layers=[1])
    assert model.config.mlp_only_layers == [0]
    assert hasattr(model.model.layers[0].mlp, "gate_proj") and hasattr(model.model.layers[1].mlp, "experts")
    assert hf_attn_zoo.applied_patches(model)[0]["layers"] == [1]
    assert not hasattr(model.model.layers[0].self_attn, "attention_router")


def test_hidden_router_init_uses_the_normalised_layer_input(dense_models):
    seed = dense_models["seed"]
    prompts = [
        ["def f(x):\n    return x + 1", "import os\nprint(os.getcwd())"],
        ["In the beginning was the word.", "Shall I compare thee to a summer's day?"],
    ]
    model = upcycle(seed, [seed], mode="btx", router_init="hidden", prompts=prompts)
    dense = _dense(seed)
    means = []
    for texts in prompts:
        captured = []
        hook = dense.model.layers[1].post_attention_layernorm.register_forward_hook(
            lambda m, a, out: captured.append(out[0].mean(0))
        )
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(seed)
        with torch.no_grad():
            for text in texts:
                dense(**tokenizer(text, return_tensors="pt"))
        hook.remove()
        means.append(torch.stack(captured).mean(0))
    means = torch.stack(means)
    centred = means - means.mean(0)
    expected = centred / centred.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(model.model.layers[1].mlp.gate.weight, expected, atol=1e-5, rtol=1e-4)


def test_embed_router_init_is_shared_by_all_layers(dense_models):
    seed = dense_models["seed"]
    model = upcycle(seed, [seed], mode="btx", router_init="embed", prompts=[["def f(): pass"], ["And God said"]])
    rows = [layer.mlp.gate.weight for layer in model.model.layers]
    assert torch.equal(rows[0], rows[1])
    torch.testing.assert_close(rows[0].norm(dim=-1), torch.ones(2))


def test_mergekit_yaml_builds_the_equivalent_model(dense_models, tmp_path):
    config = tmp_path / "moe.yaml"
    config.write_text(f"""
base_model: {dense_models["seed"]}
gate_mode: cheap_embed
dtype: float32
experts_per_token: 1
experts:
  - source_model: {dense_models["code"]}
    positive_prompts: ["def main():", "import sys"]
  - source_model: {dense_models["prose"]}
    positive_prompts: ["Once upon a time"]
    residual_scale: 0.5
""")
    kwargs = mergekit_upcycle_kwargs(config)
    assert kwargs["router_init"] == "embed" and kwargs["shared"] == "seed" and not kwargs["include_seed"]
    model = upcycle_from_mergekit(config)
    assert model.config.num_local_experts == 2 and model.config.num_experts_per_tok == 1
    # non-expert weights from the base model only (mergekit copies them, BTX would average)
    name = "model.layers.0.self_attn.v_proj.weight"
    assert torch.equal(model.get_parameter(name), _tensor(dense_models["seed"], name))
    down = _tensor(dense_models["prose"], "model.layers.0.mlp.down_proj.weight")
    assert torch.equal(model.model.layers[0].mlp.experts.down_proj[1], down * 0.5)


@pytest.mark.parametrize(
    "text,match",
    [
        ("base_model: x\nexperts: []\nmerge_method: slerp\n", r"unknown mergekit-moe field\(s\) \['merge_method'\]"),
        (
            "base_model: x\nexperts:\n  - source_model: a\n    prompt: [x]\n  - source_model: b\n",
            r"experts\[0\] has unknown field\(s\) \['prompt'\]",
        ),
        ("experts: []\n", "missing required field 'base_model'"),
        ("base_model: x\nexperts: [{source_model: a}, {source_model: b}]\ngate_mode: learned\n", "gate_mode='learned'"),
        ("base_model: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_mergekit_files_are_refused_by_name(tmp_path, text, match):
    config = tmp_path / "moe.yaml"
    config.write_text(text)
    with pytest.raises(InvalidOptionError, match=match):
        mergekit_upcycle_kwargs(config)


@pytest.mark.parametrize(
    "other,match",
    [
        ("mistral", "is a 'mistral' model but the seed .* is 'llama'"),
        ("wide", "has hidden_size=96 but the seed .* has hidden_size=64"),
        ("deep", "has num_hidden_layers=3 but the seed"),
        ("other_vocab", "vocab_size"),
        ("swapped_tokenizer", "different tokenizer vocabulary"),
    ],
)
def test_incompatible_models_are_refused(dense_models, other, match):
    with pytest.raises(IncompatibleModelsError, match=match):
        upcycle(dense_models["seed"], [dense_models[other]], mode="btx")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"mode": "btx", "top_k": 3}, InvalidOptionError, r"top_k=3 must be between 1 and the number of experts \(2\)"),
        ({"mode": "sparse"}, InvalidOptionError, "takes no expert models"),
        ({"mode": "moe"}, InvalidOptionError, "mode='moe' is not one of sparse, btx, bam"),
        ({"mode": "btx", "layers": [5]}, InvalidOptionError, r"layers \[5\] are out of range"),
        ({"mode": "btx", "router_init": "hidden"}, InvalidOptionError, "needs example prompts for every expert"),
        ({"mode": "btx", "num_experts": 5}, InvalidOptionError, "num_experts=5 but 2 expert models"),
        ({"mode": "btx", "bam_options": {"kv": "shared"}}, InvalidOptionError, "only used with mode='bam'"),
        ({"mode": "bam", "bam_options": {"kv": "both"}}, InvalidOptionError, "kv"),
    ],
)
def test_bad_options_are_refused(dense_models, kwargs, error, match):
    with pytest.raises(error, match=match):
        upcycle(dense_models["seed"], [dense_models["code"]], **kwargs)


def test_unsupported_seed_family_names_the_supported_ones(dense_models):
    with pytest.raises(UnsupportedArchitectureError, match="cannot upcycle a 'olmo2' model; supported .*llama"):
        upcycle(dense_models["olmo2"], mode="sparse")


def test_missing_expert_folder_is_reported(dense_models, tmp_path):
    with pytest.raises(hf_attn_zoo.ZooError, match="does not exist"):
        upcycle(dense_models["seed"], [tmp_path / "nope"], mode="btx")


def test_cli_upcycles_and_reports(dense_models, tmp_path):
    from hf_attn_zoo.cli import main

    out = tmp_path / "bam"
    code = main(
        [
            "upcycle",
            str(dense_models["seed"]),
            str(dense_models["code"]),
            "--mode",
            "bam",
            "--out",
            str(out),
            "--bam",
            "kv=shared",
        ]
    )
    assert code == 0
    model = hf_attn_zoo.from_pretrained(out)
    assert hf_attn_zoo.applied_patches(model)[0]["options"]["kv"] == "shared"
    assert main(["upcycle", str(dense_models["seed"]), "--mode", "sparse", "--top-k", "9", "--out", str(out)]) == 2


def test_expert_objects_carry_their_prompts(dense_models):
    seed, code, prose = (str(dense_models[k]) for k in ("seed", "code", "prose"))
    with pytest.raises(InvalidOptionError, match=r"expert\(s\) \[0\] have none"):
        upcycle(seed, [Expert(code, prompts=["import os"])], mode="btx", router_init="embed")
    model = upcycle(
        seed,
        [Expert(code, prompts=["import os"]), Expert(prose, prompts=["Thou art"])],
        mode="btx",
        router_init="embed",
        include_seed=False,
    )
    assert model.config.hf_attn_zoo_upcycling["experts"] == [code, prose]
