"""sliding_window: StreamingLLM sinks + window and causal 1-D neighbourhood attention, with a bounded cache."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import hf_attn_zoo
from hf_attn_zoo.errors import InvalidOptionError
from hf_attn_zoo.kernels.kv_cache import SinkWindowLayer
from hf_attn_zoo.patches.sliding_window import SinkWindowPattern
from tests.matrix import clone, tiny_model


def _natten_causal(i: int, j: int, kernel: int, dilation: int) -> bool:
    """NATTEN's causal 1-D rule (dilated coordinates): j <= i, same residue mod dilation, within the kernel."""
    return j <= i and (i - j) % dilation == 0 and (i // dilation) - (j // dilation) < kernel


@pytest.mark.parametrize("window,dilation", [(1, 1), (4, 1), (3, 2), (5, 3)])
def test_pattern_without_sinks_is_causal_neighbourhood_attention(window, dilation):
    q = torch.arange(40)[:, None]
    k = torch.arange(40)[None, :]
    mask = SinkWindowPattern(window, 0, dilation).allowed(q, k, None)
    expected = torch.tensor([[_natten_causal(i, j, window, dilation) for j in range(40)] for i in range(40)])
    assert torch.equal(mask, expected)


def test_sinks_add_the_first_tokens_to_every_window():
    mask = SinkWindowPattern(3, 2).allowed(torch.arange(10)[:, None], torch.arange(10)[None, :], None)
    assert mask[9].nonzero().flatten().tolist() == [0, 1, 7, 8, 9]
    assert mask[1].nonzero().flatten().tolist() == [0, 1]


def test_decoding_keeps_only_sinks_and_window_and_matches_the_masked_forward():
    model = hf_attn_zoo.patch(tiny_model("llama"), "sliding_window", window=6, sinks=2)
    ids = torch.randint(3, 128, (2, 30))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :10], cache=cache, use_cache=True).logits]
        for t in range(10, 30):
            steps.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
            layer = cache.layers[0]
            assert isinstance(layer, SinkWindowLayer)
            assert layer.keys.shape[2] <= 2 + 6  # sinks + window (the new token included)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 30


def test_generate_with_left_padding_equals_each_row_alone():
    model = hf_attn_zoo.patch(tiny_model("qwen3"), "sliding_window", window=4, sinks=1)
    long, short = torch.randint(3, 128, (1, 9)), torch.randint(3, 128, (1, 6))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    together = model.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    for row, ids in enumerate((long, short)):
        alone = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(together[row, -12:], alone[0, -12:])


@pytest.mark.parametrize(
    "options,match",
    [
        ({"window": 0}, "window=0"),
        ({"window": -3}, "window=-3"),
        ({"window": 257}, "max_position_embeddings"),
        ({"window": 8, "sinks": -1}, "sinks=-1"),
        ({"window": 8, "dilation": 0}, "dilation=0"),
        ({"window": 100, "dilation": 3}, "window x dilation"),
        ({"backend": "triton"}, "backend"),
    ],
)
def test_bad_options_leave_the_model_untouched(options, match):
    base = tiny_model("llama")
    model = clone(base)
    with pytest.raises(InvalidOptionError, match=match):
        hf_attn_zoo.patch(model, "sliding_window", **options)
    ids = torch.randint(3, 128, (1, 8))
    assert torch.equal(model(ids).logits, base(ids).logits)
    assert hf_attn_zoo.applied_patches(model) == []


def test_sequences_beyond_the_position_range_are_refused():
    model = hf_attn_zoo.patch(tiny_model("llama"), "sliding_window", window=8)
    with pytest.raises(InvalidOptionError, match="max_position_embeddings=256"):
        model(torch.randint(3, 128, (1, 257)))


def test_sliding_window_on_smollm2_stays_close_to_dense_within_the_window(smollm2):
    """A window as long as the text changes nothing; a short one with sinks keeps the perplexity finite."""
    model, tokenizer = smollm2
    text = "The Python interpreter reads a program, compiles it to byte code and runs it. " * 6
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        dense = model(ids, labels=ids).loss
        hf_attn_zoo.patch(model, "sliding_window", window=ids.shape[1], sinks=0)
        same = model(ids, labels=ids).loss
        hf_attn_zoo.unpatch(model)
        hf_attn_zoo.patch(model, "sliding_window", window=16, sinks=4)
        local = model(ids, labels=ids).loss
        hf_attn_zoo.unpatch(model)
    torch.testing.assert_close(same, dense, atol=1e-4, rtol=0)
    assert torch.isfinite(local) and local > dense


def test_the_full_cache_is_a_ring_buffer_written_in_place():
    model = hf_attn_zoo.patch(tiny_model("llama"), "sliding_window", window=5, sinks=2)
    ids = torch.randint(3, 128, (1, 24))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :9], cache=cache, use_cache=True).logits]
        layer = cache.layers[0]
        assert layer.keys.shape[2] == 2 + 5 and layer.ring_start == 2  # bounded right after the prefill (one free slot)
        storage = layer.keys.data_ptr()
        for t in range(9, 20):
            steps.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
        assert layer.keys.data_ptr() == storage  # decode steps write into the same buffer
        steps.append(model(ids[:, 20:24], cache=cache, use_cache=True).logits)  # several tokens at once
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_registered_attention_function_equals_the_patch_with_padding():
    base = tiny_model("llama")
    patched = hf_attn_zoo.patch(clone(base), "sliding_window", window=4, sinks=1)
    name = hf_attn_zoo.register_attention_function("sliding_window", window=4, sinks=1)
    assert name == "zoo_sliding_window"
    plain = clone(base)
    plain.set_attn_implementation(name)
    ids = torch.randint(3, 128, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    torch.testing.assert_close(
        plain(ids, attention_mask=mask).logits[mask.bool()],
        patched(ids, attention_mask=mask).logits[mask.bool()],
        atol=1e-5,
        rtol=1e-5,
    )
    with pytest.raises(InvalidOptionError, match="not a static attention pattern"):
        hf_attn_zoo.register_attention_function("moh")


def test_streaming_positions_equal_re_rotating_the_cache_at_cache_positions():
    """StreamingLLM Sec. 3.2: sinks at cache positions 0..S-1, the window after them, the query last. Rotating only the
    query back for its sink scores gives the same attention as re-rotating every cached key (transformers' RoPE)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from hf_attn_zoo.kernels.streaming import StreamingPositions

    model = tiny_model("llama")
    rotary = LlamaRotaryEmbedding(model.config)
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    dim = model.config.hidden_size // heads
    sinks, window, p = 2, 5, 40  # a decode query at text position 40, far past sinks + window
    g = torch.Generator().manual_seed(0)
    q_raw = torch.randn(1, heads, 1, dim, generator=g)
    positions = torch.tensor([0, 1, *range(p - window + 1, p + 1)])  # what SinkWindowLayer keeps
    k_raw = torch.randn(1, kv_heads, positions.numel(), dim, generator=g)
    v = torch.randn(1, kv_heads, positions.numel(), dim, generator=g)

    def rope(x, pos):
        cos, sin = rotary(x, pos[None])
        return apply_rotary_pos_emb(x, x, cos, sin)[0]

    out = StreamingPositions(rotary.inv_freq, sinks, window).attend(
        rope(q_raw, torch.tensor([p])), rope(k_raw, positions), v, positions, torch.tensor([p]), None, 0.25
    )
    cache_positions = torch.arange(positions.numel())
    q, k = rope(q_raw, cache_positions[-1:]), rope(k_raw, cache_positions)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_stream_decodes_past_the_position_range_and_equals_plain_decoding_until_the_cache_fills():
    base = tiny_model("llama", max_position_embeddings=32)
    plain = hf_attn_zoo.patch(clone(base), "sliding_window", window=8, sinks=2)
    stream = hf_attn_zoo.patch(clone(base), "sliding_window", window=8, sinks=2, stream=True)
    ids = torch.randint(3, 128, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    common = dict(attention_mask=mask, do_sample=False, eos_token_id=[], pad_token_id=0)
    with torch.no_grad():
        # positions 6..8 of the real tokens: the cache of sinks + window is not full yet, nothing moves
        before = plain.generate(ids, max_new_tokens=3, **common)
        torch.testing.assert_close(stream.generate(ids, max_new_tokens=3, **common), before)
        long = stream.generate(ids, max_new_tokens=60, output_scores=True, return_dict_in_generate=True, **common)
        assert long.sequences.shape[1] == 66  # past max_position_embeddings = 32
        assert all(torch.isfinite(score).all() for score in long.scores)
        with pytest.raises(InvalidOptionError, match="max_position_embeddings"):
            plain.generate(ids, max_new_tokens=60, **common)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"stream": True, "bounded_cache": False}, "bounded_cache"),
        ({"stream": True, "dilation": 2}, "dilation=1"),
    ],
)
def test_stream_needs_the_bounded_cache_without_dilation(options, message):
    model = tiny_model("llama")
    with pytest.raises(InvalidOptionError, match=message):
        hf_attn_zoo.patch(model, "sliding_window", window=8, sinks=2, **options)
    assert not hf_attn_zoo.applied_patches(model)


def test_stream_refuses_gemma3_local_and_global_rope():
    model = tiny_model("gemma3")
    with pytest.raises(InvalidOptionError, match="differs per layer type"):
        hf_attn_zoo.patch(model, "sliding_window", window=8, sinks=2, stream=True)
    assert not hf_attn_zoo.applied_patches(model)
