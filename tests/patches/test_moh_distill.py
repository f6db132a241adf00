"""MoH `distill_router`: the losses, the held-out measurement, and the `moh_distill_router` init hook."""

from __future__ import annotations

import logging

import pytest
import torch

import hf_attn_zoo
from hf_attn_zoo.errors import InvalidOptionError
from hf_attn_zoo.patches.moh import _distill_loss, _topk_fit, distill_router
from hf_attn_zoo.tuning.init_hooks import get_init_hook
from tests.patches.test_moh import _gqa_model


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return hf_attn_zoo.patch(_gqa_model(), "moh", router="learned", shared_heads=2, routed_heads=4, top_k=2)


def _batches(count: int = 4) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(3, 128, (2, 16), generator=generator)} for _ in range(count)]


@pytest.mark.parametrize("loss", ["soft", "topk", "pairwise"])
def test_every_loss_fits_the_output_norm_ranking(loss):
    before = distill_router(_model(), _batches(), steps=1, lr=1e-9, loss=loss)
    after = distill_router(_model(), _batches(), steps=150, lr=5e-2, loss=loss)
    assert after["topk_agreement"] > before["topk_agreement"]
    assert after["norm_recall"] > before["norm_recall"]
    assert after["loss"] < before["loss"]
    assert "heldout_topk_agreement" not in after  # no holdout: every token is fitted
    assert after["tokens"] == 128


def test_holdout_keeps_the_last_tokens_out_of_the_fit():
    model = _model()
    stats = distill_router(model, _batches(), steps=50, lr=5e-2, loss="topk", holdout=0.25)
    assert stats["tokens"] == 96 and stats["heldout_tokens"] == 32
    assert 0.0 <= stats["heldout_topk_agreement"] <= 1.0
    assert 0.0 < stats["heldout_norm_recall"] <= 1.0 + 1e-6
    # the fit sees only the first tokens: with a held-out share, the same fitting tokens give the same router
    fitted_only = _model()
    distill_router(fitted_only, _batches()[:3], steps=50, lr=5e-2, loss="topk")
    for a, b in zip(
        hf_attn_zoo.patches.moh.moh_routers(model).values(), hf_attn_zoo.patches.moh.moh_routers(fitted_only).values()
    ):
        torch.testing.assert_close(a.proj.weight, b.proj.weight)


def test_the_default_loss_is_the_soft_cross_entropy_of_before():
    logits, norms = torch.randn(7, 4), torch.rand(7, 4)
    target = torch.softmax(norms / norms.std(-1, keepdim=True) / 0.5, -1)
    torch.testing.assert_close(
        _distill_loss("soft", logits, norms, 2, 0.5), torch.nn.functional.cross_entropy(logits, target)
    )


def test_topk_fit_measures_agreement_and_norm_recall():
    norms = torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    logits = torch.tensor([[1.0, 0.9, 0.0, 0.0], [1.0, 0.0, 0.0, 0.9]])  # the second token picks heads 0 and 3
    agreement, recall = _topk_fit(logits, norms, 2)
    assert agreement == pytest.approx(0.5)
    assert recall == pytest.approx((1.0 + 5.0 / 7.0) / 2)


@pytest.mark.parametrize(("option", "match"), [({"loss": "kl"}, "loss='kl'"), ({"holdout": 1.0}, "holdout=1.0")])
def test_bad_distill_options_are_refused(option, match):
    with pytest.raises(InvalidOptionError, match=match):
        distill_router(_model(), _batches(), **option)


def test_the_init_hook_fits_on_its_tokens_and_reports_the_held_out_ones(caplog):
    from datasets import Dataset

    ids = torch.randint(3, 128, (10, 16)).tolist()
    hook = get_init_hook("moh_distill_router")
    with caplog.at_level(logging.INFO, logger="hf_attn_zoo.tuning.init_hooks"):
        hook(
            _model(),
            Dataset.from_dict({"input_ids": ids}),
            tokens=96,
            batch_size=4,
            steps=5,
            loss="topk",
            holdout_tokens=32,
        )
        # a dataset shorter than tokens + holdout_tokens: the fit keeps its tokens, the held-out share shrinks
        hook(_model(), Dataset.from_dict({"input_ids": ids[:7]}), tokens=96, batch_size=4, steps=5, holdout_tokens=32)
        hook(_model(), Dataset.from_dict({"input_ids": ids[:5]}), tokens=96, batch_size=4, steps=5, holdout_tokens=32)
    first, second, third = [r.getMessage() for r in caplog.records if "moh_distill_router" in r.getMessage()]
    assert "on 96 fitting tokens" in first and "on 32 held-out tokens" in first
    assert "on 96 fitting tokens" in second and "on 16 held-out tokens" in second
    assert "on 80 fitting tokens" in third and "held-out" not in third
