"""Decay branches: one `wsd` run that also writes the models of smaller token budgets (`train.branch_budgets`).

Under `optim.schedule: wsd` a run of `T` steps holds the peak learning rate until its last `decay_steps(T)` steps,
so up to `stable_steps(t)` a longer run has taken exactly the steps of a run of `t` steps (same data order, same
learning rates). `DecayBranches` saves the run there and hard-links that checkpoint into
`output_dir/branches/<budget>/`, with the recipe of that budget; after the run, `run_branches` resumes each one as a
run of its own, which then only trains its decay. A branch is therefore the separate `wsd` run of its budget (tested
against one), and every budget of a study costs the largest run plus the decays (Hägele et al. 2024,
arXiv:2405.18392, Sec. 3). A branch whose checkpoint is missing (the run was resumed past its branch point from a
checkpoint written before it) simply runs in full from the start, with the same result.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from transformers import TrainerCallback

from .lr_schedule import stable_steps
from .recipe import Recipe, apply_overrides, validate_recipe
from .run_folder import write_recipe

__all__ = ["DecayBranches", "branch_dir", "branch_points", "branch_recipe", "run_branches"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def branch_dir(output_dir: Path, budget: int) -> Path:
    """The run folder of the branch of `budget` tokens."""
    return Path(output_dir) / "branches" / str(budget)


def branch_recipe(recipe: Recipe, budget: int) -> Recipe:
    """The recipe of the branch of `budget` tokens: the same run, with that budget, in its own folder."""
    overrides = [
        f"train.token_budget={budget}",
        "train.branch_budgets=[]",
        "train.resume=true",
        f"output_dir={branch_dir(recipe.resolved_output_dir(), budget)}",
    ]
    return validate_recipe(apply_overrides(recipe.model_dump(mode="python"), overrides), recipe._source)


def branch_points(recipe: Recipe, tokens_per_step: int) -> dict[int, list[int]]:
    """`{step: budgets}`: where each branch leaves the run (the optimizer steps before its own decay)."""
    points: dict[int, list[int]] = {}
    for budget in sorted(recipe.train.branch_budgets):
        steps = math.ceil(budget / tokens_per_step)
        points.setdefault(stable_steps(steps, recipe.optim.decay_fraction), []).append(budget)
    return points


class DecayBranches(TrainerCallback):
    """Saves the run at each branch point and hands that checkpoint to the branch's folder (hard links, so it costs
    no space and survives the run's checkpoint rotation). Listed after `CheckpointLayout`, whose marker it copies."""

    def __init__(self, recipe: Recipe, tokens_per_step: int):
        self.recipe = recipe
        self.points = branch_points(recipe, tokens_per_step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.points:
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        budgets = self.points.get(state.global_step)
        if not budgets:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        if not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        for budget in budgets:
            branch = branch_recipe(self.recipe, budget)
            folder = branch.resolved_output_dir()
            target = folder / checkpoint.name
            if target.exists():
                continue
            partial = folder / f"{checkpoint.name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copytree(checkpoint, partial, copy_function=_link_or_copy)
            write_recipe(branch, folder)
            partial.rename(target)
            logger.info("decay branch of %d tokens: starts from step %d (%s)", budget, state.global_step, target)


def run_branches(recipe: Recipe, run: Callable[[Recipe], T]) -> dict[int, T]:
    """Run (or find finished) every branch of `recipe`, smallest first; `run` is `run_recipe`."""
    return {budget: run(branch_recipe(recipe, budget)) for budget in sorted(recipe.train.branch_budgets)}


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, target)
