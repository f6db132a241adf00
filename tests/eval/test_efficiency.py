"""The efficiency probe: cache bytes read from the cache object (full, windowed, latent), rates, memory counter; the
lm-eval model class records it, and it can be turned off."""

from __future__ import annotations

import sys

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_attn_zoo
from hf_attn_zoo.errors import InvalidOptionError
from hf_attn_zoo.eval_harness import efficiency
from hf_attn_zoo.eval_harness.efficiency import measure_efficiency, probe_prompt
from hf_attn_zoo.eval_harness.lm_model import ZooLM

# the tiny Llama: 2 layers x 2 KV heads x head_dim 16, keys and values, float32
FULL_KV_BYTES_PER_TOKEN = 2 * 2 * 16 * 2 * 4


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_probe_prompt_is_fixed_held_out_text(tiny):
    _, tokenizer = tiny
    ids = probe_prompt(tokenizer, 300)
    assert ids.shape == (1, 300)
    assert probe_prompt(tokenizer, 300).equal(ids)
    assert tokenizer.bos_token_id not in ids[0, :1].tolist()


def test_unpatched_model(tiny):
    model, tokenizer = tiny
    found = measure_efficiency(model, tokenizer, "cpu", prompt_tokens=64, decode_tokens=4)
    assert found.kv_cache_bytes == 64 * FULL_KV_BYTES_PER_TOKEN
    assert found.kv_cache_bytes_per_token == FULL_KV_BYTES_PER_TOKEN
    assert found.cache_layers == ["DynamicLayer"]
    assert found.prefill_tokens_per_s > 0 and found.decode_tokens_per_s > 0
    assert found.probe == {
        "batch_size": 1,
        "prompt_tokens": 64,
        "decode_tokens": 4,
        "corpus": "python_stdlib_docs",
        "device": "cpu",
        "dtype": "torch.float32",
        "threads": found.probe["threads"],
    }
    if sys.platform == "linux":
        assert found.memory_kind == "cpu_process_peak_rss"
        assert found.peak_memory_bytes >= found.memory_before_bytes > 0


@pytest.mark.parametrize(
    ("method", "options", "layer", "kept_fraction"),
    [
        # the 4 sinks and the last 28 of 128 positions stay in the cache
        ("sliding_window", {"window": 28, "sinks": 4}, "SinkWindowLayer", 32 / 128),
        # rank 8 latent + the rotated halves of 1 RoPE pair per KV head (2 x 2 channels), instead of 2 x 2 x 16
        ("mla", {"rank": 8, "rope_pairs": 1}, "DynamicLayer", (8 + 2 * 2) / (2 * 2 * 16)),
    ],
)
def test_patched_caches_report_what_they_keep(tiny_model_dir, method, options, layer, kept_fraction):
    model = hf_attn_zoo.patch(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), method, **options)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    found = measure_efficiency(model, tokenizer, "cpu", prompt_tokens=128, decode_tokens=2)
    assert found.cache_layers == [layer]
    assert found.kv_cache_bytes_per_token == pytest.approx(FULL_KV_BYTES_PER_TOKEN * kept_fraction)


def test_bad_probe_sizes(tiny):
    with pytest.raises(ValueError, match="decode_tokens >= 1"):
        measure_efficiency(*tiny, "cpu", decode_tokens=0)


def test_model_class_records_it_or_not(tiny_model_dir):
    lm = ZooLM(pretrained=str(tiny_model_dir), device="cpu", efficiency_prompt_tokens="32")
    record = lm.get_model_info()["hf_attn_zoo"]["efficiency"]
    assert record["kv_cache_bytes"] == 32 * FULL_KV_BYTES_PER_TOKEN
    assert record["probe"]["prompt_tokens"] == 32
    off = ZooLM(pretrained=lm.model, tokenizer=lm.tokenizer, efficiency="false")
    assert "efficiency" not in off.get_model_info()["hf_attn_zoo"]
    with pytest.raises(InvalidOptionError, match="efficiency_prompt_tokens"):
        ZooLM(pretrained=lm.model, tokenizer=lm.tokenizer, efficiency_prompt_tokens=0)
    with pytest.raises(InvalidOptionError, match="efficiency must be true or false"):
        ZooLM(pretrained=lm.model, tokenizer=lm.tokenizer, efficiency="maybe")


def test_a_failing_probe_is_recorded_not_raised(tiny_model_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("no cache here")

    monkeypatch.setattr("hf_attn_zoo.eval_harness.lm_model.measure_efficiency", fail)
    lm = ZooLM(pretrained=str(tiny_model_dir), device="cpu")
    assert lm.get_model_info()["hf_attn_zoo"]["efficiency"] == {"error": "RuntimeError: no cache here"}


def test_without_a_resettable_peak_counter_memory_is_unknown(tiny, monkeypatch):
    def no_proc(devices):
        return None, None

    monkeypatch.setattr(efficiency, "_reset_peak", no_proc)
    found = measure_efficiency(*tiny, "cpu", prompt_tokens=16, decode_tokens=1)
    assert (found.peak_memory_bytes, found.memory_before_bytes, found.memory_kind) == (None, None, None)
