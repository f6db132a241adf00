"""MLA conversion: the latent cache, absorbed decoding, pair selection, calibration, refusals and the DeepSeek-V3
export (the common grid covers the neutral setting, unpatch, decoding, padding, gradients, LoRA and save/reload)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import hf_attn_zoo
from hf_attn_zoo.errors import InvalidOptionError, UnsupportedArchitectureError
from hf_attn_zoo.kernels.kv_cache import kv_cache_bytes
from hf_attn_zoo.mla_export import export_deepseek_v3
from hf_attn_zoo.patches.mla import calibrate, latent_layers
from tests.matrix import FAMILIES, clone, tiny_model

MLA_FAMILIES = [
    f
    for f in FAMILIES
    if hf_attn_zoo.patches.mla.MLAPatch().refusal(hf_attn_zoo.families.family_specs()[f], tiny_model(f).config) is None
]


def _decode_logits(model, ids, mask, steps: int = 3) -> list[torch.Tensor]:
    """Logits of a prefill and of `steps` greedy decode steps with a DynamicCache (left-padded rows)."""
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
    logits = [out.logits[:, -1]]
    for _ in range(steps):
        token = logits[-1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        out = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return logits


@pytest.mark.parametrize("family", ["llama", "helium", "glm4", "mistral"])
def test_absorbed_decoding_equals_the_expanded_form(family):
    base = tiny_model(family)
    ids = torch.randint(3, 100, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    results = {}
    for absorb in ("always", "never"):
        model = hf_attn_zoo.patch(clone(base), "mla", rank=6, rope_pairs=2, absorb=absorb)
        results[absorb] = _decode_logits(model, ids, mask)
    for absorbed, expanded in zip(results["always"], results["never"], strict=True):
        torch.testing.assert_close(absorbed, expanded, atol=1e-4, rtol=1e-4)


def test_the_cache_holds_only_the_latent_and_the_rope_key():
    base = tiny_model("llama")  # 2 KV heads of 16 channels
    model = hf_attn_zoo.patch(clone(base), "mla", rank=6, rope_pairs=2)
    ids = torch.randint(3, 100, (1, 9))
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, cache=cache, use_cache=True)
    layer = cache.layers[0]
    assert layer.keys.shape == (1, 1, 9, 6) and layer.values.shape == (1, 1, 9, 2 * 2 * 2)
    dense = DynamicCache(config=base.config)
    base(input_ids=ids, cache=dense, use_cache=True)
    assert kv_cache_bytes(cache) / kv_cache_bytes(dense) == pytest.approx((6 + 8) / (2 * 2 * 16))


def test_selection_rules_pick_the_documented_channels():
    base = tiny_model("llama")  # rotate_half: pair i is channels i and i + 8
    high = hf_attn_zoo.patch(clone(base), "mla", rope_pairs=2, rope_selection="high")
    low = hf_attn_zoo.patch(clone(base), "mla", rope_pairs=2, rope_selection="low")
    first = next(iter(latent_layers(high).values()))
    assert first.rope_channels.tolist() == [[0, 1, 8, 9]] * 2
    assert next(iter(latent_layers(low).values())).rope_channels.tolist() == [[6, 7, 14, 15]] * 2
    interleaved = hf_attn_zoo.patch(clone(tiny_model("helium")), "mla", rope_pairs=2, rope_selection="high")
    assert next(iter(latent_layers(interleaved).values())).rope_channels.tolist() == [[0, 1, 2, 3]] * 2
    # norm: the pairs whose query and key rows are largest; make pair 5 of every head dominate
    boosted = clone(base)
    attention = boosted.model.layers[0].self_attn
    with torch.no_grad():
        for proj in (attention.q_proj, attention.k_proj):
            proj.weight.view(-1, 16, proj.in_features)[:, [5, 13]] *= 50
    by_norm = hf_attn_zoo.patch(boosted, "mla", rope_pairs=1, rope_selection="norm")
    assert by_norm.model.layers[0].self_attn.mla.rope_channels.tolist() == [[5, 13]] * 2


def test_calibration_fits_the_keys_and_values_better_than_the_weights_alone():
    base = tiny_model("llama")
    batches = [{"input_ids": torch.randint(3, 100, (2, 16))} for _ in range(3)]
    inputs = []
    hook = base.model.layers[1].self_attn.register_forward_pre_hook(
        lambda m, a, k: inputs.append(k["hidden_states"]), with_kwargs=True
    )
    with torch.no_grad():
        for batch in batches:
            base(**batch)
    hook.remove()
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs])

    def error(model) -> float:
        attention = model.model.layers[1].self_attn
        latent_kv = attention.mla
        with torch.no_grad():
            up = latent_kv.kv_up(latent_kv.kv_down(x)[:, : latent_kv.rank]).view(len(x), 2, -1)
            keys = attention.k_proj(x).view(len(x), 2, 16).gather(-1, latent_kv.nope_channels.expand(len(x), -1, -1))
            values = attention.v_proj(x).view(len(x), 2, 16)
            return (up - torch.cat([keys, values], -1)).pow(2).sum().item()

    weights_only = hf_attn_zoo.patch(clone(base), "mla", rank=5, rope_pairs=2, rope_selection="high", balance=False)
    calibrated = hf_attn_zoo.patch(clone(base), "mla", rank=5, rope_pairs=2, rope_selection="high", balance=False)
    assert calibrate(calibrated, batches) == {"tokens": 96, "layers": 2}
    assert error(calibrated) < 0.95 * error(weights_only)


def test_bad_options_are_refused_and_leave_the_model_untouched():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidOptionError, match="rope_pairs=9, but a head has 8"):
        hf_attn_zoo.patch(model, "mla", rope_pairs=9)
    with pytest.raises(InvalidOptionError, match="rank=61 is more than the 60 rows"):
        hf_attn_zoo.patch(model, "mla", rope_pairs=1, rank=61)
    with pytest.raises(UnsupportedArchitectureError, match="q/k norms"):
        hf_attn_zoo.patch(tiny_model("qwen3"), "mla")
    assert hf_attn_zoo.applied_patches(model) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(InvalidOptionError, match="no MLA layer"):
        calibrate(model, [{"input_ids": torch.ones(1, 4, dtype=torch.long)}])


EXPORTABLE = {"granite", "helium", "internlm3", "llama"}


@pytest.mark.parametrize("family", MLA_FAMILIES)
def test_deepseek_v3_export_loads_in_plain_transformers_with_the_same_logits(family, tmp_path):
    model = hf_attn_zoo.patch(tiny_model(family), "mla", rank=8, rope_pairs=2, rope_selection="uniform")
    out = tmp_path / "deepseek"
    if family not in EXPORTABLE:
        with pytest.raises(UnsupportedArchitectureError, match="export_deepseek_v3"):
            export_deepseek_v3(model, out)
        assert not out.exists()
        return
    export_deepseek_v3(model, out)
    stock = AutoModelForCausalLM.from_pretrained(out).eval()  # no hf_attn_zoo involved: a stock class
    assert stock.config.model_type == "deepseek_v3" and "hf_attn_zoo" not in type(stock).__module__
    ids = torch.randint(3, 100, (2, 11))
    torch.testing.assert_close(stock(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    prompt = ids[:1, :5]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(stock.generate(prompt, **kwargs), model.generate(prompt, **kwargs))
    layer = stock.model.layers[0].self_attn
    assert layer.kv_a_proj_with_mqa.out_features == 8 + 2 * 2 * 2  # latent + 2 pairs of each of 2 KV heads


def test_export_refuses_a_partly_converted_model(tmp_path):
    model = hf_attn_zoo.patch(tiny_model("llama"), "mla", layers=[0], rank=8, rope_pairs=2)
    with pytest.raises(UnsupportedArchitectureError, match="layer 1 is not converted"):
        export_deepseek_v3(model, tmp_path / "out")
    norm = hf_attn_zoo.patch(tiny_model("llama"), "mla", rank=8, rope_pairs=2, rope_selection="norm")
    layers = list(latent_layers(norm).values())
    if not torch.equal(layers[0].rope_channels, layers[1].rope_channels):
        with pytest.raises(UnsupportedArchitectureError, match="different RoPE frequency pairs"):
            export_deepseek_v3(norm, tmp_path / "norm")
