"""`analyze report`: head contributions, expert usage, and the page written from them."""

from __future__ import annotations

import json

import pytest
import torch

import hf_attn_zoo
from hf_attn_zoo.analysis.report import expert_usage, head_contributions, write_report
from hf_attn_zoo.errors import InvalidOptionError, OutputExistsError
from hf_attn_zoo.families import family_specs
from hf_attn_zoo.moe import observe_routing, set_routing
from tests.matrix import tiny_model


def _batches(count: int = 3, length: int = 24) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, 128, (1, length), generator=generator) for _ in range(count)]


def test_head_shares_sum_to_one_and_a_silenced_head_gets_none():
    model = tiny_model("llama")
    spec = family_specs()["llama"]
    heads, head_dim = spec.head_layout(model.config).num_heads, model.config.head_dim
    with torch.no_grad():  # head 1 of layer 0 writes nothing into the residual stream
        spec.attention_module(model, 0).o_proj.weight[:, head_dim : 2 * head_dim] = 0
    result = head_contributions(model, _batches())
    assert sorted(result["layers"]) == [0, 1]
    for layer in result["layers"].values():
        assert len(layer["share"]) == heads
        assert sum(layer["share"]) == pytest.approx(1.0)
    assert result["layers"][0]["share"][1] == 0
    assert min(result["layers"][1]["share"]) > 0


def test_head_shares_equal_the_norms_of_each_heads_term():
    model = tiny_model("qwen3")
    spec = family_specs()["qwen3"]
    attention = spec.attention_module(model, 1)
    captured = []
    hook = attention.o_proj.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    ids = _batches(1)
    with torch.no_grad():
        model(ids[0])
    hook.remove()
    heads = spec.head_layout(model.config).num_heads
    x = captured[0].reshape(-1, heads, model.config.head_dim)
    weight = attention.o_proj.weight
    terms = torch.stack(
        [x[:, h] @ weight[:, h * model.config.head_dim : (h + 1) * model.config.head_dim].T for h in range(heads)], 1
    )
    expected = terms.norm(dim=-1).mean(0)
    torch.testing.assert_close(
        torch.tensor(head_contributions(model, ids)["layers"][1]["share"]), expected / expected.sum()
    )


def test_expert_usage_counts_every_selection_and_sees_a_switched_off_expert():
    model = tiny_model("mixtral")
    batches = _batches()
    usage = expert_usage(model, batches)
    assert usage is not None and sorted(usage["layers"]) == [0, 1]
    for layer in usage["layers"].values():
        assert sum(layer["share"]) == pytest.approx(1.0)
        assert 0 < layer["entropy"] <= 1
        assert layer["imbalance"] >= 1
    hf_attn_zoo.patch(model, "mote", off={"all": [0]})
    switched = expert_usage(model, batches)
    assert switched is not None
    assert all(layer["share"][0] == 0 for layer in switched["layers"].values())
    assert hf_attn_zoo.applied_patches(model)[0]["method"] == "mote"  # observing left the patch in place


def test_a_dense_model_has_no_expert_usage():
    assert expert_usage(tiny_model("llama"), _batches(1)) is None


def test_observing_routing_keeps_the_installed_callback():
    model = tiny_model("mixtral")
    own, seen = [], []
    handle = set_routing(model, None, on_route=lambda layer, decision: own.append(layer))
    with observe_routing(model, lambda layer, decision: seen.append(layer)):
        model(_batches(1)[0])
    model(_batches(1)[0])
    handle.remove()
    assert seen == [0, 1]
    assert own == [0, 1, 0, 1]


def test_the_report_page_has_every_section_its_plots_and_numbers(tmp_path):
    model = hf_attn_zoo.patch(tiny_model("mixtral"), "moh", router="learned")
    path = write_report(
        model, None, tmp_path, batches=_batches(), sections=["heads", "experts", "routing"], title="tiny"
    )
    markdown = path.read_text()
    for heading in ("# tiny", "## Model", "## Head usage", "## Expert usage", "## Routing stability"):
        assert heading in markdown
    assert "`moh` on 2 layers" in markdown
    for image in ("heads.png", "moh_head_usage.png", "experts.png", "routing_stability.png"):
        assert (tmp_path / image).stat().st_size > 0
        assert f"]({image})" in markdown
        assert f'src="{image}"' in (tmp_path / "report.html").read_text()
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["Model"]["patches"][0]["method"] == "moh"
    assert set(data["Expert usage"]["layers"]) == {"0", "1"}
    assert "moh_usage" in data["Head usage"]
    assert set(data["Routing stability"]["layers"]) == {"0", "1"}
    assert 0 <= data["Routing stability"]["mean"]["flip_rate"] <= 1


def test_a_dense_report_says_what_does_not_apply(tmp_path):
    write_report(tiny_model("llama"), None, tmp_path, batches=_batches(1), sections=["experts"])
    assert "no MoE layer" in (tmp_path / "report.md").read_text()


def test_finished_reports_are_never_overwritten(tmp_path):
    write_report(tiny_model("llama"), None, tmp_path, batches=_batches(1), sections=["experts"])
    before = (tmp_path / "report.md").read_text()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_report(tiny_model("llama"), None, tmp_path, batches=_batches(1), sections=["heads"])
    assert (tmp_path / "report.md").read_text() == before
    write_report(tiny_model("llama"), None, tmp_path, batches=_batches(1), sections=["heads"], overwrite=True)
    assert "## Head usage" in (tmp_path / "report.md").read_text()
    assert not (tmp_path / "experts.png").exists() and (tmp_path / "heads.png").exists()


def test_unknown_sections_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(InvalidOptionError, match="unknown report sections \\['attention'\\]"):
        write_report(tiny_model("llama"), None, tmp_path / "out", batches=_batches(1), sections=["attention"])
    assert not (tmp_path / "out").exists()


def test_the_sinks_section_finds_the_first_token_and_refuses_patched_attention(tmp_path):
    model = tiny_model("llama")
    write_report(model, None, tmp_path / "plain", batches=_batches(2, 16), sections=["sinks"])
    markdown = (tmp_path / "plain" / "report.md").read_text()
    assert "Primary sink at position" in markdown
    assert "(sink_mass.png)" in markdown and (tmp_path / "plain" / "sink_mass.png").is_file()
    data = json.loads((tmp_path / "plain" / "report.json").read_text())["Attention sinks"]
    assert data["seq_len"] == 16 and len(data["mass_by_position"]) == 2
    patched = hf_attn_zoo.patch(tiny_model("llama"), "sliding_window", window=3, sinks=1)
    write_report(patched, None, tmp_path / "patched", batches=_batches(1), sections=["sinks"])
    assert "Not measured: find_sinks measures the model's own attention" in (tmp_path / "patched/report.md").read_text()


def test_cli_report_on_a_saved_model(tmp_path, capsys):
    from hf_attn_zoo.cli import main
    from tests.tiny import save_tiny_llama

    source = save_tiny_llama(tmp_path / "tiny", vocab_size=300, max_position_embeddings=1024, bos_prefix=False)
    out = tmp_path / "report"
    args = ["analyze", "report", str(source), "--out", str(out), "--texts", "2", "--max-length", "32"]
    assert main([*args, "--sections", "heads,experts,sinks"]) == 0
    markdown = (out / "report.md").read_text()
    assert markdown.startswith(f"# hf-attn-zoo report: {source}")
    assert "## Head usage" in markdown and "## Attention sinks" in markdown and "## Routing stability" not in markdown
    assert "wrote" in capsys.readouterr().out
    assert main(args) == 2  # a non-empty --out is refused without --overwrite
    assert main([*args, "--sections", "attention", "--overwrite"]) == 2
