"""The real SmolLM2-135M (9 query / 3 KV heads): what MoH does to a pretrained model. Slow, but runs in CI."""

from __future__ import annotations

import pytest
import torch

import hf_attn_zoo
from hf_attn_zoo.assets.corpora import held_out_texts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def blocks(smollm2):
    _, tokenizer = smollm2
    ids = tokenizer("\n\n".join(held_out_texts("python_stdlib_docs", 7)), return_tensors="pt").input_ids[0]
    assert ids.numel() >= 4 * 256, "the held-out text is too short"
    return ids[: 4 * 256].view(4, 256)


def _perplexity(model, blocks) -> float:
    with torch.no_grad():
        return torch.exp(model(blocks, labels=blocks).loss).item()


@pytest.fixture
def model(smollm2):
    model, _ = smollm2
    yield model
    hf_attn_zoo.unpatch(model)


def test_neutral_moh_reproduces_smollm2(model, blocks):
    dense = model(blocks[:1]).logits
    hf_attn_zoo.patch(model, "moh", router="onorm", shared_heads=0, routed_heads=9, top_k=9)
    torch.testing.assert_close(model(blocks[:1]).logits, dense, atol=1e-5, rtol=0)


def test_output_norm_selection_is_nearly_free_and_query_norm_is_not(model, blocks):
    dense = _perplexity(model, blocks)
    hf_attn_zoo.patch(model, "moh", router="onorm", top_k=7)  # 7 of 9 heads, no training
    onorm = _perplexity(model, blocks)
    hf_attn_zoo.unpatch(model)
    hf_attn_zoo.patch(model, "moh", router="qnorm")  # MoH-LLaMA3 rule: 4 shared + top-3 of 5 by query norm
    qnorm = _perplexity(model, blocks)
    assert 10 < dense < 40
    assert onorm < 1.15 * dense, (dense, onorm)
    assert qnorm > 2 * dense, (dense, qnorm)


def test_group_routing_decode_skip_generates_like_masking(model, smollm2):
    _, tokenizer = smollm2
    prompt = tokenizer(held_out_texts("python_stdlib_docs", 1)[0][:1500], return_tensors="pt")
    options = dict(router="qnorm", granularity="group", shared_heads=0, top_k=3)
    hf_attn_zoo.patch(model, "moh", decode_skip="never", **options)
    masked = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    hf_attn_zoo.unpatch(model)
    hf_attn_zoo.patch(model, "moh", decode_skip="auto", skip_min_unread_kv=0, **options)
    skipped = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(skipped, masked)
    assert hf_attn_zoo.analysis.head_usage(model)["mean_active_fraction"] == pytest.approx(1 / 3)


def test_patched_smollm2_round_trip_is_exact(model, blocks, tmp_path):
    hf_attn_zoo.patch(model, "moh", router="learned")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in hf_attn_zoo.new_parameters(model).values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    expected = model(blocks[:1]).logits
    model.save_pretrained(tmp_path)
    reloaded = hf_attn_zoo.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded(blocks[:1]).logits, expected)
