"""Option bounds: declared once in each option's metadata, checked in one place, shown by `methods`."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import torch

import hf_attn_zoo
from hf_attn_zoo.errors import InvalidOptionError
from hf_attn_zoo.families import family_specs
from hf_attn_zoo.options import Limit, bounds_text, check_bounds
from hf_attn_zoo.registry import PATCHES, get_patch
from tests.matrix import tiny_model

_BOUND_KEYS = {"ge", "gt", "le", "lt"}


def _field(config_class, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(config_class) if f.name == name)


def _is_int(annotation) -> bool:
    return annotation is int or int in typing.get_args(annotation)


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_every_numeric_option_declares_well_formed_bounds(name):
    config_class = PATCHES[name].config_class
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        keys = set(field.metadata) - {"help"}
        assert keys <= _BOUND_KEYS, f"{name}.{field.name}: unknown metadata {keys - _BOUND_KEYS}"
        for key in keys:
            assert isinstance(field.metadata[key], (int, float, Limit)), f"{name}.{field.name}.{key}"
        if _is_int(hints[field.name]):
            assert keys & {"ge", "gt"}, f"{name}.{field.name} is an integer option without a lower bound"


def test_bounds_text_names_numbers_and_limits():
    sliding = PATCHES["sliding_window"].config_class
    assert bounds_text(_field(sliding, "window")) == ">= 1, <= the model's max_position_embeddings"
    assert bounds_text(_field(PATCHES["routing_attention"].config_class, "ema_decay")) == ">= 0, < 1"
    assert bounds_text(_field(sliding, "bounded_cache")) == ""


def test_a_bound_of_the_model_is_checked_only_with_the_model():
    config = PATCHES["sliding_window"].config_class(window=10**9)
    check_bounds("sliding_window", config)  # no model yet: the position limit is unknown
    family = family_specs()["llama"]
    with pytest.raises(InvalidOptionError) as info:
        check_bounds("sliding_window", config, family, family.tiny_config())
    limit = family.tiny_config().max_position_embeddings
    assert info.value.option == "window"
    assert str(info.value).startswith(
        f"sliding_window: window=1000000000 is out of range: it must be >= 1 and <= the model's "
        f"max_position_embeddings ({limit}). window: keys per query"
    )


def test_a_bound_on_another_option_and_on_blocks():
    moba = PATCHES["moba"].config_class
    with pytest.raises(InvalidOptionError, match=r"key_conv=9 is out of range: it must be >= 0 and <= block_size \(8"):
        check_bounds("moba", moba(block_size=8, key_conv=9))
    family = family_specs()["llama"]
    positions = family.tiny_config().max_position_embeddings
    blocks = -(-positions // 8)
    expected = rf"top_k={blocks + 1} .* <= the blocks of block_size tokens .*\({blocks}\)"
    with pytest.raises(InvalidOptionError, match=expected):
        check_bounds("moba", moba(block_size=8, top_k=blocks + 1), family, family.tiny_config())
    check_bounds("moba", moba(block_size=8, top_k=blocks), family, family.tiny_config())


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_float_options_must_be_finite(value):
    config = PATCHES["moh"].config_class(balance_loss_weight=value)
    with pytest.raises(InvalidOptionError, match="balance_loss_weight=.* must be a finite number") as info:
        check_bounds("moh", config)
    assert info.value.option == "balance_loss_weight"


def test_unset_options_are_not_checked():
    check_bounds("moh", PATCHES["moh"].config_class(top_k=None, shared_heads=None))


@pytest.mark.parametrize(
    "method,options,option",
    [
        ("sliding_window", {"window": 0}, "window"),
        ("moh", {"top_k": 0}, "top_k"),
        ("moh", {"top_k": 5}, "top_k"),
        ("bam", {"num_experts": 1}, "num_experts"),
        ("routing_attention", {"ema_decay": 1.0}, "ema_decay"),
        ("moa", {"beta": 1.5}, "beta"),
        ("power_attention", {"block_size": 2, "window_blocks": 1, "sink_blocks": -1}, "sink_blocks"),
    ],
)
def test_patch_refuses_an_out_of_range_option_and_leaves_the_model_untouched(method, options, option):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidOptionError, match=f"{method}: {option}=.* is out of range") as info:
        hf_attn_zoo.patch(model, method, **options)
    assert info.value.option == option
    assert hf_attn_zoo.applied_patches(model) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("layers", [[], "every_3rd"])
def test_a_selection_of_no_layer_is_refused(layers):
    model = tiny_model("llama")  # two decoder layers
    ids = torch.randint(3, 128, (1, 6))
    expected = model(ids).logits
    with pytest.raises(InvalidOptionError, match=r"layers=.* selects none of the 2 decoder layers"):
        hf_attn_zoo.patch(model, "sliding_window", layers=layers, window=3)
    assert hf_attn_zoo.applied_patches(model) == []
    assert torch.equal(model(ids).logits, expected)


def test_methods_command_shows_the_bounds(capsys):
    from hf_attn_zoo.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "    window (int, >= 1, <= the model's max_position_embeddings, default 1024):" in out
    assert "top_k (int or None, >= 1, <= the model's query heads, default None)" in out


def test_bam_top_k_bound_uses_num_experts():
    bam = get_patch("bam")
    family = family_specs()["llama"]
    with pytest.raises(InvalidOptionError, match=r"top_k=4 is out of range: it must be >= 1 and <= num_experts \(3\)"):
        bam.configure({"num_experts": 3, "routing": "top_k", "top_k": 4}, family, family.tiny_config())
