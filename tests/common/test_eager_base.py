"""The `zoo` dispatcher keeps the family's own attention function when the model runs `eager`.

`eager` is not in transformers' attention registry: each family's attention module calls its own modeling file's
`eager_attention_forward` (Gemma 2's applies the logit softcap). The dispatcher must call that one, for layers without a
handler and for handlers that wrap the model's function (MoH), not Llama's. MoH's neutral setting on layer 0 exercises
both. Methods that compute their own softmax logits (sparse patterns, MoBA, routing, HyperAttention, the softmax window
of the linear hybrids, StreamingLLM's decode) must apply the softcap themselves: every registered method's neutral
setting must reproduce a softcapping family under `eager`.
"""

from __future__ import annotations

import pytest
import torch

import hf_attn_zoo
from hf_attn_zoo.families import family_specs
from hf_attn_zoo.registry import PATCHES, get_patch
from tests.matrix import FAMILIES, clone, decode_in_steps, tiny_model


def _neutral(method: str, family: str):
    spec = family_specs()[family]
    patch = get_patch(method)
    if patch.refusal(spec, spec.tiny_config()) is not None:
        return None
    return patch.neutral_config(spec, spec.tiny_config()).to_dict()


def _large_scores(model, family: str):
    """Scale q and k up, so that a logit softcap changes the scores."""
    spec = family_specs()[family]
    with torch.no_grad():
        for layer in range(len(spec.decoder_layers(model))):
            attention = spec.attention_module(model, layer)
            for name, scale in ((spec.attention.q, 1000.0), (spec.attention.k, 10.0)):
                if name is not None:
                    getattr(attention, name).weight.mul_(scale)
    return model


CASES = [f for f in FAMILIES if _neutral("moh", f) is not None]


@pytest.mark.parametrize("family", CASES)
def test_the_dispatcher_keeps_the_familys_eager_attention(family):
    base = _large_scores(tiny_model(family), family)
    base.set_attn_implementation("eager")
    model = clone(base)
    model.set_attn_implementation("eager")
    hf_attn_zoo.patch(model, "moh", layers=[0], **_neutral("moh", family))
    ids = torch.randint(3, 128, (2, 10))
    torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-5, rtol=0)


def _softcap(family: str) -> float | None:
    """The family's attention logit softcap in its tiny config (Gemma 2's `attn_logit_softcapping`), or None."""
    config = family_specs()[family].tiny_config()
    return getattr(getattr(config, "text_config", None) or config, "attn_logit_softcapping", None)


# every registered method with a neutral setting, on every family whose attention softcaps its logits: a method that
# computes its own softmax logits must apply the family's softcap to reproduce the model
SOFTCAP_FAMILIES = [family for family in FAMILIES if _softcap(family)]
SOFTCAP_CASES = [
    (method, family)
    for family in SOFTCAP_FAMILIES
    for method in sorted(PATCHES)
    if _neutral(method, family) is not None
]


@pytest.mark.parametrize(("method", "family"), [pytest.param(m, f, id=f"{m}-{f}") for m, f in SOFTCAP_CASES])
def test_neutral_settings_apply_the_familys_softcap_under_eager(method, family):
    base = _large_scores(tiny_model(family), family)
    base.set_attn_implementation("eager")
    model = clone(base)
    model.set_attn_implementation("eager")
    hf_attn_zoo.patch(model, method, **_neutral(method, family))
    ids = torch.randint(3, 128, (2, 10))
    torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-5, rtol=0)


def test_softcap_cases_cover_the_kernels_with_their_own_logits():
    assert SOFTCAP_FAMILIES, "no family in the grid softcaps its attention logits"
    covered = {method for method, _ in SOFTCAP_CASES}
    assert {"sliding_window", "routing_attention", "linearize", "nalaformer", "moba", "hyper_attention"} <= covered


@pytest.mark.parametrize("family", [f for f in SOFTCAP_FAMILIES if _neutral("sliding_window", f) is not None])
def test_streaming_decode_applies_the_familys_softcap_under_eager(family):
    """`stream=True` decodes past the prefill with StreamingLLM's cache positions (`StreamingPositions`), its own
    softmax: with the neutral window it must reproduce the full forward of the unpatched model."""
    base = _large_scores(tiny_model(family), family)
    base.set_attn_implementation("eager")
    model = clone(base)
    model.set_attn_implementation("eager")
    hf_attn_zoo.patch(model, "sliding_window", **{**_neutral("sliding_window", family), "stream": True})
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(decode_in_steps(model, ids, 5), base(ids).logits, atol=1e-5, rtol=0)
