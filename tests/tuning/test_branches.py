"""`optim.schedule: wsd` and its decay branches (`train.branch_budgets`): one run that also writes the models of
smaller budgets, each equal to a separate `wsd` run of that budget."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_attn_zoo.errors import RecipeError
from hf_attn_zoo.tuning import load_recipe, run_recipe
from hf_attn_zoo.tuning.lr_schedule import decay_steps, lr_lambda, stable_steps
from tests.tuning.test_train import tiny_recipe

TOKENS_PER_STEP = 4 * 32  # the tiny recipe's batch of 4 blocks of 32 tokens
WSD = {"lr": 3e-3, "warmup_steps": 1, "schedule": "wsd", "decay_fraction": 0.25, "min_lr": 3e-4}


def test_wsd_holds_the_peak_then_decays_as_one_minus_sqrt_to_the_floor():
    factors = [lr_lambda("wsd", 2, 12, 1.0, 0.1, decay_fraction=0.25)(step) for step in range(12)]
    assert decay_steps(12, 0.25) == 3 and stable_steps(12, 0.25) == 9
    assert factors[:2] == pytest.approx([1 / 3, 2 / 3]) and factors[2:9] == [1.0] * 7
    assert factors[9:] == pytest.approx([0.1 + 0.9 * (1 - math.sqrt(p)) for p in (1 / 3, 2 / 3, 1.0)])
    assert factors[-1] == pytest.approx(0.1)


@pytest.mark.parametrize("short", [3, 5, 8, 13])
def test_a_longer_wsd_run_has_the_learning_rates_of_a_shorter_one_until_its_decay(short: int):
    longer = lr_lambda("wsd", 2, 40, 1.0, 0.0, decay_fraction=0.2)
    shorter = lr_lambda("wsd", 2, short, 1.0, 0.0, decay_fraction=0.2)
    assert [longer(s) for s in range(stable_steps(short, 0.2))] == [shorter(s) for s in range(stable_steps(short, 0.2))]


@pytest.mark.parametrize(
    ("train", "optim", "message"),
    [
        ({"token_budget": 1024, "branch_budgets": [512]}, {"schedule": "cosine"}, "need optim.schedule: wsd"),
        ({"max_steps": 8, "branch_budgets": [512]}, {"schedule": "wsd"}, "give train.token_budget"),
        ({"token_budget": 1024, "branch_budgets": [1024]}, {"schedule": "wsd"}, "below train.token_budget=1024"),
        ({"token_budget": 1024, "branch_budgets": [256, 256]}, {"schedule": "wsd"}, "lists a budget twice"),
    ],
)
def test_branch_budgets_are_checked_with_the_recipe(tmp_path: Path, tiny_model_dir: Path, train, optim, message):
    train = {"max_steps": None, **train}
    path = tiny_recipe(tmp_path, tiny_model_dir, train=train, optim=optim)
    with pytest.raises(RecipeError, match=rf"train\.branch_budgets.*{message}"):
        load_recipe(path)


def _weights(final: Path) -> dict[str, torch.Tensor]:
    return load_file(str(final / "model.safetensors"))


def test_a_decay_branch_equals_the_separate_wsd_run_of_its_budget(tmp_path: Path, tiny_model_dir: Path):
    # 8 steps, decaying over the last 2; the branch of 4 steps leaves the run after step 3 and decays over 1
    trunk_path = tiny_recipe(
        tmp_path,
        tiny_model_dir,
        "trunk",
        train={"max_steps": None, "token_budget": 8 * TOKENS_PER_STEP, "branch_budgets": [4 * TOKENS_PER_STEP]},
        optim=WSD,
    )
    trunk = run_recipe(trunk_path)
    assert trunk.global_step == 8 and list(trunk.branches) == [4 * TOKENS_PER_STEP]
    branch = trunk.branches[4 * TOKENS_PER_STEP]
    folder = tmp_path / "trunk" / "branches" / str(4 * TOKENS_PER_STEP)
    assert branch.output_dir == folder and branch.global_step == 4
    assert branch.resumed_from == str(folder / "checkpoint-3") and branch.train_tokens == TOKENS_PER_STEP

    alone = run_recipe(
        tiny_recipe(
            tmp_path, tiny_model_dir, "alone", train={"max_steps": None, "token_budget": 4 * TOKENS_PER_STEP}, optim=WSD
        )
    )
    assert [s for s, _ in branch.loss_history] == [s for s, _ in alone.loss_history] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(branch.loss_history, alone.loss_history, strict=True):
        assert abs(a - b) < 1e-5
    ours, theirs = _weights(branch.final_dir), _weights(alone.final_dir)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=0)

    # a rerun trains nothing, the branches included
    again = run_recipe(trunk_path)
    assert again.already_finished and again.branches[4 * TOKENS_PER_STEP].already_finished

    # a branch that lost its folder (its checkpoint too) is the separate run again, from the start
    shutil.rmtree(folder)
    rebuilt = run_recipe(trunk_path).branches[4 * TOKENS_PER_STEP]
    assert rebuilt.resumed_from is None and rebuilt.train_tokens == 4 * TOKENS_PER_STEP
    for name, tensor in _weights(rebuilt.final_dir).items():
        torch.testing.assert_close(tensor, theirs[name], atol=1e-6, rtol=0)
