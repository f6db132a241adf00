"""Consistency of the registry: every method has its tests, a recipe, docs and well-formed options."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import hf_attn_zoo
from hf_attn_zoo.errors import UnknownMethodError
from hf_attn_zoo.registry import PATCHES, Patch, register_patch
from tests.matrix import METHOD_CASES

ROOT = Path(__file__).resolve().parents[2]


def test_every_method_is_in_the_test_matrix_and_has_its_files():
    assert sorted(PATCHES) == sorted(METHOD_CASES)
    for name in PATCHES:
        assert (ROOT / "hf_attn_zoo" / "patches" / f"{name}.py").exists()
        assert (ROOT / "tests" / "patches" / f"test_{name}.py").exists()
        assert list((ROOT / "hf_attn_zoo" / "recipes" / name).glob("*.yaml")), f"no recipe for {name}"


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_method_documents_itself(name):
    cls = PATCHES[name]
    module = __import__(cls.__module__, fromlist=["_"])
    assert "arXiv:" in module.__doc__, "cite the paper as 'Title (arXiv:XXXX.XXXXX)'"
    for field in dataclasses.fields(cls.config_class):
        assert field.metadata.get("help"), f"{name}.{field.name} has no help text"


def test_methods_lists_options_with_help():
    info = {m.name: m for m in hf_attn_zoo.methods()}
    moh = info["moh"]
    assert "Mixture-of-Head" in moh.summary
    options = {o.name: o for o in moh.options}
    assert options["router"].type == "one of 'learned', 'qnorm', 'onorm'" and options["router"].default == "learned"
    assert options["balance_loss_weight"].default == 0.01


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(UnknownMethodError, match="unknown method 'mohh'; available: .*moh"):
        hf_attn_zoo.patch(object(), "mohh")


def test_register_patch_rejects_bad_names():
    class Bad(Patch):
        name = "Bad-Name"

    with pytest.raises(ValueError, match="lower snake case"):
        register_patch(Bad)
