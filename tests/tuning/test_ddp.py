"""Two DDP processes (torchrun, gloo) give the same per-step losses as one process at the same global batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .launch import loss_history, tune
from .test_train import MOH, tiny_recipe

# fp32 sums over 2 x 2 blocks instead of 4: rounding only
DDP_LOSS_ATOL = 1e-4


def _tune(recipe: Path, nproc: int, batch_size: int, out: Path) -> list[tuple[int, float]]:
    tune(recipe, nproc, f"train.batch_size={batch_size}", f"output_dir={out}")
    return loss_history(out)


@pytest.mark.slow
@pytest.mark.parametrize(
    "patches",
    [
        pytest.param([], id="dense"),
        # balance losses are computed over each process's own batch, so they are off here and the match is exact
        pytest.param([{**MOH, "balance_loss_weight": 0.0}], id="moh"),
    ],
)
def test_two_processes_match_one(tmp_path: Path, tiny_model_dir: Path, patches: list):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, patches=patches, train={"max_steps": 3})
    one = _tune(recipe, 1, 4, tmp_path / "one")
    two = _tune(recipe, 2, 2, tmp_path / "two")
    assert [s for s, _ in one] == [s for s, _ in two] == [1, 2, 3]
    for (_, a), (_, b) in zip(one, two):
        assert abs(a - b) < DDP_LOSS_ATOL


@pytest.mark.slow
def test_two_processes_train_with_a_balance_loss(tmp_path: Path, tiny_model_dir: Path):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, patches=[MOH], train={"max_steps": 2})
    two = _tune(recipe, 2, 2, tmp_path / "two")
    assert [s for s, _ in two] == [1, 2]
    aux = json.loads((tmp_path / "two" / "result.json").read_text())["aux_loss_history"]
    assert len(aux) == 2
