"""Sink-aware streaming cache: secondary sinks kept past the window (`SinkScoreLayer` + `sink_cache_attention`)
against a token-by-token StreamingLLM reference that re-rotates the cache, in any split of the sequence into calls."""

from __future__ import annotations

import pytest
import torch

from hf_attn_zoo.kernels.kv_cache import SinkScoreLayer
from hf_attn_zoo.kernels.streaming import (
    extra_sink_spans,
    naive_sink_cache_attention,
    rotate,
    sink_cache_attention,
)

HEADS, KV, DIM = 4, 2, 16
INV_FREQ = 1.0 / (100.0 ** (torch.arange(0, DIM, 2).float() / DIM))
SCALING = DIM**-0.5


def _inputs(length: int, seed: int = 0):
    """Pre-RoPE queries/keys `[1, H, T, D]`; some keys are large so the scores differ in rank."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(1, HEADS, length, DIM, generator=generator)
    key = torch.randn(1, KV, length, DIM, generator=generator) * (
        1 + 3 * torch.rand(1, 1, length, 1, generator=generator)
    )
    value = torch.randn(1, KV, length, DIM, generator=generator)
    return query, key, value


def _run(query, key, value, sinks, extra, window, splits, stream, softcap=None):
    """The kernel in calls of `splits` tokens through a `SinkScoreLayer`, as the patch's handler runs it."""
    length = query.shape[2]
    positions = torch.arange(length)
    q_rot, k_rot = rotate(query, positions, INV_FREQ), rotate(key, positions, INV_FREQ)
    layer = SinkScoreLayer(sinks, window, extra)
    outs, start = [], 0
    for size in splits:
        end = start + size
        keys, values = layer.update(k_rot[:, :, start:end], value[:, :, start:end])
        out, scores, keep = sink_cache_attention(
            q_rot[:, :, start:end],
            keys,
            values,
            layer.key_positions(),
            positions[start:end],
            layer.held(),
            layer.key_scores(),
            None,
            sinks,
            extra,
            window,
            SCALING,
            INV_FREQ if stream and start > 0 else None,
            softcap,
        )
        assert int(keep.sum(1).max()) <= extra
        layer.commit(scores, keep)
        layer.evict()
        outs.append(out)
        start = end
    assert start == length
    return torch.cat(outs, dim=1)[0], layer


def _reference(query, key, value, sinks, extra, window, stream, softcap=None):
    group = HEADS // KV
    return naive_sink_cache_attention(
        query[0],
        key[0].repeat_interleave(group, 0),
        value[0].repeat_interleave(group, 0),
        sinks,
        extra,
        window,
        SCALING,
        INV_FREQ,
        stream,
        softcap,
    )


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("sinks,extra,window", [(2, 3, 5), (1, 1, 4), (4, 4, 8), (0, 2, 3)])
def test_token_by_token_matches_the_reference(stream, sinks, extra, window):
    query, key, value = _inputs(40)
    # the prefill holds at most sinks + window tokens: nothing left the window yet, text = cache positions
    first = sinks + window
    got, layer = _run(query, key, value, sinks, extra, window, [first] + [1] * (40 - first), stream)
    torch.testing.assert_close(got, _reference(query, key, value, sinks, extra, window, stream), atol=1e-5, rtol=1e-5)
    # bounded: sinks + window shared keys (the next token overwrites one) and at most `extra` kept per row
    assert layer.positions.numel() <= sinks + window
    assert int((layer.extra_positions >= 0).sum()) == extra


@pytest.mark.parametrize("stream", [False, True])
def test_any_split_into_calls_gives_the_same_outputs(stream):
    query, key, value = _inputs(50, seed=1)
    reference = _reference(query, key, value, 2, 3, 6, stream)
    for splits in ([8, 7, 13, 1, 1, 20], [8] + [3] * 14, [8, 42]):
        got, _ = _run(query, key, value, 2, 3, 6, splits, stream)
        torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)


def test_one_prefill_is_the_masked_pattern_at_text_positions():
    query, key, value = _inputs(60, seed=2)
    got, _ = _run(query, key, value, 3, 2, 7, [60], stream=False)
    torch.testing.assert_close(got, _reference(query, key, value, 3, 2, 7, stream=False), atol=1e-5, rtol=1e-5)


def test_no_extras_is_streamingllm():
    query, key, value = _inputs(30, seed=3)
    for stream in (False, True):
        got, _ = _run(query, key, value, 2, 0, 5, [7] + [1] * 23, stream)
        # with extra=0 the reference is StreamingLLM's sinks + window cache, re-indexed when streaming
        torch.testing.assert_close(got, _reference(query, key, value, 2, 0, 5, stream), atol=1e-5, rtol=1e-5)


def test_the_kept_tokens_are_the_best_scored_that_left_the_window():
    scores = torch.tensor([[0.0, 0.0, 5.0, 1.0, 9.0, 2.0, 7.0, 3.0]])
    k_rel = torch.arange(8)[None]
    candidate = k_rel >= 2  # two sinks
    held = torch.zeros_like(candidate)
    appear, drop = extra_sink_spans(scores, k_rel, candidate, held, extra=2, window=3)
    assert appear[0, 2:].tolist() == [5, 6, 7, 8, 9, 10]
    # 2 (score 5) is dropped when 4 (9) and 6 (7) have both left: at 6 + 3 = 9
    assert drop[0, 2] == 9
    # 3 (score 1) leaves at 6, when only 2 (5) has left, and is dropped when 4 (9) leaves, at 7
    assert drop[0, 3] == 7
    assert drop[0, 4] == float("inf") and drop[0, 6] == float("inf")


def test_left_padding_keeps_each_rows_own_sinks_and_extras():
    query, key, value = _inputs(30, seed=4)
    positions = torch.arange(30)
    q_rot, k_rot = rotate(query, positions, INV_FREQ), rotate(key, positions, INV_FREQ)
    # the same row, unpadded and left-padded by 3
    pad = 3
    padded = [torch.cat([torch.zeros(1, x.shape[1], pad, DIM), x], dim=2) for x in (q_rot, k_rot, value)]
    # a padded row's positions are shifted by 3, so its RoPE phases are too: rotate the padded copy at its own positions
    shifted = torch.arange(pad, 30 + pad)
    padded[0][:, :, pad:] = rotate(query, shifted, INV_FREQ)
    padded[1][:, :, pad:] = rotate(key, shifted, INV_FREQ)
    batch = [
        torch.cat([torch.cat([x, torch.zeros(1, x.shape[1], pad, DIM)], dim=2), p])
        for x, p in zip((q_rot, k_rot, value), padded, strict=True)
    ]
    padding = torch.ones(2, 30 + pad, dtype=torch.bool)
    padding[1, :pad] = False
    # row 0 is unpadded but 3 tokens shorter on the right: compare only row 1 against the unpadded single row
    out, scores, keep = sink_cache_attention(
        batch[0],
        batch[1],
        batch[2],
        torch.arange(30 + pad)[None].expand(2, -1),
        torch.arange(30 + pad),
        torch.zeros(2, 30 + pad, dtype=torch.bool),
        torch.zeros(2, 30 + pad),
        padding,
        2,
        2,
        5,
        SCALING,
    )
    single, _ = _run(query, key, value, 2, 2, 5, [30], stream=False)
    torch.testing.assert_close(out[1, pad:], single, atol=1e-5, rtol=1e-5)
    assert int(keep[1].sum()) == 2 and not bool(keep[1, :pad].any())


def test_backward_matches_the_reference():
    query, key, value = _inputs(24, seed=5)
    positions = torch.arange(24)
    inputs = [x.clone().requires_grad_() for x in (query, key, value)]
    q_rot, k_rot = rotate(inputs[0], positions, INV_FREQ), rotate(inputs[1], positions, INV_FREQ)
    out, _, _ = sink_cache_attention(
        q_rot,
        k_rot,
        inputs[2],
        positions[None],
        positions,
        torch.zeros(1, 24, dtype=torch.bool),
        torch.zeros(1, 24),
        None,
        2,
        2,
        5,
        SCALING,
    )
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), inputs)
    ref_inputs = [x.clone().requires_grad_() for x in (query, key, value)]
    ref = _reference(*ref_inputs, 2, 2, 5, stream=False)
    ref_grads = torch.autograd.grad((ref[None] * weights).sum(), ref_inputs)
    for got, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


# the patch: sliding_window(extra_sinks=...) on a tiny model


def _decode(model, ids, prefill, step=1, mask=None):
    """Logits of `ids` fed as a prefill of `prefill` tokens, then calls of `step` tokens, through one cache."""
    from transformers import DynamicCache

    cache, logits = DynamicCache(config=model.config), []
    bounds = [0, *range(prefill, ids.shape[1], step), ids.shape[1]]
    with torch.no_grad():
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            kwargs = {"attention_mask": mask[:, :end]} if mask is not None else {}
            logits.append(model(ids[:, start:end], cache=cache, use_cache=True, **kwargs).logits)
    return torch.cat(logits, dim=1), cache


def _patched(**options):
    import hf_attn_zoo
    from tests.matrix import tiny_model

    return hf_attn_zoo.patch(tiny_model("llama"), "sliding_window", **options)


def test_decoding_with_extra_sinks_equals_the_masked_full_forward():
    model = _patched(window=6, sinks=2, extra_sinks=3)
    ids = torch.randint(3, 128, (2, 40))
    with torch.no_grad():
        full = model(ids).logits
    for prefill, step in ((8, 1), (5, 4), (40, 1)):
        got, cache = _decode(model, ids, prefill, step)
        torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
    layers = [layer for layer in cache.layers if isinstance(layer, SinkScoreLayer)]
    assert len(layers) == model.config.num_hidden_layers
    for layer in layers:
        # bounded: the sinks and the window, plus three kept middle tokens per row (positions 2..33 left the window)
        assert layer.keys.shape[2] <= 2 + 6
        assert layer.extra_keys.shape[2] == 3 and bool((layer.extra_positions >= 2).all())
        assert bool((layer.extra_positions < 40 - 6).all())


def test_extra_sinks_change_what_is_attended():
    ids = torch.randint(3, 128, (1, 40))
    with torch.no_grad():
        plain = _patched(window=6, sinks=2)(ids).logits
        zero = _patched(window=6, sinks=2, extra_sinks=0)(ids).logits
        extra = _patched(window=6, sinks=2, extra_sinks=3)(ids).logits
    assert torch.equal(plain, zero)
    # the first queries that can miss a middle token are at sinks + window: before them nothing differs
    torch.testing.assert_close(extra[:, :8], plain[:, :8], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(extra[:, 9:], plain[:, 9:], atol=1e-4)


def test_streaming_decode_is_the_same_in_any_split():
    model = _patched(window=6, sinks=2, extra_sinks=3, stream=True)
    ids = torch.randint(3, 128, (2, 40))
    by_token, _ = _decode(model, ids, 8, 1)
    for prefill, step in ((8, 5), (3, 7)):
        got, _ = _decode(model, ids, prefill, step)
        torch.testing.assert_close(got, by_token, atol=1e-5, rtol=1e-5)
    # past sinks + window tokens the positions are re-indexed: not the masked full forward at text positions
    with torch.no_grad():
        full = model(ids).logits
    torch.testing.assert_close(by_token[:, :8], full[:, :8], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(by_token[:, 20:], full[:, 20:], atol=1e-4)


def test_streaming_decode_runs_past_the_position_range():
    model = _patched(window=6, sinks=2, extra_sinks=2, stream=True)
    limit = model.config.max_position_embeddings
    ids = torch.randint(3, 128, (1, limit + 20))
    got, _ = _decode(model, ids, 8, 64)
    assert got.shape[1] == limit + 20 and bool(got.isfinite().all())


def test_left_padding_gives_each_row_its_own_sinks():
    model = _patched(window=5, sinks=2, extra_sinks=2)
    ids = torch.randint(3, 128, (1, 30))
    alone, _ = _decode(model, ids, 6, 1)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    batch = torch.cat([torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1), padded])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    mask[0, 30:] = 0
    got, _ = _decode(model, batch, 9, 1, mask)
    torch.testing.assert_close(got[1, 3:], alone[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"dilation": 2}, "dilation=1"),
        ({"bounded_cache": False}, "bounded_cache=True"),
        ({"backend": "flex"}, "backend auto or masked"),
        ({"extra_sinks": -1}, "extra_sinks"),
    ],
)
def test_bad_extra_sinks_options_are_refused(options, match):
    import hf_attn_zoo
    from hf_attn_zoo.errors import InvalidOptionError
    from tests.matrix import tiny_model

    model = tiny_model("llama")
    with pytest.raises(InvalidOptionError, match=match):
        hf_attn_zoo.patch(model, "sliding_window", window=4, sinks=1, **{"extra_sinks": 2, **options})
    assert not getattr(model.config, "hf_attn_zoo", None)


def test_extra_sinks_refuse_models_with_their_own_window_and_static_functions():
    import hf_attn_zoo
    from hf_attn_zoo.errors import InvalidOptionError
    from tests.matrix import tiny_model

    with pytest.raises(InvalidOptionError, match="own sliding-window"):
        hf_attn_zoo.patch(tiny_model("mistral"), "sliding_window", window=4, sinks=1, extra_sinks=2)
    with pytest.raises(InvalidOptionError, match="no static attention function"):
        hf_attn_zoo.register_attention_function("sliding_window", window=4, sinks=1, extra_sinks=2)


def test_save_and_reload_keeps_the_extra_sinks(tmp_path):
    import hf_attn_zoo

    model = _patched(window=6, sinks=2, extra_sinks=3)
    ids = torch.randint(3, 128, (1, 30))
    model.save_pretrained(tmp_path)
    loaded = hf_attn_zoo.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_generate_with_extra_sinks_is_greedy_decoding_of_the_masked_pattern():
    model = _patched(window=5, sinks=1, extra_sinks=2)
    model.generation_config.pad_token_id = 0
    prompt = torch.randint(3, 128, (1, 12))
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False)
    ids = prompt
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, ids)


def test_beam_search_moves_each_rows_secondary_sinks_with_its_beam():
    model = _patched(window=3, sinks=1, extra_sinks=2)
    options = {"max_new_tokens": 8, "min_new_tokens": 8, "num_beams": 3, "do_sample": False, "pad_token_id": 0}
    prompt = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, **options), model.generate(prompt, use_cache=False, **options))


SOFTCAP = 0.5  # below the typical scaled score of the random inputs, so the cap changes the weights


@pytest.mark.parametrize("stream", [False, True])
def test_the_softcap_applies_as_in_the_reference_in_any_split(stream):
    query, key, value = _inputs(40, seed=6)
    reference = _reference(query, key, value, 2, 3, 5, stream, softcap=SOFTCAP)
    assert not torch.allclose(reference, _reference(query, key, value, 2, 3, 5, stream), atol=1e-3)
    for splits in ([7] + [1] * 33, [7, 10, 23]):
        got, _ = _run(query, key, value, 2, 3, 5, splits, stream, softcap=SOFTCAP)
        torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)


def test_softcapped_backward_matches_the_reference():
    query, key, value = _inputs(24, seed=5)
    positions = torch.arange(24)
    inputs = [x.clone().requires_grad_() for x in (query, key, value)]
    q_rot, k_rot = rotate(inputs[0], positions, INV_FREQ), rotate(inputs[1], positions, INV_FREQ)
    held, scores = torch.zeros(1, 24, dtype=torch.bool), torch.zeros(1, 24)
    out, _, _ = sink_cache_attention(
        q_rot, k_rot, inputs[2], positions[None], positions, held, scores, None, 2, 2, 5, SCALING, softcap=SOFTCAP
    )
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), inputs)
    ref_inputs = [x.clone().requires_grad_() for x in (query, key, value)]
    ref = _reference(*ref_inputs, 2, 2, 5, stream=False, softcap=SOFTCAP)
    ref_grads = torch.autograd.grad((ref[None] * weights).sum(), ref_inputs)
    for got, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_streaming_positions_apply_the_softcap_at_cache_positions():
    """`StreamingPositions.attend` (sinks + window, no extras) with a softcap: the softcapped attention of the query
    over the cache re-rotated at cache positions, forward and gradients."""
    from hf_attn_zoo.kernels.streaming import StreamingPositions

    sinks, window, p = 2, 5, 30  # a decode query far past sinks + window
    query, key, value = (x.clone().requires_grad_() for x in _inputs(p + 1, seed=7))
    positions = torch.tensor([0, 1, *range(p - window + 1, p + 1)])  # what SinkWindowLayer keeps
    k, v = key[:, :, positions], value[:, :, positions]
    q = query[:, :, p:]
    out = StreamingPositions(INV_FREQ, sinks, window).attend(
        rotate(q, torch.tensor([p]), INV_FREQ),
        rotate(k, positions, INV_FREQ),
        v,
        positions,
        torch.tensor([p]),
        None,
        SCALING,
        SOFTCAP,
    )
    cache = torch.arange(positions.numel())
    group = HEADS // KV
    scores = rotate(q, cache[-1:], INV_FREQ) @ rotate(k, cache, INV_FREQ).repeat_interleave(group, 1).transpose(-1, -2)
    probs = torch.softmax(SOFTCAP * torch.tanh(scores * SCALING / SOFTCAP), dim=-1)
    expected = (probs @ v.repeat_interleave(group, 1)).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(out)
    for got, want in zip(
        torch.autograd.grad((out * weights).sum(), (query, key, value), retain_graph=True),
        torch.autograd.grad((expected * weights).sum(), (query, key, value)),
        strict=True,
    ):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
