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


def test_a_softcapped_attention_is_never_absorbed(monkeypatch):
    """Gemma 2's logit softcap is applied by some attention interfaces (eager) and not others (SDPA): the layer
    always goes through the model's own interface, so decoding equals the full forward whichever it is."""
    import hf_attn_zoo.patches.mla as mla

    monkeypatch.setattr(mla, "_absorbed", lambda *a, **k: pytest.fail("a softcapped layer was absorbed"))
    model = hf_attn_zoo.patch(tiny_model("gemma2"), "mla", rank=6, rope_pairs=2, absorb="always")
    ids = torch.randint(3, 100, (1, 6))
    model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)


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


def _slot_pairs(model, layer: int = 0) -> list[list[int]]:
    return model.model.layers[layer].self_attn.mla.slot_pairs.tolist()


def test_selection_rules_pick_the_documented_pairs():
    base = tiny_model("llama")  # rotate_half: pair i is channels i and i + 8; 2 KV heads keep 2 pairs each
    high = hf_attn_zoo.patch(clone(base), "mla", rope_pairs=2, rope_selection="high")
    assert _slot_pairs(high) == [[0, 8], [0, 8], [1, 9], [1, 9]]
    low = hf_attn_zoo.patch(clone(base), "mla", rope_pairs=2, rope_selection="low")
    assert _slot_pairs(low) == [[6, 14], [6, 14], [7, 15], [7, 15]]
    interleaved = hf_attn_zoo.patch(clone(tiny_model("helium")), "mla", rope_pairs=2, rope_selection="high")
    assert _slot_pairs(interleaved) == [[0, 1], [0, 1], [2, 3], [2, 3]]
    # norm: the pairs whose query and key rows are largest; make pair 5 of every head dominate
    boosted = clone(base)
    attention = boosted.model.layers[0].self_attn
    with torch.no_grad():
        for proj in (attention.q_proj, attention.k_proj):
            proj.weight.view(-1, 16, proj.in_features)[:, [5, 13]] *= 50
    by_norm = hf_attn_zoo.patch(boosted, "mla", rope_pairs=1, rope_selection="norm")
    assert _slot_pairs(by_norm) == [[5, 13], [5, 13]]


def _correlated_kv_heads():
    """A tiny Llama whose second KV head's keys are twice the first's: positional information of rank 1 across the
    KV heads, which RoRoPE can concentrate and per-head pair dropping cannot."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            keys = layer.self_attn.k_proj.weight.view(2, 16, -1)
            keys[1] = 2 * keys[0]
    return model


def test_rorope_concentrates_the_positional_information_of_the_kv_heads(tmp_path):
    base = _correlated_kv_heads()
    ids = torch.randint(3, 100, (2, 12))
    expected = base(ids).logits
    # half the RoPE budget (4 of 8 pairs per KV head): the principal component of every frequency holds it all
    rorope = hf_attn_zoo.patch(clone(base), "mla", rope_pairs=4, rope_selection="rorope")
    torch.testing.assert_close(rorope(ids).logits, expected, atol=1e-4, rtol=1e-4)
    assert [pair for pair, _ in _slot_pairs(rorope)] == list(range(8))  # one slot per frequency
    per_head = hf_attn_zoo.patch(clone(base), "mla", rope_pairs=4, rope_selection="norm")
    dropped = (per_head(ids).logits - expected).abs().max().item()  # MHA2MLA drops half of each head's pairs
    assert dropped > 1e-3 and dropped > 100 * (rorope(ids).logits - expected).abs().max().item()
    # the mixed slots export like any other: every layer turns the same frequencies
    export_deepseek_v3(rorope, tmp_path / "stock")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "stock").eval()
    torch.testing.assert_close(stock(ids).logits, expected, atol=1e-4, rtol=1e-4)


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
        nope = latent_kv.query_map[::2, : latent_kv.nope_width].argmax(-1)  # [KV, n]: each KV head's no-RoPE channels
        with torch.no_grad():
            up = latent_kv.kv_up(latent_kv.kv_down(x)[:, : latent_kv.rank]).view(len(x), 2, -1)
            keys = attention.k_proj(x).view(len(x), 2, 16).gather(-1, nope.expand(len(x), -1, -1))
            values = attention.v_proj(x).view(len(x), 2, 16)
            return (up - torch.cat([keys, values], -1)).pow(2).sum().item()

    weights_only = hf_attn_zoo.patch(clone(base), "mla", rank=5, rope_pairs=2, rope_selection="high", latent_fit="kv")
    calibrated = hf_attn_zoo.patch(clone(base), "mla", rank=5, rope_pairs=2, rope_selection="high", latent_fit="kv")
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
    boosted = tiny_model("llama")
    with torch.no_grad():  # layer 0 favours pair 5, layer 1 pair 2
        for layer, pair in zip(boosted.model.layers, (5, 2), strict=True):
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.view(-1, 16, proj.in_features)[:, [pair, pair + 8]] *= 50
    norm = hf_attn_zoo.patch(clone(boosted), "mla", rank=8, rope_pairs=1, rope_selection="norm")
    assert [m.slot_pairs[0, 0].item() for m in latent_layers(norm).values()] == [5, 2]
    with pytest.raises(UnsupportedArchitectureError, match="different RoPE frequency pairs"):
        export_deepseek_v3(norm, tmp_path / "norm")
    assert not (tmp_path / "norm").exists()
    # one choice for the whole model: both layers keep the same pair (layer 0's boost is the larger), and it exports
    shared = hf_attn_zoo.patch(clone(boosted), "mla", rank=8, rope_pairs=1, rope_selection="norm", rope_scope="model")
    pairs = [m.slot_pairs.tolist() for m in latent_layers(shared).values()]
    assert pairs[0] == pairs[1]
    export_deepseek_v3(shared, tmp_path / "shared")
    ids = torch.randint(3, 100, (1, 8))
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "shared").eval()
    torch.testing.assert_close(stock(ids).logits, shared(ids).logits, atol=1e-4, rtol=1e-4)


def test_the_cli_exports_a_saved_conversion(tmp_path, capsys):
    from hf_attn_zoo.cli import main

    model = hf_attn_zoo.patch(tiny_model("llama"), "mla", rank=8, rope_pairs=2, rope_selection="high")
    model.save_pretrained(tmp_path / "patched")
    assert main(["mla-export", str(tmp_path / "patched"), str(tmp_path / "stock")]) == 0
    assert "deepseek_v3" in capsys.readouterr().out
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "stock").eval()
    ids = torch.randint(3, 100, (1, 8))
    torch.testing.assert_close(stock(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    assert main(["mla-export", str(tmp_path / "patched"), str(tmp_path / "stock")]) == 2  # finished work stays
    unpatched = tiny_model("llama")
    unpatched.save_pretrained(tmp_path / "plain")
    assert main(["mla-export", str(tmp_path / "plain"), str(tmp_path / "nothing")]) == 2
    assert "layer 0 is not converted" in capsys.readouterr().err


def test_the_planner_counts_the_latent_cache():
    from hf_attn_zoo.families import resolve_family
    from hf_attn_zoo.planning.figures import kv_cache

    model = hf_attn_zoo.patch(tiny_model("llama"), "mla", rank=6, rope_pairs=2)
    figures = kv_cache(model, resolve_family(model.config), hf_attn_zoo.applied_patches(model), 10, 4)
    assert figures.bytes_per_token == 2 * (6 + 2 * 2 * 2) * 4  # 2 layers x (latent + shared RoPE key) x fp32


def test_a_model_without_rope_is_refused():
    model = tiny_model("smollm3", no_rope_layers=[0, 0])  # SmolLM3's NoPE layers, here all of them
    with pytest.raises(InvalidOptionError, match="no RoPE on any layer"):
        hf_attn_zoo.patch(model, "mla")
    assert hf_attn_zoo.applied_patches(model) == []


def test_auto_absorbs_the_decode_steps_and_expands_the_prefill(monkeypatch):
    import hf_attn_zoo.patches.mla as mla

    calls = []
    original = mla._absorbed
    monkeypatch.setattr(mla, "_absorbed", lambda *a, **k: calls.append(a[3].shape[2]) or original(*a, **k))
    model = hf_attn_zoo.patch(tiny_model("llama"), "mla", rank=6, rope_pairs=2)
    ids = torch.randint(3, 100, (1, 40))
    model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert calls == [1] * 6  # 3 decode steps x 2 layers, each one query; the 40-token prefill is expanded


def test_the_attention_fit_minimises_the_weighted_error_it_is_named_for():
    """`latent_fit="attention"` is the best rank-r fit in its metric (keys by the queries, values by o_proj): never
    worse there than the plain or balanced fits of the same layer."""
    from hf_attn_zoo.families import resolve_family
    from hf_attn_zoo.families.rope import channel_pairs
    from hf_attn_zoo.patches.mla import _rows
    from hf_attn_zoo.patches.mla_layout import attention_metric, factorise, pair_statistics, plan_layout

    base = tiny_model("llama")
    attention = base.model.layers[0].self_attn
    q_rows, k_rows, v_rows = (_rows(getattr(attention, p)) for p in ("q_proj", "k_proj", "v_proj"))
    rotary, pairs = channel_pairs(resolve_family(base.config), base.config)
    moment = torch.eye(q_rows.shape[1], dtype=torch.float64)
    stats = pair_statistics(q_rows, k_rows, moment, 4, pairs, rotary, "norm")
    layout = plan_layout(stats, k_rows, v_rows, 4, 2, "norm")
    n = 16 - 4
    query_rows = torch.einsum("hnd,hdi->hni", layout.query_map[:, :n], q_rows.view(4, 16, -1))
    out = attention.o_proj.weight.detach().double().view(64, 4, 16)
    metric = attention_metric(layout.stacked, moment, query_rows, out, n)

    def weighted_error(fit: str) -> float:
        down, up = factorise(layout.stacked, moment, 6, n, 2, fit, metric)
        error = (layout.stacked - up @ down).view(2, n + 16, -1)
        return sum(torch.trace(metric[j] @ error[j] @ moment @ error[j].T).item() for j in range(2))

    best = weighted_error("attention")
    assert best < weighted_error("balanced") and best < weighted_error("kv")
