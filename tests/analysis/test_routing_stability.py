"""Routing stability (arXiv:2505.00792): entropies and flip rate against hand computations, padding, plots, CLI."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import hf_attn_zoo
from hf_attn_zoo.analysis.routing_stability import plot_routing_stability, routing_stability
from hf_attn_zoo.errors import InvalidOptionError, UnsupportedArchitectureError
from hf_attn_zoo.moe import routing_override
from tests.matrix import clone, tiny_model


def _ids(batch: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(0))


def test_entropies_match_a_hand_computation():
    model = tiny_model("mixtral")
    ids = _ids()
    with torch.no_grad(), routing_override(model, record=True) as handle:
        model(ids)
    result = routing_stability(model, [ids], scale=0.0)
    for layer, decision in handle.decisions.items():
        probs = torch.softmax(decision.logits.float(), -1)
        gate = float(-(probs * probs.log()).sum(-1).mean())
        share = torch.bincount(decision.index.reshape(-1), minlength=4).float()
        share = share / share.sum()
        selection = float(-(share * share.clamp_min(1e-30).log()).sum())
        row = result["layers"][str(layer)]
        assert row["gate_entropy"] == pytest.approx(gate, rel=1e-5)
        assert row["selection_entropy"] == pytest.approx(selection, rel=1e-5)
        assert row["flip_rate"] == 0.0  # no perturbation, no flip
    assert result["tokens"] == ids.numel() and result["top_k"] == 2 and result["num_experts"] == 4
    assert result["max_entropy"] == pytest.approx(math.log(4))
    json.dumps(result)


def test_flip_rate_grows_with_the_perturbation():
    model = tiny_model("qwen3_moe")
    ids = _ids(2, 24)
    rates = [routing_stability(model, [ids], scale=s)["mean"]["flip_rate"] for s in (0.0, 0.05, 2.0)]
    assert rates[0] == 0.0 < rates[1] < rates[2] <= 1.0
    replaced = routing_stability(model, [ids], perturbation="replace", scale=0.3)
    assert 0.0 < replaced["mean"]["flip_rate"] <= 1.0


def test_a_mote_patched_model_is_measured_with_its_switches():
    model = hf_attn_zoo.patch(tiny_model("mixtral"), "mote", off={"all": [0, 1]})
    result = routing_stability(model, [_ids()], scale=0.0)
    # two of four experts off, top-2: every token picks the other two, an even load of two experts
    for row in result["layers"].values():
        assert row["selection_entropy"] == pytest.approx(math.log(2), rel=1e-5)
    assert hf_attn_zoo.applied_patches(model)[0]["method"] == "mote"


def test_padding_is_left_out():
    model = tiny_model("mixtral")
    ids = _ids(1, 10)
    padded = torch.cat([torch.zeros(1, 4, dtype=ids.dtype), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], dim=1)
    alone = routing_stability(model, [ids], scale=0.0)
    with_pad = routing_stability(model, [{"input_ids": padded, "attention_mask": mask}], scale=0.0)
    assert with_pad["tokens"] == alone["tokens"] == 10
    for metric, value in alone["mean"].items():
        assert with_pad["mean"][metric] == pytest.approx(value, abs=1e-5), metric


def test_graph_routing_is_measured_on_the_mixed_distribution():
    model = tiny_model("mixtral")
    with torch.no_grad():  # a router that is confident per token, but about different experts
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(20)
    ids = _ids(2, 32)
    before = routing_stability(model, [ids])["mean"]
    neutral = hf_attn_zoo.patch(clone(model), "graph_routing", strength=0.0)
    assert routing_stability(neutral, [ids])["mean"] == before
    patched = hf_attn_zoo.patch(clone(model), "graph_routing", mode="similarity", temperature=1.0)
    after = routing_stability(patched, [ids])["mean"]
    # a mixture of peaked distributions about different experts is flatter (entropy is concave)
    assert after["gate_entropy"] > before["gate_entropy"] + 0.1


def test_bad_inputs_are_refused():
    with pytest.raises(UnsupportedArchitectureError):
        routing_stability(tiny_model("llama"), [_ids()])
    model = tiny_model("mixtral")
    with pytest.raises(InvalidOptionError, match="perturbation"):
        routing_stability(model, [_ids()], perturbation="shuffle")  # type: ignore[arg-type]
    with pytest.raises(InvalidOptionError, match="scale"):
        routing_stability(model, [_ids()], perturbation="replace", scale=1.5)
    with pytest.raises(InvalidOptionError, match="batch"):
        routing_stability(model, ["text"])


def test_plot_compares_models(tmp_path):
    model = tiny_model("mixtral")
    result = routing_stability(model, [_ids()])
    path = plot_routing_stability({"original": result, "again": result}, tmp_path / "p" / "routing.png")
    assert path.stat().st_size > 1000
    assert plot_routing_stability(result, tmp_path / "one.png").stat().st_size > 1000


def test_cli_writes_json_and_plot(tmp_path, capsys):
    from hf_attn_zoo.cli import main
    from hf_attn_zoo.families import family_specs
    from tests.tiny import save_tiny_llama

    llama = save_tiny_llama(tmp_path / "llama", vocab_size=300, max_position_embeddings=512, bos_prefix=False)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    config = family_specs()["mixtral"].tiny_config(vocab_size=300)
    source = tmp_path / "moe"
    AutoModelForCausalLM.from_config(config).save_pretrained(source)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (llama / name).exists():
            shutil.copy(llama / name, source / name)
    out = tmp_path / "routing"
    args = ["analyze", "routing", str(source), "--out", str(out), "--seq-len", "32", "--sequences", "2"]
    assert main([*args, "mode=attention", "strength=0.5"]) == 0
    data = json.loads((out / "routing.json").read_text())
    assert data["tokens"] == 64 and sorted(data["layers"]) == ["0", "1"]
    assert (out / "routing.png").stat().st_size > 1000
    assert "| mean |" in capsys.readouterr().out
    assert main(args) == 2  # a non-empty --out is refused without --overwrite
