"""SCMoE self-contrast decoding (`hf_attn_zoo.decoding`): the paper's score on hand-built logits, the paired batched
forward against separate forwards, greedy equivalence at beta = 0, cache, EOS, errors, the lm-eval path, and SCMoE
on a MoTE-patched model (the switches merged into the weak pass, restored exactly)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import hf_attn_zoo
from hf_attn_zoo.decoding import (
    CUSTOM_GENERATE_DIR,
    SCMoEConfig,
    contrastive_scores,
    parse_weak,
    pick_beta,
    scmoe_decode,
    scmoe_forward,
    scmoe_generate,
    scmoe_logprobs,
)
from hf_attn_zoo.errors import InvalidOptionError, PatchConflictError, UnsupportedArchitectureError
from hf_attn_zoo.eval_harness.gsm8k import gsm8k_correct, gsm8k_heldout
from hf_attn_zoo.families import family_specs
from hf_attn_zoo.moe import RoutingOverride, routing_override, set_routing, switch_experts
from hf_attn_zoo.moe.switching import installed_switches
from tests.matrix import clone, tiny_model

FAMILIES = ["mixtral", "qwen3_moe"]
ATOL = 1e-5


def moe_model(family: str) -> torch.nn.Module:
    """A tiny model with sharp routers, so the weak routing changes the logits clearly."""
    model = tiny_model(family)
    spec = family_specs()[family]
    with torch.no_grad():
        for layer in spec.moe_layers(model):
            getattr(spec.mlp_module(model, layer), spec.mlp.router).weight.mul_(8.0)
    return model


def padded_batch(model, lengths=(5, 8), seed=0):
    """Left-padded prompts of the given lengths, with their attention mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(3, 128, (length,), generator=generator)
        mask[row, width - length :] = 1
    return ids, mask


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    torch.set_num_threads(1)
    return moe_model(request.param)


# --- the score (Eq. 5-6) on hand-built distributions ---


def _logits(probs):
    return torch.tensor(probs, dtype=torch.float32).log()


STRONG = [0.5, 0.3, 0.04, 0.16]
WEAK = [0.6, 0.1, 0.001, 0.299]


def test_score_formula_alpha_and_beta():
    strong, weak = _logits([STRONG]), _logits([WEAK])
    scores = contrastive_scores(strong, weak, alpha=0.1, beta=1.0)
    # token 2 has p_s = 0.04 < 0.1 * 0.5: masked although its contrast is the largest
    assert torch.isneginf(scores[0, 2])
    for i in (0, 1, 3):
        assert scores[0, i].item() == pytest.approx(2 * math.log(STRONG[i]) - math.log(WEAK[i]), abs=1e-5)
    assert scores.argmax(-1).item() == 1
    # a looser cutoff (0.05 * 0.5 = 0.025) lets token 2 in, and it wins
    assert contrastive_scores(strong, weak, alpha=0.05, beta=1.0).argmax(-1).item() == 2
    # beta = 0: the strong log-probs on the plausible set, i.e. greedy
    zero = contrastive_scores(strong, weak, alpha=0.1, beta=0.0)
    torch.testing.assert_close(zero[0, [0, 1, 3]], strong.log_softmax(-1)[0, [0, 1, 3]])
    assert zero.argmax(-1).item() == 0
    # alpha = 1 keeps the strong argmax only, whatever beta
    assert torch.isfinite(contrastive_scores(strong, weak, alpha=1.0, beta=5.0)).sum().item() == 1
    # beta weighting: (1 + beta) log p_s - beta log p_w
    half = contrastive_scores(strong, weak, alpha=0.1, beta=0.5)
    assert half[0, 3].item() == pytest.approx(1.5 * math.log(STRONG[3]) - 0.5 * math.log(WEAK[3]), abs=1e-5)


def test_score_is_shift_invariant_and_per_row_beta():
    strong, weak = _logits([STRONG, STRONG]), _logits([WEAK, WEAK])
    shifted = contrastive_scores(strong + 3.0, weak - 7.0, alpha=0.1, beta=0.5)
    torch.testing.assert_close(shifted, contrastive_scores(strong, weak, alpha=0.1, beta=0.5))
    rows = contrastive_scores(strong, weak, alpha=0.1, beta=torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(rows[0], contrastive_scores(strong[:1], weak[:1], 0.1, 0.0)[0])
    torch.testing.assert_close(rows[1], contrastive_scores(strong[:1], weak[:1], 0.1, 1.0)[0])


def test_logprobs_are_normalised_over_the_plausible_set(model):
    ids, mask = padded_batch(model)
    out = scmoe_forward(model, ids, mask, weak="rank:2")
    logprobs = scmoe_logprobs(model, ids, mask, alpha=0.1, beta=0.5, weak="rank:2")
    scores = contrastive_scores(out.strong_logits, out.weak_logits, 0.1, 0.5)
    plausible = torch.isfinite(scores)
    assert torch.equal(torch.isfinite(logprobs), plausible)
    torch.testing.assert_close(logprobs.exp().sum(-1), torch.ones(ids.shape), atol=ATOL, rtol=0)
    # within the set: the score minus its log-sum-exp over the set
    torch.testing.assert_close(logprobs[plausible], (scores - scores.logsumexp(-1, keepdim=True))[plausible])


# --- the paired forward ---


def test_strong_rows_are_the_normal_forward_and_weak_rows_the_weak_routing(model):
    ids, mask = padded_batch(model)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    for weak, override in (("rank:2", RoutingOverride(rank=2)), ("top1", RoutingOverride(top_k=1))):
        out = scmoe_forward(model, ids, mask, weak=weak)
        with torch.no_grad():
            plain = model(ids, attention_mask=mask, position_ids=position_ids).logits
            with routing_override(model, override):
                weak_only = model(ids, attention_mask=mask, position_ids=position_ids).logits
        real = mask.bool()
        torch.testing.assert_close(out.strong_logits[real], plain[real], atol=ATOL, rtol=0)
        torch.testing.assert_close(out.weak_logits[real], weak_only[real], atol=ATOL, rtol=0)
        assert (out.weak_logits[real] - plain[real]).abs().max() > 1e-2


def test_beta_zero_is_greedy_generate(model):
    ids, mask = padded_batch(model)
    with torch.no_grad():
        greedy = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    out = scmoe_generate(model, ids, mask, max_new_tokens=10, beta=0.0)
    assert torch.equal(out, greedy)
    contrast = scmoe_generate(model, ids, mask, max_new_tokens=10, beta=1.0)
    assert contrast.shape == greedy.shape


def test_custom_generate_callable_and_folder(model):
    ids, mask = padded_batch(model)
    reference = scmoe_generate(model, ids, mask, max_new_tokens=6, beta=0.5, weak="rank:2")
    with torch.no_grad():
        callable_out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            custom_generate=scmoe_decode,
            beta=0.5,
            weak="rank:2",
        )
        folder_out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            custom_generate=CUSTOM_GENERATE_DIR,
            trust_remote_code=True,
            scmoe=SCMoEConfig(beta=0.5),
        )
    assert torch.equal(callable_out, reference)
    assert torch.equal(folder_out, reference)
    # per-row betas: each row as in its own run
    rows = scmoe_generate(model, ids, mask, max_new_tokens=6, beta=[0.0, 0.5])
    greedy = scmoe_generate(model, ids, mask, max_new_tokens=6, beta=0.0)
    assert torch.equal(rows[0], greedy[0]) and torch.equal(rows[1], reference[1])


def test_cached_steps_equal_a_full_forward(model):
    ids, mask = padded_batch(model)
    out = scmoe_generate(
        model,
        ids,
        mask,
        max_new_tokens=6,
        beta=0.5,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        eos_token_id=[],
        pad_token_id=0,
    )
    sequences, steps = out.sequences, len(out.scores)
    assert steps == 6
    full_mask = torch.cat([mask, mask.new_ones(mask.shape[0], steps)], dim=-1)
    full = scmoe_forward(model, sequences, full_mask, weak="rank:2")
    prompt = ids.shape[1]
    for t in range(steps):
        position = prompt + t - 1
        torch.testing.assert_close(out.logits[t], full.strong_logits[:, position], atol=ATOL, rtol=0)
        expected = contrastive_scores(full.strong_logits[:, position], full.weak_logits[:, position], 0.1, 0.5)
        torch.testing.assert_close(out.scores[t], expected, atol=1e-4, rtol=0)
        assert torch.equal(sequences[:, prompt + t], out.scores[t].argmax(-1))


def test_eos_stops_each_row():
    model = moe_model("mixtral")
    ids, mask = padded_batch(model)
    free = scmoe_generate(model, ids, mask, max_new_tokens=8, eos_token_id=[], pad_token_id=0)
    prompt = ids.shape[1]
    row0, row1 = free[0, prompt:].tolist(), free[1, prompt:].tolist()
    # an EOS that row 0 emits (from its third step on) and row 1 never emits
    eos = next(t for t in row0[2:] if t not in row1)
    stop = row0.index(eos)
    out = scmoe_generate(model, ids, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    assert out[0, prompt : prompt + stop + 1].tolist() == row0[: stop + 1]
    assert set(out[0, prompt + stop + 1 :].tolist()) <= {0}
    assert out[1, prompt:].tolist() == row1
    # both rows finished: decoding stops before max_new_tokens
    both = scmoe_generate(model, ids[:1], mask[:1], max_new_tokens=8, eos_token_id=eos)
    assert both.shape[1] == prompt + stop + 1
    # ban_eos: never chosen
    banned = scmoe_generate(model, ids, mask, max_new_tokens=8, eos_token_id=eos, ban_eos=True)
    assert eos not in banned[:, prompt:].tolist()[0]


# --- options and errors ---


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"beta": -0.1}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"weak": "median"}, "weak"),
        ({"weak": "top_m"}, "needs m"),
        ({"weak_rank": 0}, "weak_rank"),
    ],
)
def test_bad_config(options, match):
    with pytest.raises(InvalidOptionError, match=match):
        SCMoEConfig(**options)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("rank", {"weak": "rank"}),
        ("rank:3", {"weak": "rank", "weak_rank": 3}),
        ("top1", {"weak": "top1"}),
        ("top_m:2", {"weak": "top_m", "m": 2}),
    ],
)
def test_parse_weak(spec, expected):
    assert parse_weak(spec) == expected
    assert SCMoEConfig(**expected).weak_spec() == (spec if ":" in spec or spec == "top1" else "rank:2")


@pytest.mark.parametrize("spec", ["rank:x", "top1:2", "bottom", "rank:-1"])
def test_parse_weak_errors(spec):
    with pytest.raises(InvalidOptionError):
        parse_weak(spec)


def test_model_errors():
    model = moe_model("mixtral")
    ids, mask = padded_batch(model)
    with pytest.raises(InvalidOptionError, match="rank:5.*out of range"):
        scmoe_generate(model, ids, mask, max_new_tokens=2, weak="rank:5")
    with pytest.raises(InvalidOptionError, match="top_m:9"):
        scmoe_generate(model, ids, mask, max_new_tokens=2, weak="top_m:9")
    with pytest.raises(InvalidOptionError, match="per-row beta"):
        scmoe_generate(model, ids, mask, max_new_tokens=2, beta=[0.1])
    with pytest.raises(InvalidOptionError, match="not both"):
        scmoe_generate(model, ids, mask, max_new_tokens=2, config=SCMoEConfig(), alpha=0.2)
    dense = tiny_model("llama")
    with pytest.raises(UnsupportedArchitectureError, match="mixtral") as err:
        scmoe_generate(dense, ids, mask, max_new_tokens=2)
    assert "qwen3_moe" in str(err.value)
    # nothing is left installed after an error
    torch.testing.assert_close(
        scmoe_forward(model, ids, mask).strong_logits,
        model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits,
    )


def test_gsm8k_heldout_is_the_tail_and_scoring():
    examples, shots = gsm8k_heldout(n=3, num_fewshot=2)
    assert len(examples) == 3 and len(shots) == 2
    gold = examples[0]["answer"].rsplit("#### ", 1)[1]
    assert gsm8k_correct(examples[0], f"so the total is ${gold}.") == 1.0
    assert gsm8k_correct(examples[0], "no number here") == 0.0


# --- the lm-eval model class and pick_beta on a saved tiny Mixtral with a tokenizer ---


def _generate_requests():
    from lm_eval.api.instance import Instance

    prompts = ["def main():\n", "The class statement defines"]
    return [
        Instance("generate_until", {}, (p, {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}), i)
        for i, p in enumerate(prompts)
    ]


def test_lm_eval_generate_until(tiny_mixtral_dir, monkeypatch):
    import hf_attn_zoo.decoding.scmoe as scmoe_module
    from hf_attn_zoo.eval_harness.lm_model import ZooLM

    calls = []

    def spy(
        model,
        input_ids,
        logits_processor,
        stopping_criteria,
        generation_config,
        synced_gpus=False,
        streamer=None,
        scmoe=None,
        **model_kwargs,
    ):
        calls.append(scmoe)
        return scmoe_decode(
            model, input_ids, logits_processor, stopping_criteria, generation_config, scmoe=scmoe, **model_kwargs
        )

    monkeypatch.setattr(scmoe_module, "scmoe_decode", spy)
    default = ZooLM(pretrained=str(tiny_mixtral_dir), device="cpu", batch_size=2)
    expected = default.generate_until(_generate_requests())
    assert not calls and all(expected)
    zero = ZooLM(pretrained=default.model, tokenizer=default.tokenizer, batch_size=2, scmoe=True, scmoe_beta=0.0)
    assert zero.generate_until(_generate_requests()) == expected
    assert calls and calls[0].beta == 0.0
    contrast = ZooLM(
        pretrained=default.model,
        tokenizer=default.tokenizer,
        batch_size=2,
        scmoe="true",
        scmoe_beta="1.0",
        scmoe_weak="rank:2",
    )
    assert all(isinstance(text, str) for text in contrast.generate_until(_generate_requests()))
    assert contrast.get_model_info()["hf_attn_zoo"]["scmoe"]["beta"] == 1.0
    assert "scmoe" not in default.get_model_info()["hf_attn_zoo"]


def test_lm_eval_loglikelihood(tiny_mixtral_dir):
    from lm_eval.api.instance import Instance

    from hf_attn_zoo.eval_harness.lm_model import ZooLM

    lm = ZooLM(
        pretrained=str(tiny_mixtral_dir),
        device="cpu",
        batch_size=1,
        scmoe_loglikelihood=True,
        scmoe_alpha=1e-6,
        scmoe_beta=0.5,
    )
    context, continuation = "The class statement", " defines a class"
    ((score, _),) = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])
    ctx, whole = lm.tok_encode(context), lm.tok_encode(context + continuation)
    ids = torch.tensor([whole])
    logprobs = scmoe_logprobs(lm.model, ids, alpha=1e-6, beta=0.5)
    targets = whole[len(ctx) :]
    expected = sum(logprobs[0, len(ctx) - 1 + i, t].item() for i, t in enumerate(targets))
    assert score == pytest.approx(expected, abs=1e-4)
    plain = ZooLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=1)
    ((plain_score, _),) = plain.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])
    assert plain_score != pytest.approx(score, abs=1e-3)


def test_lm_eval_rejects_a_dense_model_and_bad_args(tiny_mixtral_dir):
    from hf_attn_zoo.eval_harness.lm_model import ZooLM, parse_scmoe_args

    assert parse_scmoe_args()[0] is None
    config, generate, loglikelihood = parse_scmoe_args(scmoe=True, scmoe_weak="top_m:2", scmoe_alpha="0.2")
    assert (config.weak, config.m, config.alpha, generate, loglikelihood) == ("top_m", 2, 0.2, True, False)
    with pytest.raises(InvalidOptionError, match="scmoe_beta"):
        parse_scmoe_args(scmoe=True, scmoe_beta="strong")
    with pytest.raises(InvalidOptionError, match="scmoe must be"):
        parse_scmoe_args(scmoe="maybe")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_mixtral_dir)
    with pytest.raises(UnsupportedArchitectureError, match="MoE"):
        ZooLM(pretrained=tiny_model("llama", vocab_size=len(tokenizer)), tokenizer=tokenizer, scmoe=True)


def test_pick_beta(tiny_mixtral_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_mixtral_dir)
    examples = [{"question": "1 + 1", "answer": "#### 2"}, {"question": "2 + 3", "answer": "#### 5"}]
    seen = []

    def score(example, completion):
        seen.append(completion)
        return float(example["question"] == "1 + 1")

    best, table = pick_beta(
        model, tokenizer, examples, betas=(0.5, 0.0), max_new_tokens=3, batch_size=3, score_fn=score
    )
    assert [row["beta"] for row in table] == [0.5, 0.0]
    assert all(row["score"] == 0.5 and row["n"] == 2 for row in table)
    assert best == 0.0  # ties go to the smaller beta
    assert len(seen) == 4
    with pytest.raises(InvalidOptionError, match="beta"):
        pick_beta(model, tokenizer, examples, betas=(-1.0,))


def test_stop_strings_with_scmoe(tiny_mixtral_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_mixtral_dir)
    ids = tokenizer(["The class statement"], return_tensors="pt")
    prompt = ids.input_ids.shape[1]
    with torch.no_grad():
        free = model.generate(**ids, max_new_tokens=12, do_sample=False)
    stop = tokenizer.decode(free[0, prompt : prompt + 4])[-2:]
    with torch.no_grad():
        expected = model.generate(**ids, max_new_tokens=12, do_sample=False, stop_strings=[stop], tokenizer=tokenizer)
        folder = model.generate(
            **ids,
            max_new_tokens=12,
            do_sample=False,
            stop_strings=[stop],
            tokenizer=tokenizer,
            custom_generate=CUSTOM_GENERATE_DIR,
            trust_remote_code=True,
            beta=0.0,
        )
    assert expected.shape[1] < free.shape[1]
    out = scmoe_generate(
        model, ids.input_ids, ids.attention_mask, max_new_tokens=12, beta=0.0, stop_strings=stop, tokenizer=tokenizer
    )
    assert torch.equal(out, expected)
    assert torch.equal(folder, expected)


# --- SCMoE on a model that already carries routing overrides (a MoTE patch) ---

# MoTE switches, and by hand the weak routing SCMoE must run on the patched model: the switches plus rank-2
MOTE = {"off": {"all": [0], 1: [2]}, "gain": {1: {1: 0.5}}}
MERGED_RANK2 = RoutingOverride(disabled={"all": [0], 1: [2]}, gain={1: {1: 0.5}}, rank=2)


@pytest.fixture(scope="module", params=FAMILIES + ["olmoe"])
def mote_pair(request):
    """`(base, patched)`: a tiny MoE and a clone of it carrying a persistent MoTE patch."""
    torch.set_num_threads(1)
    base = moe_model(request.param)
    return base, hf_attn_zoo.patch(clone(base), "mote", **MOTE)


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp_min(0)


def _reference_logits(model, ids, mask, override=None):
    """Logits of one plain forward of `model` (under `override`, when given)."""
    with torch.no_grad(), routing_override(model, override) if override is not None else contextlib.nullcontext():
        return model(ids, attention_mask=mask, position_ids=_positions(mask)).logits


def _reference_decode(strong_model, weak_model, weak_override, ids, mask, steps, beta=0.5):
    """Greedy SCMoE written out with two full forwards per step (no cache, no batching of the two passes)."""
    for _ in range(steps):
        strong = _reference_logits(strong_model, ids, mask)[:, -1]
        weak = _reference_logits(weak_model, ids, mask, weak_override)[:, -1]
        next_tokens = contrastive_scores(strong, weak, 0.1, beta).argmax(-1)
        ids = torch.cat([ids, next_tokens[:, None]], dim=-1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
    return ids


def _installed(model):
    """The MoTE patch's routing handle, and a snapshot of its overrides and row cache."""
    handle = installed_switches(model).routing
    return handle, handle._entries, list(handle._entries), handle._rows_cache


def _assert_intact(model, snapshot, ids, mask, logits):
    handle, entries, items, cache = snapshot
    assert installed_switches(model).routing is handle and not handle.removed
    assert handle._entries is entries and all(a is b for a, b in zip(handle._entries, items))
    assert len(handle._entries) == len(items) and handle._rows_cache is cache
    assert torch.equal(_reference_logits(model, ids, mask), logits)


def test_scmoe_on_a_mote_patch_merges_the_switches_into_the_weak_pass(mote_pair):
    base, patched = mote_pair
    ids, mask = padded_batch(patched)
    real = mask.bool()
    strong = _reference_logits(patched, ids, mask)
    weak = _reference_logits(base, ids, mask, MERGED_RANK2)
    out = scmoe_forward(patched, ids, mask, weak="rank:2")
    torch.testing.assert_close(out.strong_logits[real], strong[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.weak_logits[real], weak[real], atol=ATOL, rtol=0)
    # both references differ from what the unpatched model gives: the switches act in both passes
    assert (strong[real] - _reference_logits(base, ids, mask)[real]).abs().max() > 1e-2
    assert (weak[real] - _reference_logits(base, ids, mask, RoutingOverride(rank=2))[real]).abs().max() > 1e-2
    logprobs = scmoe_logprobs(patched, ids, mask, alpha=0.1, beta=0.5)
    expected = torch.log_softmax(contrastive_scores(strong, weak, 0.1, 0.5), dim=-1)
    torch.testing.assert_close(logprobs[real], expected[real], atol=1e-4, rtol=0)
    generated = scmoe_generate(patched, ids, mask, max_new_tokens=4, beta=0.5, eos_token_id=[], pad_token_id=0)
    assert torch.equal(generated, _reference_decode(patched, base, MERGED_RANK2, ids, mask, steps=4))


def test_beta_zero_on_a_mote_patch_is_its_greedy_generate(mote_pair):
    _, patched = mote_pair
    ids, mask = padded_batch(patched)
    with torch.no_grad():
        greedy = patched.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(scmoe_generate(patched, ids, mask, max_new_tokens=8, beta=0.0), greedy)


def test_the_mote_patch_is_restored_exactly_after_scmoe_and_after_an_error():
    patched = hf_attn_zoo.patch(moe_model("mixtral"), "mote", **MOTE)
    ids, mask = padded_batch(patched)
    record = hf_attn_zoo.applied_patches(patched)
    before = _reference_logits(patched, ids, mask)
    snapshot = _installed(patched)
    handle = snapshot[0]
    swapped = []

    def boom(input_ids, scores):
        swapped.append(handle._entries is not snapshot[1] and len(handle._entries) == 2)
        raise RuntimeError("boom")

    scmoe_generate(patched, ids, mask, max_new_tokens=3, beta=0.5)
    _assert_intact(patched, snapshot, ids, mask, before)
    with pytest.raises(RuntimeError, match="boom"):
        scmoe_generate(patched, ids, mask, max_new_tokens=3, logits_processor=[boom])
    assert swapped == [True], "the weak routing was not in force during decoding"
    _assert_intact(patched, snapshot, ids, mask, before)
    with pytest.raises(InvalidOptionError, match="rank=3 is out of range"):
        scmoe_forward(patched, ids, mask, weak="rank:3")  # layer 1 has 2 experts left
    _assert_intact(patched, snapshot, ids, mask, before)
    assert hf_attn_zoo.applied_patches(patched) == record
    # temporary switches on top, recorded: they act on the strong rows and the recording sees all 2B rows
    with switch_experts(patched, off={0: [3]}, record=True) as routing:
        switched = _reference_logits(patched, ids, mask)
        out = scmoe_forward(patched, ids, mask)
        assert routing.decisions[0].shape == (2 * ids.shape[0], ids.shape[1])
    torch.testing.assert_close(out.strong_logits[mask.bool()], switched[mask.bool()], atol=ATOL, rtol=0)
    # switch_experts re-installs the patch's overrides on exit: equal values, new objects
    assert handle._entries == snapshot[2] and not handle.removed
    assert torch.equal(_reference_logits(patched, ids, mask), before)


@pytest.mark.parametrize(
    ("on", "bad", "good", "good_override"),
    [
        ({1: [3]}, "rank:2", "top1", RoutingOverride(forced={1: [3]}, top_k=1)),
        ({1: [2, 3]}, "top1", "top_m:2", RoutingOverride(forced={1: [2, 3]}, top_k=2)),
    ],
)
def test_an_impossible_merge_names_the_layer_and_keeps_the_patch(on, bad, good, good_override):
    base = moe_model("mixtral")
    patched = hf_attn_zoo.patch(clone(base), "mote", on=on)
    ids, mask = padded_batch(patched)
    before = _reference_logits(patched, ids, mask)
    snapshot = _installed(patched)
    conflict = "excludes top_k, forced and dropped" if bad.startswith("rank") else r"do not fit in top_k=1"
    with pytest.raises(InvalidOptionError, match=rf"SCMoE weak routing '{bad}': layer 1: .*{conflict}") as err:
        scmoe_generate(patched, ids, mask, max_new_tokens=2, weak=bad)
    message = str(err.value)
    assert f"forced experts {on[1]}" in message and "weak='top_m:M'" in message and "switches" in message
    _assert_intact(patched, snapshot, ids, mask, before)
    out = scmoe_forward(patched, ids, mask, weak=good)
    weak = _reference_logits(base, ids, mask, good_override)
    torch.testing.assert_close(out.weak_logits[mask.bool()], weak[mask.bool()], atol=ATOL, rtol=0)
    _assert_intact(patched, snapshot, ids, mask, before)


def test_row_limited_overrides_are_refused_with_the_reason():
    model = moe_model("mixtral")
    ids, mask = padded_batch(model)
    with set_routing(model, RoutingOverride(top_k=1, rows=[0])) as handle:
        entries = handle._entries
        with pytest.raises(PatchConflictError, match=r"strong \(0\.\.1\) and weak \(2\.\.3\) passes.*rows \[0\]"):
            scmoe_forward(model, ids, mask)
        assert handle._entries is entries and not handle.removed
