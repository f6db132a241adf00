"""The linearizer (LoLCATs-style hybrid, any feature map) as a patch (its kernels: tests/kernels): the decode state,
RoPE on the features, local layers, attention transfer (stage 1), bad input. The recipes: tests/tuning."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import hf_attn_zoo
from hf_attn_zoo.errors import InvalidOptionError, UnsupportedArchitectureError
from hf_attn_zoo.kernels.linear_cache import LinearStateLayer
from hf_attn_zoo.patches.linearize import LinearAttentionTransfer, attention_transfer, linear_attention_layers
from tests.matrix import clone, randomize_new_parameters, tiny_model


def _linearized(family: str = "llama", **options) -> torch.nn.Module:
    model = hf_attn_zoo.patch(tiny_model(family), "linearize", **{"window": 3, "chunk": 4, **options})
    randomize_new_parameters(model)
    return model


def _decode(model, ids: torch.Tensor, prefill: int) -> tuple[torch.Tensor, DynamicCache, list[int]]:
    """Prefill `prefill` tokens, then one token at a time; the logits and the cache bytes after each step."""
    cache = DynamicCache(config=model.config)
    sizes = []
    with torch.no_grad():
        logits = [model(ids[:, :prefill], cache=cache, use_cache=True).logits]
        for t in range(prefill, ids.shape[1]):
            logits.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
            sizes.append(sum(layer.nbytes for layer in cache.layers if isinstance(layer, LinearStateLayer)))
    return torch.cat(logits, dim=1), cache, sizes


@pytest.mark.parametrize("feature_map", ["nala", "hedgehog", "elu", "relu"])
def test_decoding_memory_stops_growing_and_equals_the_full_forward(feature_map):
    model = _linearized(feature_map=feature_map)
    ids = torch.randint(3, 128, (2, 40))
    with torch.no_grad():
        full = model(ids).logits
    steps, cache, sizes = _decode(model, ids, 6)
    torch.testing.assert_close(steps, full, atol=1e-4, rtol=1e-4)
    assert all(isinstance(layer, LinearStateLayer) for layer in cache.layers)
    assert len(set(sizes)) == 1, f"the cache grew while decoding: {sizes[0]} -> {sizes[-1]} bytes"
    # the window's last window - 1 raw keys, no more
    assert all(layer.keys.shape[2] == 2 for layer in cache.layers)
    assert cache.get_seq_length() == 40


def test_a_layer_with_its_own_sliding_window_stays_local():
    """Mistral's tiny layers attend 6 keys: the softmax window takes 3, the linear part the other 3, nothing older."""
    model = _linearized("mistral")
    ids = torch.randint(3, 128, (1, 20))
    with torch.no_grad():
        out = model(ids).logits
        changed = ids.clone()
        changed[:, :8] = torch.randint(3, 128, (1, 8))  # 12 or more positions before the last query: unseen
        # two layers of 6 keys each: the last position reaches back at most 10 positions
        torch.testing.assert_close(model(changed).logits[:, -1], out[:, -1], atol=1e-5, rtol=1e-5)
    _, cache, _ = _decode(model, ids, 4)
    assert all(layer.keys.shape[2] == 5 and layer.state is None for layer in cache.layers)


def test_rope_on_the_features_depends_on_relative_positions_only():
    """NaLaFormer's placement of RoPE (features of the un-rotated q/k, rotated numerator, un-rotated normaliser)
    makes every score relative, like softmax attention; LoLCATs' (map the rotated q/k) does not."""
    ids = torch.randint(3, 128, (1, 12))
    shifted = torch.arange(12)[None] + 17
    for rope, invariant in (("features", True), ("inputs", False)):
        model = _linearized(feature_map="hedgehog", rope=rope)
        with torch.no_grad():
            same = torch.allclose(model(ids).logits, model(ids, position_ids=shifted).logits, atol=1e-4, rtol=1e-4)
        assert same is invariant, rope


def test_some_layers_stay_softmax():
    base = tiny_model("llama")
    model = hf_attn_zoo.patch(clone(base), "linearize", layers=[1], window=2)
    assert list(linear_attention_layers(model)) == ["model.layers.1.self_attn.linear_maps"]
    ids = torch.randint(3, 128, (1, 10))
    hidden = {}
    for name, m in (("base", base), ("patched", model)):
        m.model.layers[0].register_forward_hook(lambda mod, args, out, name=name: hidden.__setitem__(name, out))
        m(ids)
    torch.testing.assert_close(hidden["patched"], hidden["base"], atol=0, rtol=0)


def test_projections_start_as_the_identity_and_the_window_weight_at_its_init():
    model = hf_attn_zoo.patch(tiny_model("llama"), "linearize", window=4, window_init=0.25)
    maps = next(iter(linear_attention_layers(model).values()))
    heads, dim, width = maps.q_map.shape
    assert width == dim and torch.equal(maps.q_map, torch.eye(dim).expand(heads, -1, -1))
    torch.testing.assert_close(maps.window_weight, torch.full((heads,), 0.25))
    pure = hf_attn_zoo.patch(tiny_model("llama"), "linearize", window=0, learned=False)
    assert hf_attn_zoo.new_parameters(pure) == {}


def test_attention_transfer_passes_the_softmax_output_on_and_trains_only_the_maps():
    base = tiny_model("llama")
    model = hf_attn_zoo.patch(clone(base), "linearize", window=2, chunk=4)
    ids = torch.randint(3, 128, (2, 12))
    for p in model.parameters():
        p.requires_grad_(False)
    for p in hf_attn_zoo.new_parameters(model).values():
        p.requires_grad_(True)
    model.train()
    with attention_transfer(model, weight=10.0):
        out = model(ids, labels=ids)
        # every layer hands on its softmax output: the logits are the original model's
        torch.testing.assert_close(out.logits, base(ids).logits, atol=1e-5, rtol=1e-5)
        assert out.aux_loss is not None and out.aux_loss > 0
        out.loss.backward()
    grads = {name: p.grad for name, p in hf_attn_zoo.new_parameters(model).items()}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    after = model(ids, labels=ids)
    assert getattr(after, "aux_loss", None) is None  # back to plain linear attention
    assert not torch.allclose(after.logits, base(ids).logits, atol=1e-3)
    with pytest.raises(InvalidOptionError, match="no linearized layer"):
        with attention_transfer(tiny_model("llama")):
            pass


def test_transfer_mse_excludes_padding_rows():
    model = _linearized()
    model.train()
    ids = torch.randint(3, 128, (1, 8))
    padded = torch.cat([torch.zeros(1, 3, dtype=ids.dtype), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], dim=1)
    with attention_transfer(model, weight=1.0):
        alone = model(ids).aux_loss
        with_pad = model(padded, attention_mask=mask).aux_loss
    torch.testing.assert_close(with_pad, alone, atol=1e-5, rtol=1e-4)


def test_transfer_callback_switches_on_for_the_run_only():
    model = _linearized()
    callback = LinearAttentionTransfer(model, weight=5.0)
    maps = list(linear_attention_layers(model).values())
    callback.on_train_begin(None, None, None)
    assert all(m.transfer_weight == 5.0 for m in maps)
    callback.on_train_end(None, None, None)
    assert all(m.transfer_weight is None for m in maps)
    with pytest.raises(InvalidOptionError, match="weight=0"):
        LinearAttentionTransfer(model, weight=0)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"feature_map": "cosine"}, "unknown feature_map 'cosine'.*hedgehog.*nala"),
        ({"window": 257}, "max_position_embeddings"),
        ({"window": -1}, "window=-1"),
        ({"feature_dim": 4}, "feature_dim must equal the head dim"),
        ({"feature_dim": 4, "learned": False, "rope": "inputs"}, "needs learned=True"),
        ({"window_init": 1.0}, "window_init=1.0"),
        ({"rope": "both"}, "rope"),
        ({"backend": "fla"}, "needs flash-linear-attention"),
    ],
)
def test_bad_options_leave_the_model_untouched(options, match):
    base = tiny_model("llama")
    model = clone(base)
    with pytest.raises(InvalidOptionError, match=match):
        hf_attn_zoo.patch(model, "linearize", **options)
    ids = torch.randint(3, 128, (1, 8))
    assert torch.equal(model(ids).logits, base(ids).logits)
    assert hf_attn_zoo.applied_patches(model) == []


def test_unsupported_families_and_empty_selections_are_refused():
    with pytest.raises(UnsupportedArchitectureError, match="rotates only part of each key"):
        hf_attn_zoo.patch(tiny_model("deepseek_v3"), "linearize")
    with pytest.raises(InvalidOptionError, match="selects none of the 2 decoder layers"):
        hf_attn_zoo.patch(tiny_model("llama"), "linearize", layers=[])


def test_a_wider_feature_projection_with_rope_on_the_inputs():
    model = _linearized(feature_dim=24, rope="inputs")
    maps = next(iter(linear_attention_layers(model).values()))
    assert maps.q_map.shape[-1] == 24
    ids = torch.randint(3, 128, (1, 14))
    with torch.no_grad():
        full = model(ids).logits
    steps, _, _ = _decode(model, ids, 5)
    torch.testing.assert_close(steps, full, atol=1e-4, rtol=1e-4)


def test_bfloat16_runs_and_stays_close_to_float32():
    model = _linearized(feature_map="nala")
    ids = torch.randint(3, 128, (1, 16))
    with torch.no_grad():
        expected = model(ids).logits
        low = model.to(torch.bfloat16)(ids).logits.float()
    assert torch.isfinite(low).all()
    assert (low - expected).abs().max() < 0.1 * expected.abs().max()


def test_attention_transfer_reaches_the_maps_peft_trains():
    from peft import LoraConfig, get_peft_model

    model = _linearized()
    names = hf_attn_zoo.new_module_names(model)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=names))
    peft_model.train()
    ids = torch.randint(3, 128, (1, 10))
    with attention_transfer(peft_model, weight=1.0):
        out = peft_model(input_ids=ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss > 0
    out.loss.backward()
    trained = [n for n, p in peft_model.named_parameters() if p.grad is not None and "modules_to_save" in n]
    assert trained and all("linear_maps" in n for n in trained)


def test_a_plan_without_any_linear_part_is_refused():
    """Mistral's tiny layers attend 6 keys each: a softmax window of 6 or more leaves nothing linear anywhere."""
    base = tiny_model("mistral")
    model = clone(base)
    with pytest.raises(InvalidOptionError, match=r"no selected layer has a linear part.*\[6\].*window=6"):
        hf_attn_zoo.patch(model, "linearize", window=6)
    assert hf_attn_zoo.applied_patches(model) == []
    hf_attn_zoo.patch(model, "linearize", window=5)  # one linear key per query: accepted
