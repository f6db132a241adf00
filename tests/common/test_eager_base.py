"""The `zoo` dispatcher keeps the family's own attention function when the model runs `eager`.

`eager` is not in transformers' attention registry: each family's attention module calls its own modeling file's
`eager_attention_forward` (Gemma 2's applies the logit softcap). The dispatcher must call that one, for layers without a
handler and for handlers that wrap the model's function (MoH), not Llama's. MoH's neutral setting on layer 0 exercises
both. Pattern patches run their own kernels, which must apply the softcap themselves (`sparse_attention(softcap=)`).
"""

from __future__ import annotations

import pytest
import torch

import hf_attn_zoo
from hf_attn_zoo.families import family_specs
from hf_attn_zoo.registry import get_patch
from tests.matrix import FAMILIES, clone, tiny_model


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


@pytest.mark.parametrize("family", [f for f in FAMILIES if _neutral("sliding_window", f) is not None])
def test_pattern_kernels_apply_the_familys_softcap_under_eager(family):
    base = _large_scores(tiny_model(family), family)
    base.set_attn_implementation("eager")
    model = clone(base)
    model.set_attn_implementation("eager")
    hf_attn_zoo.patch(model, "sliding_window", **_neutral("sliding_window", family))
    ids = torch.randint(3, 128, (2, 10))
    torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-5, rtol=0)
