"""fTRI expert profiling (MoTE, arXiv:2502.11096): recorded statistics, scores, ranking, files, errors and CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_attn_zoo.analysis import ExpertProfile, plot_expert_profile, profile_experts
from hf_attn_zoo.errors import InvalidOptionError, UnsupportedArchitectureError
from hf_attn_zoo.families import family_specs
from tests.matrix import tiny_model

CODE = [
    "def f(x): return x + 1",
    "import os",
    "for i in range(10): print(i)",
    "class A: pass",
    "x = [k * 2 for k in data if k]",
]
PROSE = [
    "In the beginning God created the heaven and the earth.",
    "And it was so.",
    "Shall I compare thee to a summer's day?",
]
POETRY = ["Tyger Tyger, burning bright", "Do not go gentle into that good night"]

# one MoE layer per family at least; qwen2_moe keeps layer 0 dense
FAMILY_CASES = {"mixtral": {}, "qwen2_moe": {"mlp_only_layers": [0]}, "qwen3_moe": {}}


@pytest.fixture(scope="module")
def tokenizer():
    """Byte-level tokenizer (one token per byte) that prepends `<s>`: a special token the profile must not count."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "<pad>": 2}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>", pad_token="<pad>")


def _model(family: str, tokenizer):
    return tiny_model(family, vocab_size=len(tokenizer), **FAMILY_CASES[family])


def _profile(model, tokenizer, sets=None, target="code", **kwargs):
    return profile_experts(
        model, tokenizer, sets or {"code": CODE, "prose": PROSE}, target=target, progress=False, **kwargs
    )


def test_mixtral_counts_match_a_hand_computation_from_router_logits(tokenizer):
    model = _model("mixtral", tokenizer)
    profile = _profile(model, tokenizer, batch_size=2)
    k, experts = model.config.num_experts_per_tok, model.config.num_local_experts
    assert profile.layers == [0, 1] and profile.num_experts == [experts, experts]
    for name, prompts in (("code", CODE), ("prose", PROSE)):
        counts = torch.zeros(2, experts, dtype=torch.long)
        sums = torch.zeros(2, experts, dtype=torch.float64)
        tokens = 0
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                logits = model(ids, output_router_logits=True).router_logits
            tokens += ids.shape[1] - 1
            for layer, layer_logits in enumerate(logits):
                # Mixtral's rule: softmax over all experts, top-k, renormalise; row 0 is <s> and does not count
                top = torch.softmax(layer_logits[1:].float(), dim=-1).topk(k, dim=-1)
                weights = top.values / top.values.sum(-1, keepdim=True)
                counts[layer] += torch.bincount(top.indices.reshape(-1), minlength=experts)
                sums[layer].index_add_(0, top.indices.reshape(-1), weights.reshape(-1).double())
        assert profile.tokens[name] == tokens and profile.prompts[name] == len(prompts)
        assert profile.counts[name] == counts.tolist()
        torch.testing.assert_close(
            torch.tensor(profile.weight_sums[name], dtype=torch.float64), sums, atol=1e-5, rtol=1e-5
        )
        frequency = torch.tensor(profile.frequency(name), dtype=torch.float64)
        torch.testing.assert_close(frequency, counts.double() / tokens)
        selected = torch.tensor(profile.mean_weight(name, over="selected"), dtype=torch.float64)
        torch.testing.assert_close(
            selected, torch.where(counts > 0, sums / counts.clamp_min(1), 0.0), atol=1e-5, rtol=1e-5
        )
        every = torch.tensor(profile.mean_weight(name, over="all"), dtype=torch.float64)
        torch.testing.assert_close(every, sums / tokens, atol=1e-5, rtol=1e-5)
        # renormalised Mixtral weights: each token's weights sum to 1
        assert math.isclose(every.sum().item(), 2.0, rel_tol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILY_CASES))
def test_padding_does_not_change_the_profile(family, tokenizer):
    model = _model(family, tokenizer)
    long_prompt = ["while True: " + "x = x + 1; " * 8]
    alone = _profile(model, tokenizer, batch_size=1)
    padded = _profile(model, tokenizer, batch_size=8)
    # the long extra row pads every other row of its batch; its own tokens add up separately
    extra = _profile(model, tokenizer, {"code": CODE + long_prompt, "prose": PROSE + long_prompt}, batch_size=8)
    only_long = _profile(model, tokenizer, {"code": long_prompt, "prose": long_prompt}, batch_size=1)
    assert padded.counts == alone.counts and padded.tokens == alone.tokens
    for name in ("code", "prose"):
        assert extra.tokens[name] == alone.tokens[name] + only_long.tokens[name]
        summed = (torch.tensor(alone.counts[name]) + torch.tensor(only_long.counts[name])).tolist()
        assert extra.counts[name] == summed
    k = model.config.num_experts_per_tok
    assert all(sum(row) == k * alone.tokens[name] for name in alone.classes for row in alone.counts[name])
    assert alone.layers == ([1] if family == "qwen2_moe" else [0, 1])
    assert not model.training


def test_scores_are_target_minus_the_mean_or_max_of_the_others(tokenizer):
    model = _model("qwen3_moe", tokenizer)
    sets = {"code": CODE, "prose": PROSE, "poetry": POETRY}
    mean = _profile(model, tokenizer, sets, target="prose")
    highest = _profile(model, tokenizer, sets, target="prose", contrast="max")
    frequency = {name: torch.tensor(mean.frequency(name)) for name in sets}
    torch.testing.assert_close(
        torch.tensor(mean.scores()), frequency["prose"] - (frequency["code"] + frequency["poetry"]) / 2
    )
    torch.testing.assert_close(
        torch.tensor(highest.scores()), frequency["prose"] - torch.maximum(frequency["code"], frequency["poetry"])
    )
    assert mean.counts == highest.counts


def _handmade(target: str = "a") -> ExpertProfile:
    # layer 3: expert 1 favours "a" by 0.5, expert 0 by 0.25; layer 7: expert 2 by 0.75, expert 0 ties expert 1
    return ExpertProfile(
        classes=["a", "b"],
        target=target,
        contrast="mean",
        layers=[3, 7],
        num_experts=[3, 3],
        prompts={"a": 2, "b": 2},
        tokens={"a": 4, "b": 4},
        counts={"a": [[2, 4, 2], [1, 1, 4]], "b": [[1, 2, 4], [2, 2, 1]]},
        weight_sums={"a": [[1.0, 2.0, 1.0], [0.5, 0.5, 2.0]], "b": [[0.5, 1.0, 2.0], [1.0, 1.0, 0.5]]},
    )


def test_top_ranks_experts_across_the_whole_model():
    profile = _handmade()
    assert profile.top(3) == [(7, 2, 0.75), (3, 1, 0.5), (3, 0, 0.25)]
    ranked = profile.top(100)
    assert len(ranked) == 6 and [s for *_, s in ranked] == sorted((s for *_, s in ranked), reverse=True)
    # ties keep the (layer, expert) order
    assert ranked[3:5] == [(7, 0, -0.25), (7, 1, -0.25)]
    assert _handmade(target="b").top(1) == [(3, 2, 0.5)]
    assert profile.top(0) == []
    with pytest.raises(InvalidOptionError):
        profile.top(-1)


def test_json_round_trip_is_exact_and_png_is_written(tmp_path, tokenizer):
    profile = _profile(_model("mixtral", tokenizer), tokenizer)
    path = profile.to_json(tmp_path / "profile.json")
    again = ExpertProfile.from_json(path)
    assert again == profile
    assert again.scores() == profile.scores() and again.top(5) == profile.top(5)
    data = json.loads(path.read_text())
    assert data["format"] == "hf_attn_zoo.expert_profile/1" and len(data["top"]) == 8
    png = plot_expert_profile(profile, tmp_path / "sub" / "profile.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    with pytest.raises(InvalidOptionError, match="not an expert profile"):
        ExpertProfile.from_dict({"format": "something else"})


@pytest.mark.parametrize(
    "sets, target, message",
    [
        ({"code": CODE}, "code", "two or more behaviour classes"),
        ({"code": CODE, "prose": PROSE}, "poetry", "target 'poetry' is not one of the classes"),
        ({"code": CODE, "prose": []}, "code", "class 'prose' has no prompts"),
        ({"code": CODE, "prose": ["", "  "]}, "code", "class 'prose' has only empty prompts"),
        ({"code": CODE, "prose": "one string"}, "code", "must be a list of prompt strings"),
    ],
)
def test_bad_prompt_sets_raise(sets, target, message, tokenizer):
    model = _model("mixtral", tokenizer)
    with pytest.raises(InvalidOptionError, match=message):
        profile_experts(model, tokenizer, sets, target=target, progress=False)


def test_bad_options_and_dense_models_raise(tokenizer):
    with pytest.raises(InvalidOptionError, match="contrast"):
        _profile(_model("mixtral", tokenizer), tokenizer, contrast="median")
    with pytest.raises(InvalidOptionError, match="batch_size"):
        _profile(_model("mixtral", tokenizer), tokenizer, batch_size=0)
    moe_families = sorted(name for name, spec in family_specs().items() if spec.mlp.kind == "moe")
    assert {"mixtral", "qwen2_moe", "qwen3_moe"} <= set(moe_families)
    with pytest.raises(UnsupportedArchitectureError, match=rf"no MoE layer.*\({', '.join(moe_families)}\)"):
        _profile(tiny_model("llama", vocab_size=len(tokenizer)), tokenizer)
    all_dense = tiny_model("qwen2_moe", vocab_size=len(tokenizer), mlp_only_layers=[0, 1])
    with pytest.raises(UnsupportedArchitectureError, match="no MoE layer"):
        _profile(all_dense, tokenizer)


def test_hooks_are_removed_when_a_forward_fails(tokenizer):
    model = _model("mixtral", tokenizer).train()
    spec = family_specs()["mixtral"]
    routers = [getattr(spec.mlp_module(model, layer), spec.mlp.router) for layer in spec.moe_layers(model)]

    def fail(*_):
        raise RuntimeError("boom")

    handle = spec.decoder_layers(model)[-1].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        _profile(model, tokenizer)
    handle.remove()
    assert all(not router._forward_hooks for router in routers) and model.training


def test_cli_end_to_end(tmp_path, tokenizer, capsys):
    from hf_attn_zoo.cli import main

    source = tmp_path / "moe"
    _model("mixtral", tokenizer).save_pretrained(source)
    tokenizer.save_pretrained(source)
    code, prose = tmp_path / "code.txt", tmp_path / "prose.json"
    code.write_text("\n".join(CODE) + "\n\n")
    prose.write_text(json.dumps(PROSE))
    out = tmp_path / "plots" / "experts.png"
    assert (
        main(
            [
                "analyze",
                "experts",
                str(source),
                "--class",
                f"code={code}",
                "--class",
                f"prose={prose}",
                "--target",
                "code",
                "--out",
                str(out),
                "--prompts-per-class",
                "4",
                "--max-length",
                "16",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "code: 4 prompts" in printed and "prose: 3 prompts" in printed and "| 8 |" in printed
    profile = ExpertProfile.from_json(out.with_suffix(".json"))
    assert profile.target == "code" and profile.metadata["max_length"] == 16
    assert profile.tokens["code"] == sum(min(len(p.encode()), 15) for p in CODE[:4])
    assert out.stat().st_size > 1000
    assert (
        main(
            [
                "analyze",
                "experts",
                str(source),
                "--class",
                f"code={code}",
                "--class",
                f"prose={prose}",
                "--target",
                "poetry",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "error: profile_experts: target 'poetry' is not one of the classes" in capsys.readouterr().err


def test_experts_dropped_by_a_switch_are_not_counted_as_selected(tokenizer):
    from hf_attn_zoo.moe import switch_experts

    model = _model("mixtral", tokenizer)
    plain = _profile(model, tokenizer)
    busiest = max(range(model.config.num_local_experts), key=lambda e: plain.counts["code"][0][e])
    assert plain.counts["code"][0][busiest] > 0
    with switch_experts(model, drop={0: [busiest]}):
        dropped = _profile(model, tokenizer)
    assert dropped.counts["code"][0][busiest] == 0 and dropped.counts["prose"][0][busiest] == 0
    others = [e for e in range(model.config.num_local_experts) if e != busiest]
    assert [dropped.counts["code"][0][e] for e in others] == [plain.counts["code"][0][e] for e in others]
    k = model.config.num_experts_per_tok  # layer 1 has no switch: every token still selects k experts there
    assert sum(dropped.counts["code"][1]) == k * dropped.tokens["code"]
