"""Attention sinks (arXiv:2512.22213): column masses against eager weights, constructed sinks, plots, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_attn_zoo.analysis.sinks import (
    attention_column_mass,
    find_sinks,
    naive_attention_column_mass,
    plot_sinks,
)
from hf_attn_zoo.errors import InvalidOptionError, UnsupportedArchitectureError
from hf_attn_zoo.families import family_specs
from tests.matrix import tiny_model


def _causal(batch: int, length: int) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool).tril()[None].expand(batch, length, length)


def test_column_mass_matches_the_full_weight_matrix_in_chunks_with_gqa():
    query, key = torch.randn(2, 6, 37, 8), torch.randn(2, 2, 37, 8)
    allowed = _causal(2, 37) & (torch.rand(2, 37, 37) > 0.2) | torch.eye(37, dtype=torch.bool)
    got = attention_column_mass(query, key, allowed, 0.3, chunk=8)
    torch.testing.assert_close(got, naive_attention_column_mass(query, key, allowed, 0.3))
    # every query's weights sum to one, so the columns hold one unit of mass per query
    torch.testing.assert_close(got.sum(-1), torch.full((2, 6), 37.0))


def test_column_mass_with_softcap_and_learned_sink_logits():
    query, key = torch.randn(1, 4, 9, 8) * 3, torch.randn(1, 4, 9, 8) * 3
    allowed, sinks = _causal(1, 9), torch.randn(4)
    got = attention_column_mass(query, key, allowed, 0.5, softcap=2.0, sinks=sinks, chunk=4)
    logits = torch.tanh(query @ key.transpose(-1, -2) * 0.5 / 2.0) * 2.0
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    full = torch.softmax(torch.cat([logits, sinks.view(1, 4, 1, 1).expand(1, 4, 9, 1)], -1), -1)[..., :-1]
    torch.testing.assert_close(got, full.sum(2))
    assert bool((got.sum(-1) < 9).all())  # the sink logit takes some of every query's mass


# families with GQA, logit soft-capping + local layers (gemma2), learned sinks + local layers (gpt_oss), q/k norms
@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_oss", "qwen3", "mistral"])
def test_mass_equals_the_eager_attention_weights_column_sums(family):
    config = family_specs()[family].tiny_config()
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 100, (2, 24))
    with torch.no_grad():
        weights = model(ids, output_attentions=True).attentions  # L x [B, H, T, T]
    report = find_sinks(model, [ids], min_lifetime=1, primary_lifetime=2)
    for layer, w in enumerate(weights):
        seen = (w > 0).any(1).sum(1).float()  # [B, T] queries that see each key (a local layer sees fewer)
        expected = (w.sum(2) / seen[:, None].clamp(min=1)).mean(1).mean(0)  # [T], mean over sequences
        torch.testing.assert_close(torch.tensor(report.mass_by_position[layer]), expected, atol=1e-5, rtol=1e-4)
    # the dispatcher is gone: the model runs as before
    assert model.config._attn_implementation == "eager"


def _inject(model, direction: torch.Tensor, spans: dict[int, tuple[int, int]], scale: float = 200.0):
    """Hooks that add `scale * direction` to the residual stream of position p at the output of layer a and take it
    away at layer b: the hidden state of p is aligned with `direction` in layers a..b-1 (a sink made by an MLP)."""
    layers = family_specs()["llama"].decoder_layers(model)
    hooks = []
    for position, (first, last) in spans.items():
        for layer, sign in ((first, 1.0), (last, -1.0)):

            def hook(module, args, output, p=position, s=sign):
                hidden = output[0] if isinstance(output, tuple) else output
                hidden[:, p] += s * scale * direction
                return output

            hooks.append(layers[layer].register_forward_hook(hook))
    return hooks


def test_a_constructed_secondary_sink_is_found_with_its_lifetime():
    model = tiny_model("llama", num_hidden_layers=8)
    direction = torch.randn(model.config.hidden_size)
    # primary sink at 0 in layers 1..6, a secondary sink at 9 in layers 2..4, noise at 13 in layer 3 only
    hooks = _inject(model, direction, {0: (1, 7), 9: (2, 5), 13: (3, 4)})
    ids = torch.randint(3, 100, (2, 20))
    try:
        report = find_sinks(model, [ids], min_lifetime=2, primary_lifetime=6)
    finally:
        for hook in hooks:
            hook.remove()
    assert report.bos_position == 0
    assert report.sink_layers == [1, 2, 3, 4, 5, 6]
    primary = [s for s in report.sinks if s.kind == "primary"]
    assert [(s.sequence, s.position, s.layers) for s in primary] == [
        (0, 0, list(range(1, 7))),
        (1, 0, list(range(1, 7))),
    ]
    secondary = report.secondary()
    assert [(s.sequence, s.position, s.layers, s.lifetime) for s in secondary] == [
        (0, 9, [2, 3, 4], 3),
        (1, 9, [2, 3, 4], 3),
    ]
    assert report.noise_count == 2  # position 13 in both sequences
    assert report.secondary_mass[3] is not None and report.secondary_mass[0] is None
    assert all(len(s.mass) == s.lifetime == len(s.heads_fraction) == len(s.norm) for s in report.sinks)
    assert report.bos_norm[1] > 10 * report.other_norm[1]
    data = json.loads(json.dumps(report.to_json()))
    assert data["sinks"][0]["kind"] == "primary" and len(data["mass_by_position"]) == 8


def test_a_token_whose_key_takes_the_attention_receives_the_mass():
    model = tiny_model("llama")
    attention = family_specs()["llama"].attention_module(model, 1)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    # queries and position 5's key along the slowest RoPE pair: their score barely depends on the distance
    slow = torch.zeros(head_dim)
    slow[head_dim // 2 - 1] = slow[-1] = 1.0

    def set_queries(module, args, out):
        return slow.repeat(out.shape[-1] // head_dim).expand_as(out).clone()

    def set_key(module, args, out):
        out = out.clone()
        out[:, 5] = 40.0 * slow.repeat(out.shape[-1] // head_dim)
        return out

    hooks = [attention.q_proj.register_forward_hook(set_queries), attention.k_proj.register_forward_hook(set_key)]
    try:
        report = find_sinks(model, [torch.randint(3, 100, (1, 16))], min_lifetime=1, primary_lifetime=2)
    finally:
        for hook in hooks:
            hook.remove()
    mass = torch.tensor(report.mass_by_position[1])
    # every query from 5 on puts (almost) all its weight on 5: the mean over them is ~1, the later tokens get ~0
    assert mass[5] > 0.99
    assert bool((mass[6:] < 0.01).all())


def test_errors_and_refusals():
    model = tiny_model("llama")
    with pytest.raises(InvalidOptionError, match="batches"):
        find_sinks(model)
    with pytest.raises(InvalidOptionError, match="bos_candidates"):
        find_sinks(model, [torch.randint(3, 100, (1, 2))], bos_candidates=(0, 5))
    with pytest.raises(InvalidOptionError, match="min_lifetime"):
        find_sinks(model, [torch.randint(3, 100, (1, 8))], min_lifetime=3, primary_lifetime=2)
    import hf_attn_zoo

    patched = hf_attn_zoo.patch(tiny_model("llama"), "sliding_window", window=4, sinks=1)
    with pytest.raises(UnsupportedArchitectureError, match="unpatch"):
        find_sinks(patched, [torch.randint(3, 100, (1, 8))])


def test_plots_are_written(tmp_path):
    model = tiny_model("llama", num_hidden_layers=8)
    hooks = _inject(model, torch.randn(model.config.hidden_size), {0: (1, 7), 9: (2, 5)})
    try:
        report = find_sinks(model, [torch.randint(3, 100, (2, 20))], min_lifetime=2, primary_lifetime=6)
    finally:
        for hook in hooks:
            hook.remove()
    paths = plot_sinks(report, tmp_path / "plots")
    assert [p.name for p in paths] == ["sink_mass.png", "sink_norms.png", "sink_lifetimes.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_cli_writes_json_and_plots(tmp_path, capsys):
    from hf_attn_zoo.cli import main
    from tests.tiny import save_tiny_llama

    source = save_tiny_llama(tmp_path / "tiny", vocab_size=300, max_position_embeddings=1024, bos_prefix=False)
    out = tmp_path / "sinks"
    args = ["analyze", "sinks", str(source), "--out", str(out), "--seq-len", "64", "--sequences", "2"]
    assert main(args) == 0
    data = json.loads((out / "sinks.json").read_text())
    assert data["sequences"] == 2 and data["seq_len"] == 64 and data["num_layers"] == 2
    assert len(data["mass_by_position"][0]) == 64
    assert sorted(p.name for p in out.glob("*.png")) == ["sink_lifetimes.png", "sink_mass.png", "sink_norms.png"]
    assert "primary sink at position" in capsys.readouterr().out
    assert main(args) == 2  # a non-empty --out is refused without --overwrite
