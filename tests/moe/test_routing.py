"""Routing overrides (`hf_attn_zoo.moe`) on tiny random models of every MoE family.

The semantics are checked against a reference written out token by token (`_ranking`, `_weights`), independent of
the library's vectorised rules; model-level tests check neutrality, exact removal, per-row overrides, generation, and
row overrides merged on top of installed ones (`with_row_override`, what SCMoE uses on a MoTE patch).
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from hf_attn_zoo.errors import InvalidOptionError, PatchConflictError, UnsupportedArchitectureError
from hf_attn_zoo.families import family_specs
from hf_attn_zoo.moe.rules import moe_families_with_rules
from hf_attn_zoo.moe import RoutingOverride, route, routing_override, set_routing
from hf_attn_zoo.moe.plan import LayerPlan, merge_plans
from hf_attn_zoo.moe.routing import with_row_override
from tests.matrix import tiny_model

MOE_FAMILIES = [
    "deepseek_v3",
    "dots1",
    "flex_olmo",
    "glm4_moe",
    "gpt_oss",
    "granitemoe",
    "mixtral",
    "olmoe",
    "qwen2_moe",
    "qwen3_moe",
]
ATOL = 1e-6


def moe_model(family: str, **overrides) -> torch.nn.Module:
    """A tiny model with sharp routers (and, for DeepSeek-V3, a non-zero selection bias)."""
    model = tiny_model(family, **overrides)
    spec = family_specs()[family]
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in spec.moe_layers(model):
            router = getattr(spec.mlp_module(model, layer), spec.mlp.router)
            router.weight.mul_(8.0)
            if _rule(family).rule == "grouped_sigmoid":
                router.e_score_correction_bias.copy_(0.3 * torch.randn(router.weight.shape[0], generator=generator))
    return model


def _router(model, layer):
    spec = family_specs()[model.config.model_type]
    return getattr(spec.mlp_module(model, layer), spec.mlp.router)


def _first_moe_layer(model) -> int:
    return family_specs()[model.config.model_type].moe_layers(model)[0]


def _logits(model, layer, tokens: int = 48) -> torch.Tensor:
    """Router logits of random hidden states, computed by the router itself."""
    hidden = torch.randn(tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return _router(model, layer)(hidden)[0]


def _ids(batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _rule(family):
    return family_specs()[family].mlp.routing


# reference: one token at a time, written from the transformers routers' definitions
def _choice(family, router, logits_row):
    if _rule(family).rule == "topk_softmax":
        return logits_row.double()
    if _rule(family).rule == "grouped_sigmoid":
        return logits_row.double().sigmoid() + router.e_score_correction_bias.double()
    return logits_row.double().softmax(-1)


def _ranking(family, router, logits_row, disabled=(), forced=()) -> list[int]:
    """The experts one token may select, best first (DeepSeek-V3: only those of its selected groups)."""
    choice = _choice(family, router, logits_row).tolist()
    allowed = [e for e in range(len(choice)) if e not in disabled]
    if _rule(family).rule == "grouped_sigmoid":
        per = len(choice) // router.num_group

        def group_score(g):
            members = sorted((choice[e] for e in allowed if e // per == g), reverse=True)
            return sum(members[:2]) if members else float("-inf")

        forced_groups = {e // per for e in forced}
        groups = sorted(range(router.num_group), key=lambda g: (g in forced_groups, group_score(g)), reverse=True)
        allowed = [e for e in allowed if e // per in groups[: router.topk_group]]
    return sorted(allowed, key=lambda e: (e in forced, choice[e]), reverse=True)


def _weights(family, router, logits_row, selected, disabled=()) -> list[float]:
    """Weights of the `selected` experts (softmax families: a disabled expert is out of the softmax)."""
    row = logits_row.double().clone()
    rule = _rule(family)
    if rule.rule == "topk_softmax":
        return row[selected].softmax(-1).tolist()
    row[list(disabled)] = float("-inf")
    scores = row.sigmoid() if rule.rule == "grouped_sigmoid" else row.softmax(-1)
    picked = scores[selected]
    if rule.renormalise == "always" or router.norm_topk_prob:
        picked = picked / picked.sum()
    if rule.rule == "grouped_sigmoid":
        picked = picked * router.routed_scaling_factor
    return picked.tolist()


def _by_expert(decision, token) -> dict[int, float]:
    """{expert: weight} of the active slots of one token."""
    index, weight, active = decision.index[token], decision.weight[token], decision.active[token]
    return {int(i): float(w) for i, w, a in zip(index, weight, active) if a}


def _assert_token(decision, token, expected: dict[int, float]):
    got = _by_expert(decision, token)
    assert set(got) == set(expected), (token, got, expected)
    for expert, weight in expected.items():
        assert abs(got[expert] - weight) < 1e-5, (token, expert, got[expert], weight)


@pytest.fixture(scope="module", params=MOE_FAMILIES)
def family_model(request):
    return request.param, moe_model(request.param)


def test_every_moe_family_has_a_rule():
    moe = {name for name, spec in family_specs().items() if spec.mlp.kind == "moe"}
    assert moe == set(MOE_FAMILIES) == set(moe_families_with_rules())


def test_rule_reproduces_the_router_exactly(family_model):
    family, model = family_model
    for layer in family_specs()[family].moe_layers(model):
        router = _router(model, layer)
        hidden = torch.randn(40, model.config.hidden_size)
        with torch.no_grad():
            logits, weights, index = router(hidden)
        decision = route(model, layer, logits)
        # DeepSeek-V3's top-k is unsorted: compare per expert
        order, mine = index.argsort(-1), decision.index.argsort(-1)
        assert torch.equal(index.gather(-1, order), decision.index.gather(-1, mine))
        torch.testing.assert_close(decision.weight.gather(-1, mine), weights.gather(-1, order), atol=ATOL, rtol=0)
        assert decision.weight.dtype == weights.dtype


def test_neutral_override_and_exact_removal(family_model):
    family, model = family_model
    ids = _ids()
    with torch.no_grad():
        base = model(ids).logits
        keys = model.state_dict().keys()
        for overrides in (None, RoutingOverride(), [RoutingOverride(rows=[1]), RoutingOverride()]):
            handle = set_routing(model, overrides, record=True)
            torch.testing.assert_close(model(ids).logits, base, atol=ATOL, rtol=0)
            assert set(handle.decisions) == set(handle.layers)
            assert model.state_dict().keys() == keys
            handle.remove()
        with routing_override(model, RoutingOverride(rank=2)):
            assert not torch.allclose(model(ids).logits, base, atol=1e-3)
        assert torch.equal(model(ids).logits, base)
    for layer in family_specs()[family].moe_layers(model):
        router = _router(model, layer)
        assert "forward" not in router.__dict__ and not any(k.startswith("_zoo") for k in router.__dict__)
        assert not family_specs()[family].mlp_module(model, layer)._forward_pre_hooks


def test_recorded_decisions_are_the_routing_the_experts_got(family_model):
    family, model = family_model
    override = RoutingOverride(disabled={"all": [1]}, gain={"all": {2: 0.5}})
    with torch.no_grad(), routing_override(model, override, record=True) as handle:
        model(_ids())
    for layer, decision in handle.decisions.items():
        expected = route(model, layer, decision.logits, override)
        assert torch.equal(decision.index, expected.index) and torch.equal(decision.weight, expected.weight)
        assert decision.shape == (2, 9) and decision.logits.shape[0] == 18
        assert int(decision.counts()[1]) == 0 and int(decision.counts().sum()) == 18 * _router(model, layer).top_k


def test_disabled_experts_are_replaced_by_the_next_ranked(family_model):
    family, model = family_model
    layer = _first_moe_layer(model)
    router, logits = _router(model, layer), _logits(model, layer)
    k = router.top_k
    # DeepSeek-V3 (4 groups of 2, 2 groups per token, top-3): one disabled expert leaves a group with one
    disabled = [0] if family == "deepseek_v3" else [0, 3]
    decision = route(model, layer, logits, RoutingOverride(disabled={layer: disabled}))
    assert decision.index.shape == (logits.shape[0], k) and bool(decision.active.all())
    assert not torch.isin(decision.index, torch.tensor(disabled)).any()
    replaced = 0
    for t in range(logits.shape[0]):
        selected = _ranking(family, router, logits[t], disabled)[:k]
        _assert_token(decision, t, dict(zip(selected, _weights(family, router, logits[t], selected, disabled))))
        replaced += bool(set(_ranking(family, router, logits[t])[:k]) & set(disabled))
    assert replaced > 0, "no token had a disabled expert among its original choices"


def test_dropped_experts_leave_fewer_experts(family_model):
    family, model = family_model
    layer = _first_moe_layer(model)
    router, logits = _router(model, layer), _logits(model, layer)
    k = router.top_k
    original = route(model, layer, logits)
    dropped = int(original.counts().argmax())
    decision = route(model, layer, logits, RoutingOverride(dropped={layer: [dropped]}))
    hit = 0
    for t in range(logits.shape[0]):
        selected = _ranking(family, router, logits[t])[:k]
        kept = [e for e in selected if e != dropped]
        hit += len(kept) < k
        # renormalised over the kept ones where the family renormalises (GPT-OSS: softmax over their logits)
        _assert_token(decision, t, dict(zip(kept, _weights(family, router, logits[t], kept))))
    assert hit > 0 and int(decision.counts().sum()) == logits.shape[0] * k - hit


@pytest.mark.parametrize(
    "family,norm", [("qwen3_moe", True), ("olmoe", True), ("olmoe", False), ("deepseek_v3", False)]
)
def test_dropping_and_disabling_follow_norm_topk_prob(family, norm):
    model = moe_model(family, norm_topk_prob=norm)
    layer = _first_moe_layer(model)
    router, logits = _router(model, layer), _logits(model, layer)
    dropped = int(route(model, layer, logits).counts().argmax())
    decision = route(model, layer, logits, RoutingOverride(dropped={layer: [dropped]}))
    disabling = route(model, layer, logits, RoutingOverride(disabled={layer: [dropped]}))
    for t in range(logits.shape[0]):
        selected = _ranking(family, router, logits[t])[: router.top_k]
        kept = [e for e in selected if e != dropped]
        full = dict(zip(selected, _weights(family, router, logits[t], selected)))
        expected = dict(zip(kept, _weights(family, router, logits[t], kept))) if norm else {e: full[e] for e in kept}
        _assert_token(decision, t, expected)
        selected = _ranking(family, router, logits[t], [dropped])[: router.top_k]
        _assert_token(disabling, t, dict(zip(selected, _weights(family, router, logits[t], selected, [dropped]))))


def test_forced_experts_are_always_selected(family_model):
    family, model = family_model
    layer = _first_moe_layer(model)
    router, logits = _router(model, layer), _logits(model, layer)
    k = router.top_k
    forced = int(route(model, layer, logits).counts().argmin())
    decision = route(model, layer, logits, RoutingOverride(forced={layer: [forced]}))
    assert bool((decision.index == forced).any(-1).all()) and decision.index.shape[1] == k
    for t in range(logits.shape[0]):
        selected = _ranking(family, router, logits[t], forced=[forced])[:k]
        _assert_token(decision, t, dict(zip(selected, _weights(family, router, logits[t], selected))))


def test_gain_scales_one_weight(family_model):
    family, model = family_model
    layer = _first_moe_layer(model)
    logits = _logits(model, layer)
    original = route(model, layer, logits)
    expert = int(original.counts().argmax())
    decision = route(model, layer, logits, RoutingOverride(gain={layer: {expert: 2.5}}))
    assert torch.equal(decision.index, original.index)
    factor = torch.where(original.index == expert, 2.5, 1.0)
    torch.testing.assert_close(decision.weight, original.weight * factor, atol=ATOL, rtol=0)


def test_top_k_override_changes_the_count(family_model):
    family, model = family_model
    layer = _first_moe_layer(model)
    router, logits = _router(model, layer), _logits(model, layer)
    for k in (1, router.top_k + 1):
        decision = route(model, layer, logits, RoutingOverride(top_k=k))
        assert decision.index.shape == (logits.shape[0], k)
        for t in range(logits.shape[0]):
            selected = _ranking(family, router, logits[t])[:k]
            _assert_token(decision, t, dict(zip(selected, _weights(family, router, logits[t], selected))))
    with torch.no_grad(), routing_override(model, RoutingOverride(top_k=1), record=True) as handle:
        model(_ids())
    assert all(d.index.shape[1] == 1 for d in handle.decisions.values())


def test_rank_selects_the_rth_ranked_expert_alone(family_model):
    family, model = family_model
    layer = _first_moe_layer(model)
    router, logits = _router(model, layer), _logits(model, layer)
    for rank in (1, 2, 3):
        for disabled in ([], [2]):
            decision = route(model, layer, logits, RoutingOverride(rank=rank, disabled={layer: disabled}))
            assert decision.index.shape == (logits.shape[0], 1)
            expected = [_ranking(family, router, logits[t], disabled)[rank - 1] for t in range(logits.shape[0])]
            assert decision.index[:, 0].tolist() == expected
            assert bool((decision.weight == 1).all())


def test_per_row_overrides_touch_only_their_rows(family_model):
    family, model = family_model
    ids = _ids(4, 7, seed=1)
    weak, other = RoutingOverride(rank=2), RoutingOverride(disabled={"all": [0]}, top_k=1)
    with torch.no_grad():
        plain, plain_weak_rows = model(ids[:2]).logits, model(ids[2:]).logits
        with routing_override(model, weak):
            alone_weak = model(ids[2:]).logits
        with routing_override(model, other):
            alone_other = model(ids[:1]).logits
        with routing_override(model, RoutingOverride(rank=2, rows=range(2, 4))):
            mixed = model(ids).logits
        with routing_override(
            model, [RoutingOverride(rank=2, rows=[2, 3]), RoutingOverride(disabled={"all": [0]}, top_k=1)]
        ):
            two = model(ids).logits  # rows 0, 1: the rows=None override
    assert not torch.allclose(alone_weak, plain_weak_rows, atol=1e-3)
    torch.testing.assert_close(mixed[:2], plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2:], alone_weak, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(two[2:], alone_weak, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(two[:1], alone_other, atol=1e-5, rtol=1e-5)


def test_generate_with_cache_and_per_row_routing():
    model = moe_model("mixtral")
    ids = _ids(2, 6, seed=2)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(ids, **kwargs)
        with routing_override(model, RoutingOverride(rank=2)):
            weak = model.generate(ids, **kwargs)
            full = model(weak).logits  # no cache
            cache = DynamicCache(config=model.config)
            incremental = [model(weak[:, :6], cache=cache, use_cache=True).logits]
            incremental += [
                model(weak[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(6, weak.shape[1])
            ]
        with routing_override(model, RoutingOverride(rank=2, rows=[2, 3])):
            both = model.generate(torch.cat([ids, ids]), **kwargs)
    assert not torch.equal(plain, weak)
    torch.testing.assert_close(torch.cat(incremental, 1), full, atol=1e-4, rtol=1e-4)
    assert torch.equal(both[:2], plain) and torch.equal(both[2:], weak)


def test_update_on_route_and_conflicts():
    model = moe_model("qwen3_moe")
    counts = {}
    handle = set_routing(model, on_route=lambda layer, d: counts.__setitem__(layer, d.counts()))
    try:
        with pytest.raises(PatchConflictError, match="already installed"):
            set_routing(model, RoutingOverride(top_k=1))
        with torch.no_grad():
            model(_ids())
        assert set(counts) == {0, 1} and all(int(c.sum()) == 18 * 2 for c in counts.values())
        handle.update(RoutingOverride(disabled={0: [1]}, top_k=1))
        with pytest.raises(InvalidOptionError, match="expert 9"):
            handle.update(RoutingOverride(disabled={0: [9]}))
        with torch.no_grad():
            model(_ids())
        assert int(counts[0][1]) == 0 and int(counts[0].sum()) == 18
        with pytest.raises(InvalidOptionError, match="out of range for a batch of 2"):
            handle.update(RoutingOverride(top_k=1, rows=[5]))
            model(_ids())
    finally:
        handle.remove()
    handle.remove()  # idempotent


BAD = [
    ("mixtral", RoutingOverride(disabled={5: [0]}), "layer 5 is out of range"),
    ("mixtral", RoutingOverride(disabled={"first": [0]}), "layer keys"),
    ("mixtral", RoutingOverride(disabled={0: [4]}), "expert 4 is out of range"),
    ("mixtral", RoutingOverride(disabled={0: [-1]}), "expert -1 is out of range"),
    ("mixtral", RoutingOverride(forced={0: [0, 1, 2]}), "do not fit in top_k=2"),
    ("mixtral", RoutingOverride(forced={0: [1]}, disabled={"all": [1]}), "both forced and disabled"),
    ("mixtral", RoutingOverride(top_k=0), "top_k=0 must be between 1 and num_experts=4"),
    ("mixtral", RoutingOverride(top_k={1: 5}), "top_k=5"),
    ("mixtral", RoutingOverride(disabled={0: [0, 1, 2]}), "top_k=2 experts per token, but only 1"),
    ("mixtral", RoutingOverride(rank=5), "rank=5 is out of range"),
    ("mixtral", RoutingOverride(rank=0), "rank=0 is out of range"),
    ("mixtral", RoutingOverride(rank=2, top_k=2), "excludes top_k"),
    ("mixtral", RoutingOverride(gain={0: {1: -1.0}}), "finite number >= 0"),
    ("mixtral", RoutingOverride(rows=[]), "non-empty"),
    ("mixtral", [RoutingOverride(rows=[0, 1]), RoutingOverride(rows=[1])], "claimed by two overrides"),
    ("mixtral", [RoutingOverride(), RoutingOverride()], "at most one override"),
    ("deepseek_v3", RoutingOverride(disabled={0: [1]}), "layer 0 is not a MoE layer"),
    ("deepseek_v3", RoutingOverride(forced={1: [0, 2, 4]}), "only topk_group=2 groups"),
    ("deepseek_v3", RoutingOverride(rank=5), "ranks go from 1 to 4"),
    ("qwen3_moe", RoutingOverride(top_k=1, disabled={0: [1]}), "layer 0 is not a MoE layer"),
]


@pytest.mark.parametrize("family,override,message", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_overrides_error_and_leave_the_model_untouched(family, override, message):
    model = moe_model(family, mlp_only_layers=[0]) if family == "qwen3_moe" else moe_model(family)
    ids = _ids()
    with torch.no_grad():
        base = model(ids).logits
    with pytest.raises(InvalidOptionError, match=message):
        set_routing(model, override)
    spec = family_specs()[family]
    for layer in spec.moe_layers(model):
        assert "forward" not in _router(model, layer).__dict__
        assert not spec.mlp_module(model, layer)._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    set_routing(model).remove()  # nothing half-installed


def test_dense_models_are_refused_with_the_supported_families():
    model = tiny_model("llama")
    with pytest.raises(UnsupportedArchitectureError, match="no MoE layer.*deepseek_v3, dots1, .*, qwen3_moe"):
        set_routing(model, RoutingOverride(top_k=1))
    assert "forward" not in model.model.layers[0].mlp.__dict__


def test_gradients_flow_through_overridden_routing():
    model = moe_model("deepseek_v3").train()
    ids = _ids(4, 6)
    overrides = [RoutingOverride(rank=2, rows=[2, 3]), RoutingOverride(dropped={"all": [1]}, gain={2: {0: 2.0}})]
    with routing_override(model, overrides):
        model(ids, labels=ids).loss.backward()
    for layer in family_specs()["deepseek_v3"].moe_layers(model):
        grad = _router(model, layer).weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


# --- an override for some rows on top of installed overrides (SCMoE on a MoTE patch) ---


def test_merge_plans_unions_the_experts_and_takes_the_added_size():
    base = LayerPlan(disabled=frozenset({0}), forced=frozenset({2}), gain=((1, 0.5), (3, 2.0)), top_k=3)
    merged = merge_plans(base, LayerPlan(disabled=frozenset({1}), dropped=frozenset({4}), gain=((1, 0.25),), rank=2))
    assert merged == LayerPlan(
        disabled=frozenset({0, 1}),
        dropped=frozenset({4}),
        forced=frozenset({2}),
        gain=((1, 0.25), (3, 2.0)),
        top_k=None,
        rank=2,
    )
    # an added plan without a size keeps the installed one
    assert merge_plans(base, LayerPlan(dropped=frozenset({5}))).top_k == 3
    assert merge_plans(LayerPlan(rank=3), LayerPlan(top_k=1)) == LayerPlan(top_k=1)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_row_override_merges_with_installed_overrides_and_restores_them(family):
    model = moe_model(family)
    layers = family_specs()[family].moe_layers(model)
    ids = _ids(4, 7, seed=4)
    installed = RoutingOverride(disabled={"all": [0]}, gain={layers[-1]: {1: 0.5}})
    merged = RoutingOverride(disabled={"all": [0]}, gain={layers[-1]: {1: 0.5}}, rank=2)
    with torch.no_grad():
        with routing_override(model, installed):
            strong = model(ids[:2]).logits
        with routing_override(model, merged):
            weak = model(ids[2:]).logits
        with routing_override(model, RoutingOverride(rank=2)):
            unmerged = model(ids[2:]).logits
        handle = set_routing(model, installed, record=True)
        entries, cache = handle._entries, handle._rows_cache
        try:
            before = model(ids).logits
            with with_row_override(model, RoutingOverride(rank=2), rows=range(2, 4)) as in_force:
                assert in_force is handle
                both = model(ids).logits
                assert handle.decisions[layers[0]].index.shape[0] == 4 * 7
            assert handle._entries is entries and handle._rows_cache is cache
            assert torch.equal(model(ids).logits, before)
            with pytest.raises(RuntimeError, match="boom"), with_row_override(model, RoutingOverride(rank=2), [3]):
                raise RuntimeError("boom")
            assert handle._entries is entries and handle._rows_cache is cache
        finally:
            handle.remove()
    torch.testing.assert_close(both[:2], strong, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[2:], weak, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(weak, unmerged, atol=1e-3)


def test_row_override_without_installed_overrides_installs_and_removes_its_own():
    model = moe_model("olmoe")
    ids = _ids(4, 7, seed=4)
    with torch.no_grad():
        plain = model(ids).logits
        with routing_override(model, RoutingOverride(top_k=1, rows=[1, 3])):
            expected = model(ids).logits
        with with_row_override(model, RoutingOverride(top_k=1), rows=[1, 3]) as handle:
            assert torch.equal(model(ids).logits, expected)
        assert handle.removed and torch.equal(model(ids).logits, plain)
        # an installed handle without overrides (only watching): the added override alone, and on_route sees it
        seen = []
        with set_routing(model, on_route=lambda layer, d: seen.append(int(d.active.sum()))) as watching:
            with with_row_override(model, RoutingOverride(top_k=1), rows=[1, 3]) as handle:
                assert handle is watching
                torch.testing.assert_close(model(ids).logits, expected, atol=1e-6, rtol=0)
            assert watching._entries == []
    assert seen == [2 * 7 * 2 + 2 * 7 * 1] * 2  # rows 0, 2 route 2 experts per token, rows 1, 3 one
    assert all("forward" not in _router(model, layer).__dict__ for layer in family_specs()["olmoe"].moe_layers(model))


def test_row_override_errors_leave_the_installed_overrides_alone():
    model = moe_model("mixtral")
    handle = set_routing(model, RoutingOverride(forced={1: [3]}, disabled={0: [1, 2]}))
    entries = handle._entries
    try:
        with pytest.raises(
            InvalidOptionError,
            match=r"layer 1: rank=2 .*excludes .*forced.*In layer 1 the routing "
            r"overrides installed .* forced experts \[3\].*rows 2\.\.3 has "
            r"rank=2; choose an override",
        ):
            with with_row_override(model, RoutingOverride(rank=2), rows=[2, 3]):
                pass
        with pytest.raises(InvalidOptionError, match=r"layer 0: top_k=2 experts per token, but only 1 can be selected"):
            with with_row_override(model, RoutingOverride(disabled={0: [3]}), rows=[1]):
                pass
        with pytest.raises(InvalidOptionError, match="pass the rows as rows="):
            with with_row_override(model, RoutingOverride(top_k=1, rows=[1]), rows=[1]):
                pass
        with pytest.raises(InvalidOptionError, match="non-empty"):
            with with_row_override(model, RoutingOverride(top_k=1), rows=[]):
                pass
        assert handle._entries is entries
        with pytest.raises(PatchConflictError, match="already installed"):
            set_routing(model, RoutingOverride(top_k=1, rows=[1]))
        handle.update(RoutingOverride(top_k=1, rows=[0]))
        with pytest.raises(PatchConflictError, match=r"limited to rows \[0\].*rows 1\.\.2 can only be added"):
            with with_row_override(model, RoutingOverride(rank=2), rows=[1, 2]):
                pass
    finally:
        handle.remove()
