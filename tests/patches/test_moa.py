"""MoA (arXiv:2406.14909): per-head elastic rules, plans, per-head KV cache, influence profiler and MILP search."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import hf_attn_zoo
from hf_attn_zoo.errors import CheckpointMismatchError, InvalidOptionError
from hf_attn_zoo.families import family_specs
from hf_attn_zoo.kernels.register import install_handler, remove_handler
from hf_attn_zoo.moa import MoAPlan, kv_cache_bytes, uniform_plan
from hf_attn_zoo.moa.cache import LayerRules
from hf_attn_zoo.moa.profile import AttentionProfile, block_sum, profile_sequences
from hf_attn_zoo.moa.search import rule_stats, search_plan
from tests.matrix import ATOL_FP32, clone, tiny_model

# tiny llama: 2 layers, 4 query heads, 2 KV heads (group 2), max_position_embeddings 256
N = 16
SINKS = 2
# (alpha, beta) at N=16, sinks=2 -> span, (s, w): (4, .25) -> 8, (2, 6); (0, .125) -> 2, (1, 1); (-2, .5) -> 6, (2, 4)
KV_ALPHAS = [[4, 0], [-2, 0]]
KV_BETAS = [[0.25, 0.125], [0.5, 0.125]]
KV_RULES = [[(2, 6), (1, 1)], [(2, 4), (1, 1)]]


def _plan(alphas=KV_ALPHAS, betas=KV_BETAS, granularity="kv_head", **model) -> dict:
    info = {"model_type": "llama", "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "name_or_path": "tiny", **model}
    return MoAPlan(model=info, alphas=alphas, betas=betas, granularity=granularity, length=N, sinks=SINKS).to_dict()


def _reference_mask(rules: list[tuple[int, int]], n: int, offset: int = 0) -> torch.Tensor:
    """Hand-written `[H, n, n]`: query q attends k <= q iff k - offset < s or q - k < w (offset: left padding)."""
    mask = torch.zeros(len(rules), n, n, dtype=torch.bool)
    for h, (sink, window) in enumerate(rules):
        for q in range(offset, n):
            for k in range(offset, q + 1):
                mask[h, q, k] = (k - offset < sink) or (q - k < window)
    return mask


def _masked_reference_handler(base, module, query, key, value, attention_mask, *, masks, offsets, **kwargs):
    group = query.shape[1] // key.shape[1]
    mask = torch.stack([masks[module.layer_idx](off) for off in offsets])  # [B, H, Q, K]
    mask = mask[:, :, -query.shape[2] :, : key.shape[2]]
    out = F.scaled_dot_product_attention(
        query,
        key.repeat_interleave(group, 1),
        value.repeat_interleave(group, 1),
        attn_mask=mask | ~mask.any(-1, keepdim=True),
        scale=kwargs["scaling"],
    )
    return out.transpose(1, 2), None


def _reference_model(base, rules_per_layer, n, offsets=(0,)):
    """The unpatched model with explicit per-head masks (SDPA), the oracle of the patched forward."""
    model = clone(base)
    spec = family_specs()["llama"]
    masks = {
        layer: functools.partial(lambda r, off: _reference_mask(r, n, off), rules)
        for layer, rules in enumerate(rules_per_layer)
    }
    for layer in range(len(rules_per_layer)):
        install_handler(
            model,
            spec.attention_module(model, layer),
            functools.partial(_masked_reference_handler, masks=masks, offsets=offsets),
        )
    return model


def _query_rules(kv_rules):
    return [[rules[h // 2] for h in range(4)] for rules in kv_rules]


def test_pattern_equals_hand_written_per_head_mask():
    plan = MoAPlan.from_dict(_plan())
    for layer in range(2):
        rules = plan.query_head_rules(layer, N, SINKS)
        assert rules == [KV_RULES[layer][h // 2] for h in range(4)]  # kv_head: a group shares its KV head's rule
        pattern = LayerRules(rules, 2).pattern
        q, k = torch.arange(N)[:, None], torch.arange(N)[None, :]
        got = pattern.allowed(q[None], k[None], torch.arange(4)[:, None, None])
        torch.testing.assert_close(got, _reference_mask(rules, N))


def test_patched_forward_equals_explicit_masks():
    base = tiny_model("llama")
    model = hf_attn_zoo.patch(clone(base), "moa", plan=_plan())
    ids = torch.randint(3, 128, (2, 12))
    reference = _reference_model(base, _query_rules(KV_RULES), 12, offsets=(0, 0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model(ids).logits, base(ids).logits, atol=1e-3)


def test_head_granularity_gives_each_query_head_its_rule_and_kv_heads_the_union():
    alphas, betas = [[4, 0, -2, 0], [0, 0, 0, 0]], [[0.25, 0.125, 0.5, 0.125], [0.125] * 4]
    plan = MoAPlan.from_dict(_plan(alphas, betas, granularity="head"))
    rules = plan.query_head_rules(0, N, SINKS)
    assert rules == [(2, 6), (1, 1), (2, 4), (1, 1)]
    layer = LayerRules(rules, 2)
    assert [(b.sink, b.window, b.kv_heads.tolist()) for b in layer.buckets] == [(2, 4, [1]), (2, 6, [0])]
    base = tiny_model("llama")
    model = hf_attn_zoo.patch(clone(base), "moa", plan=plan.to_dict())
    ids = torch.randint(3, 128, (1, 12))
    reference = _reference_model(base, [rules, plan.query_head_rules(1, N, SINKS)], 12)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)


def test_neutral_plan_equals_dense():
    base = tiny_model("llama")
    plan = _plan([[0.0] * 4] * 2, [[1.0] * 4] * 2, granularity="head")
    plan["length"] = 256
    model = hf_attn_zoo.patch(clone(base), "moa", plan=plan)
    ids = torch.randint(3, 128, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=ATOL_FP32, rtol=0)


@pytest.mark.parametrize("granularity", ["kv_head", "head"])
def test_decode_with_per_head_cache_equals_masked_forward_with_left_padding(granularity):
    base = tiny_model("llama")
    if granularity == "kv_head":
        plan = _plan()
    else:
        plan = _plan(
            [[4, 0, -2, 0], [0, 4, 0, 0]], [[0.25, 0.125, 0.5, 0.125], [0.125, 0.25, 0.125, 0.125]], granularity="head"
        )
    model = hf_attn_zoo.patch(clone(base), "moa", plan=plan)
    ids = torch.randint(3, 128, (2, 20))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # row 0 is left-padded by 3
    ids[0, :3] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :8], attention_mask=mask[:, :8], cache=cache, use_cache=True).logits]
        for t in range(8, 20):
            steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True).logits)
        unpadded = model(ids[:1, 3:], use_cache=False).logits
    incremental = torch.cat(steps, 1)
    torch.testing.assert_close(incremental[1], full[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(incremental[0, 3:], full[0, 3:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(full[:1, 3:], unpadded, atol=1e-4, rtol=1e-4)
    # the cache keeps per bucket only sinks (+ padding) and window: fewer bytes than a dense DynamicCache
    dense = DynamicCache(config=base.config)
    with torch.no_grad():
        base(ids, attention_mask=mask, cache=dense, use_cache=True)
    assert type(cache.layers[0]).__name__ == "MoACacheLayer"
    assert 0 < kv_cache_bytes(cache) < kv_cache_bytes(dense) / 2
    # greedy generate with left padding equals argmax of the masked full forward, token by token
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    seq, seq_mask = ids, mask
    with torch.no_grad():
        for _ in range(4):
            nxt = model(seq, attention_mask=seq_mask, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq, seq_mask = torch.cat([seq, nxt], 1), torch.cat([seq_mask, torch.ones_like(nxt)], 1)
    assert torch.equal(out, seq)


def test_uniform_rule_defaults_and_grid_options_are_sparse_on_short_inputs():
    base = tiny_model("llama")
    model = hf_attn_zoo.patch(clone(base), "moa", alpha=2, beta=0.125, sinks=1, length=16)
    options = hf_attn_zoo.applied_patches(model)[0]["options"]
    assert (options["granularity"], options["plan"], options["sinks"], options["length"]) == ("kv_head", None, 1, 16)
    ids = torch.randint(3, 128, (1, 10))
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base(ids).logits, atol=1e-3)
    hf_attn_zoo.unpatch(model)
    hf_attn_zoo.patch(model, "moa")
    options = hf_attn_zoo.applied_patches(model)[0]["options"]
    assert (options["alpha"], options["beta"], options["sinks"], options["length"]) == (0.0, 0.5, 64, 256)


def _write(tmp_path, data, name="plan.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.mark.parametrize(
    "change,error,words",
    [
        (
            {"model": {"num_layers": 3}, "alphas": [[4, 0]] * 3, "betas": [[0.25, 0.125]] * 3},
            CheckpointMismatchError,
            "another model",
        ),
        ({"model": {"model_type": "qwen2"}}, CheckpointMismatchError, "model_type"),
        ({"alphas": [[0, 0]]}, InvalidOptionError, "alphas has 1 layers"),
        ({"betas": [[0.5], [0.5, 0.5]]}, InvalidOptionError, "betas[0] has 1 heads"),
        ({"betas": [[0.5, 1.5], [0.5, 0.5]]}, InvalidOptionError, "[0, 1]"),
        ({"alphas": [[-20, 0], [0, 0]]}, InvalidOptionError, "< 1"),
    ],
)
def test_bad_plans_raise_one_clear_error_and_leave_the_model_untouched(tmp_path, change, error, words):
    plan = _plan()
    for key, value in change.items():
        plan[key] = {**plan[key], **value} if isinstance(value, dict) else value
    path = _write(tmp_path, plan)
    model = tiny_model("llama")
    with pytest.raises(error) as info:
        hf_attn_zoo.patch(model, "moa", plan=str(path))
    assert words in str(info.value) and str(path) in str(info.value)
    assert hf_attn_zoo.applied_patches(model) == [] and model.config._attn_implementation != "zoo"


def test_unreadable_or_corrupt_plan_files(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(InvalidOptionError, match="not valid JSON"):
        hf_attn_zoo.patch(model, "moa", plan=str(_write(tmp_path, '{"model": {')))
    with pytest.raises(InvalidOptionError, match="cannot read"):
        hf_attn_zoo.patch(model, "moa", plan=str(tmp_path / "missing.json"))
    with pytest.raises(InvalidOptionError, match="either a plan or alpha"):
        hf_attn_zoo.patch(model, "moa", plan=_plan(), beta=0.5)
    assert hf_attn_zoo.applied_patches(model) == []


def test_plan_is_stored_inline_and_survives_save_and_reload(tmp_path):
    path = _write(tmp_path, _plan())
    model = hf_attn_zoo.patch(tiny_model("llama"), "moa", plan=str(path))
    ids = torch.randint(3, 128, (2, 12))
    expected = model(ids).logits
    model.save_pretrained(tmp_path / "ckpt")
    path.unlink()  # the checkpoint must not need the plan file
    reloaded = hf_attn_zoo.from_pretrained(tmp_path / "ckpt").eval()
    assert hf_attn_zoo.applied_patches(reloaded)[0]["options"]["plan"]["alphas"] == KV_ALPHAS
    assert torch.equal(reloaded(ids).logits, expected)


def _loss_with_row_masked(model, ids, target, t):
    """Mean next-token CE (float64) with attention row `i` of (layer, head) moved towards masking key `j`:
    `A_i <- (A_i - t A_ij e_j) / (1 - t A_ij)` (t = 1 masks it and renormalises), plus that `A_ij`."""
    spec = family_specs()["llama"]
    layer_t, head, i, j = target
    seen = {}

    def handler(base, module, query, key, value, attention_mask, **kwargs):
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        n = query.shape[2]
        scores = (query @ key.transpose(-1, -2)) * kwargs["scaling"]
        attn = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
        if module.layer_idx == layer_t:
            attn = attn.clone()
            a_ij = attn[0, head, i, j].item()
            seen["a"] = a_ij
            attn[0, head, i] = (attn[0, head, i] - t * a_ij * F.one_hot(torch.tensor(j), n)) / (1 - t * a_ij)
        return (attn @ value).transpose(1, 2), None

    attentions = [spec.attention_module(model, i) for i in range(2)]
    for attention in attentions:
        install_handler(model, attention, handler)
    try:
        with torch.no_grad():
            logits = model(ids[None], use_cache=False).logits[0]
    finally:
        for attention in attentions:
            remove_handler(model, attention)
    return F.cross_entropy(logits[:-1], ids[1:]).item(), seen["a"]


def test_profiled_influence_matches_finite_differences():
    model = tiny_model("llama").double()
    ids = torch.randint(3, 128, (10,))
    profile = profile_sequences(model, {10: [ids]}, block_size=1, progress=False)
    influence = profile.influence[10]
    assert influence.shape == (2, 4, 10, 10)
    assert torch.equal(influence.triu(1), torch.zeros_like(influence))  # nothing above the diagonal
    assert torch.equal(influence[1, :, 9], torch.zeros(4, 10))  # the last token's output reaches no loss term
    delta = 1e-3
    for target in [(0, 1, 5, 2), (1, 2, 7, 0), (1, 0, 8, 8), (0, 3, 8, 4)]:
        plus, a_ij = _loss_with_row_masked(model, ids, target, delta)
        minus, _ = _loss_with_row_masked(model, ids, target, -delta)
        # d loss / dt at t = 0 is A_ij (sum_n A_in G_in - G_ij) = (1 - A_ij) E_ij
        expected = abs((plus - minus) / (2 * delta)) / (1 - a_ij)
        assert expected > 1e-5
        assert influence[target].item() == pytest.approx(expected, rel=1e-2)
    # block sums of the per-entry profile are the block profile
    blocks = profile_sequences(model, {10: [ids]}, block_size=4, progress=False).influence[10]
    torch.testing.assert_close(blocks, block_sum(influence, 4), rtol=1e-5, atol=1e-9)


def test_profile_save_and_load(tmp_path):
    model = tiny_model("llama")
    profile = profile_sequences(model, {8: [torch.randint(3, 128, (8,))] * 2}, block_size=4, progress=False)
    loaded = AttentionProfile.load(profile.save(tmp_path / "prof.pt"))
    assert loaded.lengths == [8] and loaded.model == profile.model
    torch.testing.assert_close(loaded.influence[8], profile.influence[8])
    with pytest.raises(InvalidOptionError, match="not an MoA profile"):
        torch.save({"x": 1}, tmp_path / "other.pt")
        AttentionProfile.load(tmp_path / "other.pt")


def _synthetic_profile(global_heads: set[tuple[int, int]], lengths=(64, 128), block=8) -> AttentionProfile:
    """Query heads of `global_heads` (layer, KV head) spread influence evenly; the others only near the diagonal."""
    influence = {}
    for n in lengths:
        nb = n // block
        distance = (torch.arange(nb)[:, None] - torch.arange(nb)[None, :]).float()
        causal = distance >= 0
        local = torch.exp(-distance.clamp(min=0)) * causal
        spread = causal.float()
        influence[n] = torch.stack(
            [
                torch.stack([spread if (layer, h // 2) in global_heads else local for h in range(4)])
                for layer in range(2)
            ]
        )
    info = {"model_type": "llama", "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "name_or_path": "synthetic"}
    return AttentionProfile(influence, block, info)


def test_search_gives_global_heads_long_spans_within_the_budget():
    result = search_plan(_synthetic_profile({(0, 1), (1, 0)}), density=0.5, sinks=4)
    assert len(result.plans) == 2
    for plan in result.plans:
        spans = [[a + b * 128 for a, b in zip(ra, rb)] for ra, rb in zip(plan.alphas, plan.betas)]
        assert spans[0][1] > spans[0][0] and spans[1][0] > spans[1][1]
        for n in (64, 128):
            dens = [rule_stats(a, b, n, 4, 8)[1] for ra, rb in zip(plan.alphas, plan.betas) for a, b in zip(ra, rb)]
            assert 0.45 - 1e-9 <= sum(dens) / len(dens) <= 0.5 + 1e-9
    chosen = result.chosen
    assert chosen.provenance["loss"]["128"] == min(p.provenance["loss"]["128"] for p in result.plans)
    model = hf_attn_zoo.patch(tiny_model("llama"), "moa", plan=chosen.to_dict())  # a valid plan for the model
    assert hf_attn_zoo.applied_patches(model)[0]["options"]["length"] == 128


def test_search_limits_distinct_rules_per_layer():
    profile = _synthetic_profile({(0, 1)})
    heads = {n: t.clone() for n, t in profile.influence.items()}
    for t in heads.values():  # four different decay rates in layer 0 (per-query-head rules)
        for h in range(4):
            t[0, h] = t[0, h] ** (h + 1) if h else t[0, h]
    profile.influence = heads
    plan = search_plan(profile, density=0.5, sinks=4, granularity="head", max_rules_per_layer=1).chosen
    for alphas, betas in zip(plan.alphas, plan.betas):
        assert len(set(zip(alphas, betas))) == 1


def test_infeasible_budget_names_the_minimum_density():
    with pytest.raises(InvalidOptionError, match=r"minimum achievable density at length 64 is 0\.\d+"):
        search_plan(_synthetic_profile(set()), density=0.05, sinks=4)


def test_rule_stats_density_is_exact():
    for alpha, beta, n, sinks in [(8, 0.25, 64, 4), (0, 0.5, 50, 3), (-16, 1.0, 64, 0)]:
        rules = uniform_plan(tiny_model("llama").config, alpha, beta, sinks=sinks).query_head_rules(0, n, sinks)
        mask = _reference_mask(rules[:1], n)[0]
        share, density = rule_stats(alpha, beta, n, sinks, 8)
        assert density == pytest.approx(mask.sum().item() / (n * (n + 1) / 2))
        causal = torch.ones(n, n).tril()
        torch.testing.assert_close(share * block_sum(causal, 8), block_sum(mask.float(), 8))
