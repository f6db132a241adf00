"""power_attention: the static pattern of PowerAttention's Alg. 1."""

from __future__ import annotations

import pytest
import torch

import hf_attn_zoo
from hf_attn_zoo.errors import InvalidOptionError
from hf_attn_zoo.patches.power_attention import PowerPattern
from tests.matrix import clone, tiny_model


def _alg1(q: int, k: int, b: int, window: int, sinks: int) -> bool:
    d = q // b - k // b
    return q >= k and (d < window or d in (0, 1, 2, 4, 8, 16, 32, 64) or k < sinks * b)


@pytest.mark.parametrize("b,window,sinks", [(4, 5, 1), (8, 1, 0), (2, 3, 2)])
def test_pattern_is_algorithm_1(b, window, sinks):
    n = 160
    mask = PowerPattern(b, window, sinks).allowed(torch.arange(n)[:, None], torch.arange(n)[None, :], None)
    expected = torch.tensor([[_alg1(i, j, b, window, sinks) for j in range(n)] for i in range(n)])
    assert torch.equal(mask, expected)


def test_every_distance_is_reachable_within_log_layers():
    """Composing the pattern L times reaches any earlier token at block distance < 2^L (the paper's claim)."""
    b, n = 2, 128
    mask = PowerPattern(b, 1, 0).allowed(torch.arange(n)[:, None], torch.arange(n)[None, :], None).float()
    reach = mask.clone()
    layers = 1
    while not bool((reach > 0)[torch.ones(n, n).tril().bool()].all()):
        reach = (reach @ mask).clamp(max=1)
        layers += 1
    assert layers <= (n // b - 1).bit_length()


def test_query_reads_logarithmically_many_blocks():
    b, n = 16, 4096
    row = PowerPattern(b, 2, 1).allowed(torch.tensor(n - 1), torch.arange(n), None)
    blocks = row.reshape(-1, b).any(-1).sum().item()
    assert blocks <= 2 + 1 + (n // b).bit_length()


@pytest.mark.parametrize(
    "options,match",
    [
        ({"block_size": 0}, "block_size=0"),
        ({"block_size": 512}, "max_position_embeddings"),
        ({"block_size": 16, "window_blocks": 0}, "window_blocks=0"),
        ({"block_size": 16, "window_blocks": 17}, "window_blocks=17"),
        ({"block_size": 16, "sink_blocks": -1}, "sink_blocks=-1"),
    ],
)
def test_bad_options_leave_the_model_untouched(options, match):
    base = tiny_model("mistral")
    model = clone(base)
    with pytest.raises(InvalidOptionError, match=match):
        hf_attn_zoo.patch(model, "power_attention", **options)
    ids = torch.randint(3, 128, (1, 8))
    assert torch.equal(model(ids).logits, base(ids).logits)
    assert hf_attn_zoo.applied_patches(model) == []


def test_two_attention_patterns_on_one_layer_are_refused_but_mix_across_layers():
    from hf_attn_zoo.errors import PatchConflictError

    base = tiny_model("llama")
    model = hf_attn_zoo.patch(clone(base), "sliding_window", layers=[0], window=4, sinks=1)
    ids = torch.randint(3, 128, (1, 12))
    before = model(ids).logits
    with pytest.raises(PatchConflictError, match="sliding_window"):
        hf_attn_zoo.patch(model, "power_attention", layers=[0, 1], block_size=2, window_blocks=1)
    assert torch.equal(model(ids).logits, before)
    hf_attn_zoo.patch(model, "power_attention", layers=[1], block_size=2, window_blocks=1)  # a hybrid stack
    assert [r["method"] for r in hf_attn_zoo.applied_patches(model)] == ["sliding_window", "power_attention"]
    assert not torch.equal(model(ids).logits, before)
