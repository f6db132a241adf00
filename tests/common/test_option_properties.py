"""Random option sets, drawn from each method's declared option types and bounds, on the tiny models of the grid.

Whatever is drawn, `patch` either refuses with one `ZooError` and leaves the model bit-identical, or patches a model
whose outputs are finite and which `unpatch` restores exactly. The draws straddle every declared bound (values just
inside and just outside, beyond the model's limits, non-finite floats, wrong types), so a bound that is missing, or
a combination of options that no `validate` foresaw, surfaces as a crash, a non-finite output or a changed model.
"""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import hf_attn_zoo
from hf_attn_zoo.errors import ZooError
from hf_attn_zoo.families import family_specs
from hf_attn_zoo.registry import PATCHES, get_patch
from tests.matrix import FAMILIES, METHOD_CASES, randomize_new_parameters, tiny_model

_LAYER_KEYS = st.sampled_from(["all", 0, 1, 5, -1, "first"])
_EXPERTS = st.lists(st.integers(-1, 6), max_size=3)
_FACTORS = st.dictionaries(st.integers(-1, 6), st.floats(-1, 3) | st.sampled_from([math.nan, math.inf]), max_size=2)

_STRATEGIES: dict[type, st.SearchStrategy] = {
    bool: st.booleans(),
    # small values straddle the lower bounds and the tiny models' head counts and blocks; large ones pass their
    # 256 positions
    int: st.integers(-2, 12) | st.integers(13, 300),
    float: st.floats(-1, 2) | st.sampled_from([0.0, 1.0, math.nan, math.inf, -math.inf]),
    str: st.just("no_such_plan.json"),
    dict: st.dictionaries(_LAYER_KEYS, _EXPERTS | _FACTORS, max_size=2),
}


def _strategy(annotation: typing.Any) -> st.SearchStrategy:
    if typing.get_origin(annotation) is typing.Literal:
        return st.sampled_from(typing.get_args(annotation))
    args = typing.get_args(annotation)
    if args:  # a union: any of its members
        return st.one_of([_strategy(a) if a is not type(None) else st.none() for a in args])
    return _STRATEGIES[annotation]


def _options(method: str) -> st.SearchStrategy[dict]:
    config_class = PATCHES[method].config_class
    hints = typing.get_type_hints(config_class)
    fields = {f.name: _strategy(hints[f.name]) | st.just("3") for f in dataclasses.fields(config_class)}
    return st.fixed_dictionaries({}, optional=fields)  # a random subset of the options, each drawn


def _families(method: str) -> list[str]:
    specs = family_specs()
    return [f for f in FAMILIES if get_patch(method).refusal(specs[f], specs[f].tiny_config()) is None]


@pytest.mark.parametrize("method", sorted(METHOD_CASES))
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_random_options_are_refused_cleanly_or_patch_and_unpatch_exactly(method, data):
    family = data.draw(st.sampled_from(_families(method)), label="family")
    options = {**METHOD_CASES[method], **data.draw(_options(method), label="options")}
    layers = data.draw(st.sampled_from(["all", [0], [1], "every_2nd"]), label="layers")
    model = tiny_model(family)
    ids = torch.randint(3, 128, (2, 10))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config, attention = model.config.to_dict(), model.config._attn_implementation
    with torch.no_grad():
        expected = model(ids).logits
    try:
        hf_attn_zoo.patch(model, method, layers=layers, **options)
    except ZooError as exc:
        event(f"refused: {type(exc).__name__}")
        assert model.config.to_dict() == config
        assert model.state_dict().keys() == state.keys()
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        with torch.no_grad():
            assert torch.equal(model(ids).logits, expected)
        return
    event("patched")
    randomize_new_parameters(model)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all(), f"{method} {options} gives non-finite logits"
    hf_attn_zoo.unpatch(model)
    assert hf_attn_zoo.applied_patches(model) == []
    assert model.config._attn_implementation == attention
    assert model.state_dict().keys() == state.keys()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
