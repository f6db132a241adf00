"""Hybrid models: different attention methods on disjoint layer sets (`patch_plan`, `except_*` layer selectors).

Each attention method of the grid runs on the layers `except_every_2nd`, and the next one (in a fixed cycle) on
`every_2nd`, on families that differ in the ways that matter (GQA Llama, Helium's interleaved RoPE, MoE
Mixtral, q/k-norm Qwen 3). Pairs a family does not support are left out, as in the common grid.
"""

from __future__ import annotations

import pytest
import torch

import hf_attn_zoo
from hf_attn_zoo.errors import InvalidOptionError, PatchConflictError
from hf_attn_zoo.families import family_specs
from hf_attn_zoo.registry import PATCHES
from tests.matrix import METHOD_CASES, clone, decode_in_steps, randomize_new_parameters, supported, tiny_model

ATTENTION_METHODS = sorted(
    m for m in METHOD_CASES if {"attention", "attention_fn"} & set(PATCHES[m].targets) and m != "bam"
)
PARTNER = {m: ATTENTION_METHODS[(i + 1) % len(ATTENTION_METHODS)] for i, m in enumerate(ATTENTION_METHODS)}
HYBRID_FAMILIES = ["llama", "helium", "mixtral", "qwen3"]


def _plan(method: str) -> list[dict]:
    partner = PARTNER[method]
    return [
        {"method": method, "layers": "except_every_2nd", **METHOD_CASES[method]},
        {"method": partner, "layers": "every_2nd", **METHOD_CASES[partner]},
    ]


HYBRIDS = [
    pytest.param(m, f, id=f"{m}+{PARTNER[m]}-{f}")
    for m in ATTENTION_METHODS
    for f in HYBRID_FAMILIES
    if supported(m, f) and supported(PARTNER[m], f)
]
HYBRIDS_KV_CACHE = [
    p
    for p in HYBRIDS
    if PATCHES[p.values[0]].capabilities.kv_cache and PATCHES[PARTNER[p.values[0]]].capabilities.kv_cache
]


def _hybrid(method: str, family: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    base = tiny_model(family)
    model = hf_attn_zoo.patch_plan(clone(base), _plan(method))
    randomize_new_parameters(model)
    return base, model


def _ids(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length))


@pytest.mark.parametrize("method,family", HYBRIDS)
def test_each_layer_set_runs_its_own_method(method, family):
    base, model = _hybrid(method, family)
    layers = len(family_specs()[family].decoder_layers(model))
    records = hf_attn_zoo.applied_patches(model)
    assert [r["method"] for r in records] == [method, PARTNER[method]]
    assert sorted(records[0]["layers"] + records[1]["layers"]) == list(range(layers))
    ids = _ids()
    assert not torch.equal(model(ids).logits, base(ids).logits)


@pytest.mark.parametrize("method,family", HYBRIDS_KV_CACHE)
def test_hybrid_decoding_equals_full_forward(method, family):
    _, model = _hybrid(method, family)
    ids = _ids()
    with torch.no_grad():
        full = model(ids).logits
    torch.testing.assert_close(decode_in_steps(model, ids, prefill=7), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method,family", HYBRIDS)
def test_hybrid_save_reload_and_unpatch_are_exact(method, family, tmp_path):
    base, model = _hybrid(method, family)
    ids = _ids()
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    reloaded = hf_attn_zoo.from_pretrained(tmp_path).eval()
    assert hf_attn_zoo.applied_patches(reloaded) == hf_attn_zoo.applied_patches(model)
    assert torch.equal(reloaded(ids).logits, expected)
    hf_attn_zoo.unpatch(model)
    assert torch.equal(model(ids).logits, base(ids).logits)


def test_a_refused_entry_reverts_the_whole_plan():
    base = tiny_model("llama")
    model = hf_attn_zoo.patch(clone(base), "moh", layers=[0], **METHOD_CASES["moh"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    records = hf_attn_zoo.applied_patches(model)
    ids = _ids()
    logits = model(ids).logits
    plan = [
        {"method": "sliding_window", "layers": [1], "window": 3},
        {"method": "linearize", "layers": [1], "feature_map": "hedgehog"},  # layer 1 already has a window
    ]
    with pytest.raises(PatchConflictError, match="patch plan entry 1 .linearize.: layers \\[1\\] already carry"):
        hf_attn_zoo.patch_plan(model, plan)
    assert hf_attn_zoo.applied_patches(model) == records
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(ids).logits, logits)


def test_a_plan_with_a_bad_option_leaves_an_unpatched_model_unpatched():
    base = tiny_model("llama")
    model = clone(base)
    plan = [{"method": "sliding_window", "layers": "every_2nd", "window": 3}, {"method": "moh", "top_k": 0}]
    with pytest.raises(InvalidOptionError, match="patch plan entry 1 .moh."):
        hf_attn_zoo.patch_plan(model, plan)
    assert hf_attn_zoo.applied_patches(model) == []
    ids = _ids()
    assert torch.equal(model(ids).logits, base(ids).logits)


@pytest.mark.parametrize(
    "plan,match",
    [
        ({"method": "moh"}, "list of entries"),
        ([{"layers": "all"}], "entry 0 .* 'method' name"),
        (["moh"], "entry 0 .* 'method' name"),
    ],
)
def test_malformed_plans_are_refused_by_name(plan, match):
    with pytest.raises(InvalidOptionError, match=match):
        hf_attn_zoo.patch_plan(tiny_model("llama"), plan)
