"""The common grid: every registered method on every family (tiny random models)."""

from __future__ import annotations

import pytest
import torch

import hf_attn_zoo
from hf_attn_zoo.errors import InvalidInputError
from hf_attn_zoo.families import family_specs
from hf_attn_zoo.registry import PATCHES, get_patch
from tests.matrix import (
    ATOL_FP32,
    FAMILIES,
    METHOD_CASES,
    clone,
    decode_in_steps,
    randomize_new_parameters,
    supported,
    tiny_model,
)


# pairs a patch declares unsupported (`Patch.check`) are left out of the grid, not skipped
GRID = [pytest.param(m, f, id=f"{m}-{f}") for m in sorted(METHOD_CASES) for f in FAMILIES if supported(m, f)]
GRID_KV_CACHE = [p for p in GRID if PATCHES[p.values[0]].capabilities.kv_cache]
GRID_GENERATE = [p for p in GRID_KV_CACHE if PATCHES[p.values[0]].capabilities.generate]


def _ids(batch: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length))


def _patched(method: str, family: str, **options) -> tuple[torch.nn.Module, torch.nn.Module]:
    base = tiny_model(family)
    model = hf_attn_zoo.patch(clone(base), method, **{**METHOD_CASES[method], **options})
    randomize_new_parameters(model)
    return base, model


@pytest.mark.parametrize("method,family", GRID)
def test_forward_shape_and_finite(method, family):
    _, model = _patched(method, family)
    ids = _ids()
    logits = model(ids).logits
    assert logits.shape == (2, 10, model.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("method,family", GRID)
def test_neutral_setting_reproduces_the_original(method, family):
    base = tiny_model(family)
    neutral = get_patch(method).neutral_config(family_specs()[family], base.config)
    assert neutral is not None, f"{method} has no neutral setting"
    model = hf_attn_zoo.patch(clone(base), method, **neutral.to_dict())
    ids = _ids()
    torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=ATOL_FP32, rtol=0)


@pytest.mark.parametrize("method,family", GRID)
def test_unpatch_restores_bit_identical_outputs(method, family):
    base, model = _patched(method, family)
    ids = _ids()
    assert not torch.equal(model(ids).logits, base(ids).logits), "the patch should change the outputs"
    hf_attn_zoo.unpatch(model)
    assert torch.equal(model(ids).logits, base(ids).logits)
    assert model.state_dict().keys() == base.state_dict().keys()
    assert hf_attn_zoo.applied_patches(model) == []
    assert model.config._attn_implementation == base.config._attn_implementation


@pytest.mark.parametrize("method,family", GRID)
def test_left_padding_does_not_change_the_row(method, family):
    _, model = _patched(method, family)
    ids = _ids(1, 8)
    padded = torch.cat([torch.zeros(1, 3, dtype=ids.dtype), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], dim=1)
    alone = model(ids).logits
    with_pad = model(padded, attention_mask=mask).logits[:, 3:]
    torch.testing.assert_close(with_pad, alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method,family", GRID_KV_CACHE)
def test_incremental_decoding_equals_full_forward(method, family):
    _, model = _patched(method, family)
    ids = _ids(2, 12)
    with torch.no_grad():
        full = model(ids).logits
    torch.testing.assert_close(decode_in_steps(model, ids, prefill=7), full, atol=1e-4, rtol=1e-4)
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, 16)


@pytest.mark.parametrize("method,family", GRID_GENERATE)
def test_left_padded_batch_generation_equals_each_row_alone(method, family):
    _, model = _patched(method, family)
    rows = [_ids(1, 5), _ids(1, 9)]
    width = max(r.shape[1] for r in rows)
    batch = torch.cat([torch.nn.functional.pad(r, (width - r.shape[1], 0)) for r in rows])
    mask = torch.cat([torch.nn.functional.pad(torch.ones_like(r), (width - r.shape[1], 0)) for r in rows])
    options = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "pad_token_id": 0}  # no early EOS
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, **options)[:, width:]
        for row, ids in enumerate(rows):
            alone = model.generate(ids, attention_mask=torch.ones_like(ids), **options)[:, ids.shape[1] :]
            assert torch.equal(together[row : row + 1], alone), f"row {row} changed by the batch's left padding"


@pytest.mark.parametrize("method,family", GRID_GENERATE)
def test_beam_search_with_the_cache_equals_beam_search_without(method, family):
    """Beam search reorders the cache after every step: state a patch keeps per batch row (kept queries, cluster ids,
    secondary sinks, routing memory ...) must follow its beam, or the cached search picks other tokens than the
    uncached one, which recomputes every step from the tokens alone."""
    _, model = _patched(method, family)
    options = {"max_new_tokens": 5, "min_new_tokens": 5, "num_beams": 3, "do_sample": False, "pad_token_id": 0}
    ids = _ids(2, 7)
    with torch.no_grad():
        cached = model.generate(ids, **options)
        uncached = model.generate(ids, use_cache=False, **options)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("method,family", GRID_GENERATE)
def test_a_static_cache_decodes_as_the_dynamic_one_or_is_refused(method, family):
    """`cache_implementation="static"` (a pre-allocated buffer, the usual companion of torch.compile): the tokens of
    the default dynamic cache where the patch declares it can (`Capabilities.static_cache`), else one clear error
    before anything runs, never other tokens."""
    _, model = _patched(method, family)
    options = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    ids = _ids(2, 7)
    with torch.no_grad():
        dynamic = model.generate(ids, **options)
        if PATCHES[method].capabilities.static_cache:
            assert torch.equal(model.generate(ids, cache_implementation="static", **options), dynamic)
        else:
            with pytest.raises(InvalidInputError, match=f"the {method} patch decodes over a dynamic KV cache"):
                model.generate(ids, cache_implementation="static", **options)


@pytest.mark.parametrize("method,family", GRID)
def test_gradients_reach_new_parameters(method, family):
    _, model = _patched(method, family)
    model.train()
    ids = _ids()
    out = model(ids, labels=ids)
    out.loss.backward()
    params = hf_attn_zoo.new_parameters(model)
    if PATCHES[method].capabilities.new_params:
        assert params, "the patch declares new parameters but created none"
    for name, param in params.items():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"no gradient reached {name}"


@pytest.mark.parametrize("method,family", GRID)
def test_activation_checkpointing_gives_the_same_gradients(method, family):
    """Activation checkpointing (how large models are tuned) recomputes each layer in the backward pass, after the
    model call returned: what a patch reads there (the batch's padding, its routing state) must be what the forward
    read, or the gradients differ from those of the plain backward."""
    _, model = _patched(method, family)
    model.train()
    ids = _ids(2, 10)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: the handlers read it from the model call
    state = {k: v.clone() for k, v in model.state_dict().items()}  # buffers a training forward updates (EMA)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.load_state_dict(state)
        model.zero_grad()
        torch.manual_seed(0)
        model(ids, attention_mask=mask, labels=ids, use_cache=False).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, plain in grads[0].items():
        torch.testing.assert_close(grads[1][name], plain, atol=1e-5 * plain.abs().max().item(), rtol=0, msg=name)


@pytest.mark.parametrize("method,family", GRID)
def test_lora_on_top_of_the_patch(method, family):
    from peft import LoraConfig, get_peft_model

    _, model = _patched(method, family)
    names = hf_attn_zoo.new_module_names(model)
    mla = family_specs()[family].attention.kind == "mla"  # DeepSeek-V3: low-rank q / kv projections
    targets = ["q_b_proj", "kv_b_proj"] if mla else ["q_proj", "v_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=targets, modules_to_save=names or None))
    peft_model.train()
    ids = _ids()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    trained = [n for n, p in peft_model.named_parameters() if p.requires_grad and p.grad is not None]
    assert any("lora_" in n for n in trained)
    for leaf in names:
        assert any(f"{leaf}." in n and "modules_to_save" in n for n in trained), leaf


@pytest.mark.parametrize("method,family", GRID)
def test_save_and_reload_reproduce_the_logits(method, family, tmp_path):
    _, model = _patched(method, family)
    ids = _ids()
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    reloaded = hf_attn_zoo.from_pretrained(tmp_path).eval()
    assert hf_attn_zoo.applied_patches(reloaded) == hf_attn_zoo.applied_patches(model)
    assert torch.equal(reloaded(ids).logits, expected)
