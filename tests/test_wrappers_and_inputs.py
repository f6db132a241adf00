"""Issue 13: patch/unpatch through PEFT, DDP-style `.module` and `torch.compile` wrappers; inputs a patched model
cannot take (no tokens, more positions than the model has) and all-padding rows, on every method of the grid."""

from __future__ import annotations

import pytest
import torch

import hf_attn_zoo
from hf_attn_zoo.errors import InvalidInputError, InvalidOptionError, UnsupportedArchitectureError
from hf_attn_zoo.families import family_specs
from hf_attn_zoo.registry import get_patch
from tests.matrix import FAMILIES, METHOD_CASES, clone, randomize_new_parameters, tiny_model


def _first_family(method: str) -> str:
    for family in FAMILIES:
        spec = family_specs()[family]
        if get_patch(method).refusal(spec, spec.tiny_config()) is None:
            return family
    raise AssertionError(f"{method} supports no family")


# one family per method keeps these fast; the full method x family grid is tests/common/test_patch_common.py
METHODS = [pytest.param(m, _first_family(m), id=m) for m in sorted(METHOD_CASES)]


def _patched(method: str, family: str) -> torch.nn.Module:
    model = hf_attn_zoo.patch(tiny_model(family), method, **METHOD_CASES[method])
    randomize_new_parameters(model)
    return model


def _ids(batch: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length))


def test_patch_and_unpatch_a_peft_model_return_the_peft_model():
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama")
    wrapped = get_peft_model(clone(base), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ids = _ids()
    before = wrapped(ids).logits
    assert hf_attn_zoo.patch(wrapped, "moh", router="learned") is wrapped
    randomize_new_parameters(wrapped)
    assert [r["method"] for r in hf_attn_zoo.applied_patches(wrapped)] == ["moh"]
    assert hf_attn_zoo.applied_patches(wrapped.get_base_model()) == hf_attn_zoo.applied_patches(wrapped)
    assert not torch.equal(wrapped(ids).logits, before)
    assert any(name.endswith("head_router.proj.weight") for name in hf_attn_zoo.new_parameters(wrapped))
    assert hf_attn_zoo.unpatch(wrapped) is wrapped
    assert torch.equal(wrapped(ids).logits, before)


def test_bam_refuses_projections_lora_already_wraps():
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(UnsupportedArchitectureError, match="Patch the model before wrapping it \\(PEFT\\)"):
        hf_attn_zoo.patch(wrapped, "bam", num_experts=2)
    assert hf_attn_zoo.applied_patches(wrapped) == []


def test_patch_a_ddp_style_module_wrapper():
    base = tiny_model("llama")
    wrapped = torch.nn.DataParallel(clone(base))  # on CPU it just calls .module, like DDP's forward
    assert hf_attn_zoo.patch(wrapped, "sliding_window", window=3, sinks=1) is wrapped
    assert hf_attn_zoo.applied_patches(wrapped.module)[0]["method"] == "sliding_window"
    ids = _ids(1, 12)
    reference = hf_attn_zoo.patch(clone(base), "sliding_window", window=3, sinks=1)
    assert torch.equal(wrapped(ids).logits, reference(ids).logits)
    assert hf_attn_zoo.unpatch(wrapped) is wrapped
    assert torch.equal(wrapped(ids).logits, base(ids).logits)


def test_patch_a_compiled_model_patches_the_original_module():
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="eager")
    assert hf_attn_zoo.patch(compiled, "moh", router="learned") is compiled
    assert "_zoo_handles" in model.__dict__ and "_zoo_handles" not in compiled.__dict__
    assert hf_attn_zoo.new_module_names(compiled) == ["head_router"]
    assert hf_attn_zoo.unpatch(compiled) is compiled
    assert hf_attn_zoo.applied_patches(model) == [] and not model.__dict__.get("_zoo_handles")


@pytest.mark.parametrize("method,family", METHODS)
def test_empty_input_is_one_clear_error(method, family):
    model = _patched(method, family)
    with pytest.raises(InvalidInputError, match=r"input_ids of shape \[2, 0\] holds no tokens"):
        model(torch.zeros(2, 0, dtype=torch.long))


@pytest.mark.parametrize("method,family", METHODS)
def test_all_padding_row_is_finite_and_leaves_the_other_rows(method, family):
    model = _patched(method, family)
    ids = _ids(3, 8)
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1] = 0
    out = model(ids, attention_mask=mask).logits
    assert torch.isfinite(out).all()
    others = model(ids[[0, 2]], attention_mask=mask[[0, 2]]).logits
    torch.testing.assert_close(out[[0, 2]], others, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,family", METHODS)
def test_input_longer_than_the_model_is_one_clear_error(method, family):
    model = _patched(method, family)
    limit = model.config.max_position_embeddings
    with pytest.raises(
        InvalidInputError,
        match=f"a sequence of {limit + 1} positions is longer than this model "
        f"supports \\(max_position_embeddings={limit}\\)",
    ):
        model(_ids(1, limit + 1))
    assert issubclass(InvalidInputError, InvalidOptionError)  # what the sparse kernels raise for the same input


def test_unpatch_removes_the_input_check():
    model = tiny_model("llama")
    hf_attn_zoo.unpatch(hf_attn_zoo.patch(model, "moh", router="learned"))
    assert "_zoo_input_check_hook" not in model.__dict__
    model(_ids(1, model.config.max_position_embeddings + 1))  # the plain model's own behaviour again
