"""MoTE expert switching: what the routers select on real forwards, drop/on/gain, the recorded options, temporary
switches (`switch_experts`) alone and on a patched model, option checks, and profile -> switches."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

import hf_attn_zoo
from hf_attn_zoo.analysis import ExpertProfile
from hf_attn_zoo.errors import InvalidOptionError, PatchConflictError, UnsupportedArchitectureError
from hf_attn_zoo.families import family_specs
from hf_attn_zoo.moe import (
    RoutingOverride,
    experts_to_switch,
    random_experts,
    route,
    set_routing,
    switch_experts,
)
from hf_attn_zoo.registry import get_patch
from tests.matrix import clone, tiny_model

ATOL = 1e-6


def moe_model(family: str = "mixtral", **overrides) -> torch.nn.Module:
    """A tiny MoE with sharp routers, so that switching an expert changes many tokens' choices."""
    model = tiny_model(family, **overrides)
    spec = family_specs()[family]
    with torch.no_grad():
        for layer in spec.moe_layers(model):
            getattr(spec.mlp_module(model, layer), spec.mlp.router).weight.mul_(8.0)
    return model


def _routers(model) -> dict[int, torch.nn.Module]:
    spec = family_specs()[model.config.model_type]
    return {i: getattr(spec.mlp_module(model, i), spec.mlp.router) for i in spec.moe_layers(model)}


@contextlib.contextmanager
def recorded(model):
    """What every router returned in the forwards of the block: `{layer: (logits, weights, index)}` (last call)."""
    seen = {}
    hooks = [
        router.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, tuple(t.detach() for t in out)))
        for i, router in _routers(model).items()
    ]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def _ids(batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _untouched(model) -> bool:
    routers = all(
        "forward" not in r.__dict__ and not any(k.startswith("_zoo") for k in r.__dict__)
        for r in _routers(model).values()
    )
    return routers and not any(k.startswith(("_zoo_switch", "_zoo_routing")) for k in model.__dict__)


def _routing(model, **switches):
    with torch.no_grad(), recorded(model) as seen:
        logits = model(_ids()).logits
    return logits, seen


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"])
def test_switched_off_experts_are_never_selected_and_their_place_is_taken(family):
    base = moe_model(family)
    layers = family_specs()[family].moe_layers(base)
    _, before = _routing(base)
    off = {"all": [0], layers[-1]: [1]}
    model = hf_attn_zoo.patch(clone(base), "mote", off=off)
    _, after = _routing(model)
    replaced = 0
    for layer, (logits, weights, index) in after.items():
        k = _routers(model)[layer].top_k
        disabled = torch.tensor([0, 1] if layer == layers[-1] else [0])
        assert index.shape[1] == k and bool((weights > 0).all()), "every token keeps top-k active experts"
        assert not torch.isin(index, disabled).any()
        # the routing these very logits get without switches
        original = route(model, layer, logits).index
        hit = torch.isin(original, disabled).any(-1)
        replaced += int(hit.sum())
        if family != "deepseek_v3":  # there a disabled expert also lowers its group's score, moving other tokens
            assert torch.equal(index[~hit].sort(-1).values, original[~hit].sort(-1).values)
        if family in ("mixtral", "qwen3_moe", "olmoe"):
            masked = logits.float().masked_fill(torch.isin(torch.arange(logits.shape[-1]), disabled), float("-inf"))
            assert torch.equal(index.sort(-1).values, masked.topk(k, -1).indices.sort(-1).values)
    # the first MoE layer sees the same hidden states: only the routing changed
    first = layers[0]
    assert torch.equal(after[first][0], before[first][0])
    assert replaced > 0, "no token had a switched-off expert among its original choices"


def test_drop_on_and_gain_on_real_forwards():
    base = moe_model("mixtral")
    _, plain = _routing(base)
    layer = 1
    counts = torch.bincount(plain[layer][2].reshape(-1), minlength=4)
    busy, idle = int(counts.argmax()), int(counts.argmin())

    dropped = hf_attn_zoo.patch(clone(base), "mote", drop={layer: [busy]})
    _, seen = _routing(dropped)
    logits, weights, index = seen[layer]
    hit = (plain[layer][2] == busy).any(-1)
    assert torch.equal(index, plain[layer][2]), "drop keeps the selection (no replacement)"
    assert bool((weights[index == busy] == 0).all()) and bool((weights[hit].sum(-1) - 1).abs().max() < 1e-5)
    assert torch.equal(seen[0][1], plain[0][1]), "other layers are unchanged"

    forced = hf_attn_zoo.patch(clone(base), "mote", on={layer: [idle]})
    _, seen = _routing(forced)
    assert bool((seen[layer][2] == idle).any(-1).all())

    gained = hf_attn_zoo.patch(clone(base), "mote", gain={str(layer): {str(busy): 0.25}})
    _, seen = _routing(gained)
    assert torch.equal(seen[layer][2], plain[layer][2])
    factor = torch.where(plain[layer][2] == busy, 0.25, 1.0)
    torch.testing.assert_close(seen[layer][1], plain[layer][1] * factor, atol=ATOL, rtol=0)


def test_recorded_options_are_json_stable_and_reload_exactly(tmp_path):
    model = hf_attn_zoo.patch(
        moe_model("qwen3_moe"), "mote", off={1: [3, 3], "all": [0]}, on={"0": [1]}, gain={1: {1: 2}}
    )
    record = hf_attn_zoo.applied_patches(model)[0]
    assert record["options"] == {
        "off": {"all": [0], "1": [3]},
        "drop": None,
        "on": {"0": [1]},
        "gain": {"1": {"1": 2.0}},
    }
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["hf_attn_zoo"] == [record]
    reloaded = hf_attn_zoo.from_pretrained(tmp_path).eval()
    assert hf_attn_zoo.applied_patches(reloaded) == [record]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)


def test_layers_selection_limits_all_and_rejects_other_layers():
    base = moe_model("mixtral")
    model = hf_attn_zoo.patch(clone(base), "mote", layers=[1], off={"all": [0]})
    _, seen = _routing(model)
    _, plain = _routing(base)
    assert torch.equal(seen[0][2], plain[0][2]) and not (seen[1][2] == 0).any()
    with pytest.raises(InvalidOptionError, match="layer 0 has switches but is not among the patched layers"):
        hf_attn_zoo.patch(clone(base), "mote", layers=[1], off={0: [1]})
    with pytest.raises(InvalidOptionError, match=r"selected layers \[0\] hold no MoE layer"):
        hf_attn_zoo.patch(moe_model("deepseek_v3"), "mote", layers=[0], off={"all": [1]})


def test_switch_experts_on_a_plain_model_equals_the_patch_and_restores_exactly():
    model = moe_model("olmoe")
    ids = _ids()
    options = {"off": {"all": [2]}, "drop": {1: [0]}, "gain": {0: {1: 1.5}}}
    patched = hf_attn_zoo.patch(clone(model), "mote", **options)
    with torch.no_grad():
        base = model(ids).logits
        with switch_experts(model, **options, record=True) as handle:
            switched = model(ids).logits
            assert set(handle.decisions) == {0, 1}
            assert not (handle.decisions[0].index == 2).any()
        after = model(ids).logits
        assert torch.equal(switched, patched(ids).logits)
    assert not torch.allclose(switched, base, atol=1e-3)
    assert torch.equal(after, base) and _untouched(model)
    # a failing block restores too
    with pytest.raises(RuntimeError, match="boom"), switch_experts(model, off={0: [1]}):
        raise RuntimeError("boom")
    assert _untouched(model)


def test_switch_experts_combines_with_the_patch_and_restores_it():
    base = moe_model("mixtral")
    ids = _ids()
    model = hf_attn_zoo.patch(clone(base), "mote", off={"all": [0]}, gain={1: {2: 0.5}})
    record = hf_attn_zoo.applied_patches(model)

    def reference(**options):
        with torch.no_grad():
            return hf_attn_zoo.patch(clone(base), "mote", **options)(ids).logits

    with torch.no_grad():
        patched = model(ids).logits
        with switch_experts(model, off={1: [3]}):
            assert torch.equal(model(ids).logits, reference(off={"all": [0], 1: [3]}, gain={1: {2: 0.5}}))
            # nested: the inner block combines with the outer one; its setting of an expert wins (off -> on)
            with switch_experts(model, on={0: [0]}, gain={1: {2: 2.0}}):
                assert torch.equal(model(ids).logits, reference(off={1: [0, 3]}, on={0: [0]}, gain={1: {2: 2.0}}))
            assert torch.equal(model(ids).logits, reference(off={"all": [0], 1: [3]}, gain={1: {2: 0.5}}))
        with switch_experts(model, drop={0: [1]}, mode="replace"):
            assert torch.equal(model(ids).logits, reference(drop={0: [1]}))
        with switch_experts(model):
            assert torch.equal(model(ids).logits, patched)
        assert torch.equal(model(ids).logits, patched)
    assert hf_attn_zoo.applied_patches(model) == record
    hf_attn_zoo.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)
    assert _untouched(model)


BAD = [
    ({"off": {2: [0]}}, "off: layer 2 is out of range"),
    ({"off": {0: [4]}}, r"off\[0\]: expert 4 is out of range"),
    ({"off": {"first": [0]}}, "layer keys are layer indices"),
    ({"off": {-1: [0]}}, "layer keys are layer indices"),
    ({"off": {0: "1"}}, "must be a list of expert indices"),
    ({"off": [[0, 1]]}, "option off=.* has the wrong type", "off must be a dict"),
    ({"on": {0: [0, 1, 2]}}, r"3 experts switched on \[0, 1, 2\] do not fit in top_k=2"),
    ({"off": {0: [0, 1, 2]}}, "only 1 can be selected once the ones switched off are masked"),
    ({"off": {"all": [1]}, "on": {1: [1]}}, r"experts \[1\] of layer 1 are both in off and in on"),
    ({"off": {0: [1]}, "drop": {"0": [1]}}, "both in off and in drop"),
    ({"gain": {0: {1: -0.5}}}, "finite number >= 0"),
    ({"gain": {0: {1: float("nan")}}}, "finite number >= 0"),
    ({"gain": {0: [1]}}, r"gain\[0\] must be a dict"),
    ({"of": {0: [1]}}, "unknown option", None),
]


@pytest.mark.parametrize("case", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_options_error_before_the_model_changes(case):
    options, message, temporary = case if len(case) == 3 else (*case, case[1])
    model = moe_model("mixtral")
    ids = _ids()
    with torch.no_grad():
        base = model(ids).logits
    with pytest.raises(InvalidOptionError, match=message):
        hf_attn_zoo.patch(model, "mote", **options)
    assert _untouched(model) and hf_attn_zoo.applied_patches(model) == []
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    if temporary is not None:
        with pytest.raises(InvalidOptionError, match=temporary), switch_experts(model, **options):
            pass
        assert _untouched(model)


def test_bad_temporary_switches_keep_the_patch_and_conflicts_are_refused():
    model = hf_attn_zoo.patch(moe_model("deepseek_v3"), "mote", off={"all": [0]})
    ids = _ids()
    with torch.no_grad():
        patched = model(ids).logits
    with pytest.raises(InvalidOptionError, match="layer 0 is not a MoE layer"):
        with switch_experts(model, off={0: [1]}):
            pass
    with pytest.raises(InvalidOptionError, match="cannot switch on experts"):
        with switch_experts(model, on={1: [2, 4, 6]}):
            pass
    with pytest.raises(InvalidOptionError, match="mode must be"):
        with switch_experts(model, off={1: [1]}, mode="add"):
            pass
    with pytest.raises(PatchConflictError, match="already carry a 'mote' patch"):
        hf_attn_zoo.patch(model, "mote", off={1: [2]})
    # two mote patches on disjoint layers would need two routing installations: one patch holds every switch
    other = hf_attn_zoo.patch(moe_model("deepseek_v3"), "mote", layers=[1], off={"all": [0]})
    with pytest.raises(PatchConflictError, match="already carries expert switches"):
        hf_attn_zoo.patch(other, "mote", layers=[2], off={"all": [1]})
    assert len(hf_attn_zoo.applied_patches(other)) == 1
    with pytest.raises(PatchConflictError, match="already installed"):
        set_routing(model, RoutingOverride(top_k=1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, patched)
    assert len(hf_attn_zoo.applied_patches(model)) == 1
    # an unrelated routing installation blocks temporary switches with a clear message
    plain = moe_model("mixtral")
    with set_routing(plain):
        with pytest.raises(PatchConflictError, match="already carry routing overrides"):
            with switch_experts(plain, off={0: [1]}):
                pass


def test_dense_families_are_refused():
    spec = family_specs()["llama"]
    reason = get_patch("mote").check(spec, spec.tiny_config())
    assert "dense" in reason and "mixtral" in reason
    with pytest.raises(UnsupportedArchitectureError, match="mote cannot patch a llama model"):
        hf_attn_zoo.patch(tiny_model("llama"), "mote", off={0: [0]})
    with pytest.raises(UnsupportedArchitectureError, match="no MoE layer"):
        with switch_experts(tiny_model("llama"), off={0: [0]}):
            pass
    assert get_patch("mote").neutral_config(spec, spec.tiny_config()).to_dict() == {
        "off": None,
        "drop": None,
        "on": None,
        "gain": None,
    }


def _profile() -> ExpertProfile:
    # target "code": frequencies code - prose per (layer, expert); layers 3 and 5, 4 experts each
    return ExpertProfile(
        classes=["code", "prose"],
        target="code",
        contrast="mean",
        layers=[3, 5],
        num_experts=[4, 4],
        prompts={"code": 1, "prose": 1},
        tokens={"code": 10, "prose": 10},
        counts={"code": [[9, 1, 5, 5], [8, 7, 0, 5]], "prose": [[1, 1, 5, 2], [2, 9, 4, 5]]},
        weight_sums={"code": [[0.0] * 4, [0.0] * 4], "prose": [[0.0] * 4, [0.0] * 4]},
    )


def test_experts_to_switch_from_a_profile():
    profile = _profile()
    # scores: L3 [.8, 0, 0, .3], L5 [.6, -.2, -.4, 0]
    assert experts_to_switch(profile, 1) == {3: [0]}
    assert experts_to_switch(profile, 3) == {3: [0, 3], 5: [0]}
    assert experts_to_switch(profile, 3, max_per_layer=1) == {3: [0], 5: [0]}
    assert experts_to_switch(profile, 8, min_score=0.1) == {3: [0, 3], 5: [0]}
    assert experts_to_switch([(5, 2, 0.9), (3, 1, 0.5), (5, 2, 0.4)], 5) == {3: [1], 5: [2]}
    assert experts_to_switch(profile, 0) == {}
    with pytest.raises(InvalidOptionError, match="n must be"):
        experts_to_switch(profile, -1)
    with pytest.raises(InvalidOptionError, match="ranked items"):
        experts_to_switch([("a", 1)], 1)
    # ready for the patch (and, through JSON, for the CLI)
    model = moe_model("mixtral", num_hidden_layers=6)
    hf_attn_zoo.patch(model, "mote", off=json.loads(json.dumps(experts_to_switch(profile, 3))))
    assert hf_attn_zoo.applied_patches(model)[0]["options"]["off"] == {"3": [0, 3], "5": [0]}


def test_random_experts_are_reproducible_and_respect_the_limits():
    profile = _profile()
    draw = random_experts(profile, 5, seed=3)
    assert draw == random_experts(profile, 5, seed=3) and sum(map(len, draw.values())) == 5
    assert set(draw) <= {3, 5} and all(0 <= e < 4 for experts in draw.values() for e in experts)
    limited = random_experts(profile, 8, seed=1, max_per_layer=2, exclude={"all": [0], 5: [1]})
    assert all(len(experts) <= 2 and 0 not in experts for experts in limited.values())
    assert 1 not in limited.get(5, [])
    model = moe_model("qwen3_moe")
    from_model = random_experts(model, 3, seed=0)
    assert set(from_model) <= {0, 1} and sum(map(len, from_model.values())) == 3


def test_cli_patch_takes_json_and_yaml_switches(tmp_path):
    from transformers import AutoTokenizer

    from hf_attn_zoo.assets import default_model_path
    from hf_attn_zoo.cli import patch_main

    source, out = tmp_path / "moe", tmp_path / "out"
    moe_model("mixtral").save_pretrained(source)
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(source)
    assert patch_main([str(source), "mote", str(out), 'off={"1": [2], "all": [0]}', "gain={0: {3: 0.5}}"]) == 0
    reloaded = hf_attn_zoo.from_pretrained(out)
    assert hf_attn_zoo.applied_patches(reloaded)[0]["options"] == {
        "off": {"all": [0], "1": [2]},
        "drop": None,
        "on": None,
        "gain": {"0": {"3": 0.5}},
    }
    _, seen = _routing(reloaded)
    assert not (seen[0][2] == 0).any() and not torch.isin(seen[1][2], torch.tensor([0, 2])).any()
