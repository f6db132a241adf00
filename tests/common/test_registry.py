"""Consistency of the registry: every method has its tests, a recipe, docs and well-formed options."""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path

import pytest

import hf_attn_zoo
from hf_attn_zoo.decoding import SCMoEConfig
from hf_attn_zoo.decoding.registry import DECODING_METHODS, DecodingMethod, register_decoding
from hf_attn_zoo.errors import UnknownMethodError
from hf_attn_zoo.registry import PATCHES, Patch, patch_paper, register_patch
from hf_attn_zoo.support import papers_markdown
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
    # the first paragraph of the module docstring is what the README's papers table and model cards show
    assert "arXiv:" in patch_paper(cls), "open the module docstring citing the paper as 'Title (arXiv:XXXX.XXXXX)'"
    assert patch_paper(cls).endswith("."), "end the paper's paragraph with a full stop"
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


def test_methods_lists_the_decoding_methods_beside_the_patches():
    infos = hf_attn_zoo.methods()
    assert [m.name for m in infos if m.kind == "patch"] == sorted(PATCHES)
    assert [m.name for m in infos if m.kind == "decoding"] == sorted(DECODING_METHODS)
    assert len(infos) == len(PATCHES) + len(DECODING_METHODS) and set(DECODING_METHODS).isdisjoint(PATCHES)
    scmoe = {m.name: m for m in infos}["scmoe"]
    assert scmoe.kind == "decoding" and scmoe.training_free and "arXiv:2405.14507" in scmoe.summary
    options = {o.name: o for o in scmoe.options}
    assert list(options) == [f.name for f in dataclasses.fields(SCMoEConfig)]
    assert all(o.help for o in scmoe.options)
    assert (options["alpha"].type, options["alpha"].default, options["alpha"].bounds) == ("float", 0.1, "> 0, <= 1")
    assert (options["beta"].default, options["beta"].bounds) == (0.5, ">= 0")
    assert options["weak"].type == "one of 'rank', 'top1', 'top_m'" and options["weak"].default == "rank"
    assert (options["weak_rank"].default, options["m"].default, options["ban_eos"].default) == (2, None, False)


def test_the_papers_table_cites_every_method_and_says_what_it_replaces():
    table = papers_markdown(hf_attn_zoo.methods()).splitlines()
    rows = {line.split(" | ")[0].strip("| `"): line for line in table[2:]}
    assert list(rows) == [*sorted(PATCHES), *sorted(DECODING_METHODS)]
    assert "[arXiv:2410.11842](https://arxiv.org/abs/2410.11842)" in rows["moh"]
    assert rows["moh"].endswith("| attention function |")
    assert rows["bam"].endswith("| attention module + attention function |")
    assert rows["mote"].endswith("| MoE router |")
    assert "[arXiv:2405.14507](https://arxiv.org/abs/2405.14507)" in rows["scmoe"]
    assert rows["scmoe"].endswith("| decoding (the model is unchanged) |")


def test_a_patch_from_a_module_without_a_docstring_has_no_paper(monkeypatch):
    monkeypatch.setitem(sys.modules, "my_plugin", types.ModuleType("my_plugin"))
    undocumented = type("Undocumented", (PATCHES["moh"],), {"__module__": "my_plugin"})
    assert patch_paper(undocumented) == ""


def test_a_decoding_method_is_not_a_patch():
    with pytest.raises(UnknownMethodError, match="'scmoe' is a decoding method, not a patch.*scmoe_generate"):
        hf_attn_zoo.patch(object(), "scmoe")


def test_register_decoding_rejects_bad_entries():
    scmoe = DECODING_METHODS["scmoe"]
    assert register_decoding(scmoe) is scmoe  # the same entry again is a no-op
    with pytest.raises(ValueError, match="lower snake case"):
        register_decoding(DecodingMethod("Bad-Name", "x", SCMoEConfig, "x"))
    with pytest.raises(ValueError, match="already the name of a patch"):
        register_decoding(DecodingMethod("moh", "x", SCMoEConfig, "x"))
    with pytest.raises(ValueError, match="already registered"):
        register_decoding(DecodingMethod("scmoe", "another", SCMoEConfig, "x"))
    with pytest.raises(ValueError, match="must be a dataclass"):
        register_decoding(DecodingMethod("not_a_dataclass", "x", dict, "x"))
    assert set(DECODING_METHODS) == {"scmoe"}
