"""MoBA (arXiv:2502.13189) and FlashMoBA's key convolution (arXiv:2511.11571) as a patch (its kernels against the
naive definition: tests/kernels/test_moba.py): the identity key conv, decode modes, options and the recipe."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import hf_attn_zoo
from hf_attn_zoo.errors import InvalidOptionError
from hf_attn_zoo.tuning.recipe import load_recipe
from tests.matrix import clone, randomize_new_parameters, tiny_model

GRID_OPTIONS = {"block_size": 3, "top_k": 2, "key_conv": 3, "decode": "sparse"}


def test_identity_key_conv_leaves_the_patched_model_unchanged():
    base = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 12))
    plain = hf_attn_zoo.patch(clone(base), "moba", block_size=3, top_k=2)(ids).logits
    with_conv = hf_attn_zoo.patch(clone(base), "moba", block_size=3, top_k=2, key_conv=3)
    assert torch.equal(with_conv(ids).logits, plain)
    assert not torch.equal(plain, base(ids).logits)


def test_inputs_within_top_k_blocks_run_the_models_own_attention():
    base = tiny_model("qwen3")
    ids = torch.randint(3, 128, (2, 12))
    model = hf_attn_zoo.patch(clone(base), "moba", block_size=4, top_k=3)
    assert torch.equal(model(ids).logits, base(ids).logits)


def _decode(model, ids, mask, prefix):
    cache = DynamicCache(config=model.config)
    steps = [model(ids[:, :prefix], attention_mask=mask[:, :prefix], cache=cache, use_cache=True).logits]
    for t in range(prefix, ids.shape[1]):
        steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True).logits)
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_sparse_decoding_with_left_padding_equals_the_full_forward(family):
    model = hf_attn_zoo.patch(clone(tiny_model(family)), "moba", **GRID_OPTIONS)
    randomize_new_parameters(model)
    ids = torch.randint(3, 128, (2, 14))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        steps = _decode(model, ids, mask, 8)
    torch.testing.assert_close(steps[0], full[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(steps[1, 3:], full[1, 3:], atol=1e-4, rtol=1e-4)


def test_dense_decoding_is_full_attention_over_the_cache():
    base = tiny_model("llama")
    model = hf_attn_zoo.patch(clone(base), "moba", block_size=3, top_k=2, decode="dense")
    ids = torch.randint(3, 128, (2, 14))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        steps, dense_steps = _decode(model, ids, mask, 8), _decode(base, ids, mask, 8)
        full = model(ids).logits
    # the prefill is MoBA, every later step attends the whole cache (the paper's evaluation setting)
    torch.testing.assert_close(steps[:, :8], full[:, :8], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(steps[:, 8:], full[:, 8:], atol=1e-3)
    assert not torch.allclose(dense_steps[:, 8:], steps[:, 8:], atol=1e-3)  # the prefill's cache differs


@pytest.mark.parametrize(
    "options, words",
    [
        ({"block_size": 0}, "block_size=0"),
        ({"block_size": 257}, "block_size=257"),
        ({"block_size": 64, "top_k": 0}, "top_k=0"),
        (
            {"block_size": 64, "top_k": 5},
            r"top_k=5 is out of range: it must be >= 1 and <= the blocks of block_size .* \(4\)",
        ),
        ({"block_size": 8, "key_conv": -1}, "key_conv=-1"),
        ({"block_size": 8, "key_conv": 9}, "key_conv=9"),
        ({"decode": "never"}, "decode='never'"),
    ],
)
def test_bad_options_give_one_clear_error_and_leave_the_model_untouched(options, words):
    base = tiny_model("llama")
    model = clone(base)
    with pytest.raises(InvalidOptionError, match=words):
        hf_attn_zoo.patch(model, "moba", **options)
    assert hf_attn_zoo.applied_patches(model) == []
    assert model.config._attn_implementation == base.config._attn_implementation
    assert model.state_dict().keys() == base.state_dict().keys()


def test_the_quick_recipe_validates():
    recipe = load_recipe("moba/smollm2_quick")
    (spec,) = recipe.patches
    assert spec.method == "moba" and spec.layers == list(range(27))
    assert spec.options["key_conv"] == 3
