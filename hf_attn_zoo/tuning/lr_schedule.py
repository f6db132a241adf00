"""The recipe's learning-rate schedule (`optim.schedule`, `optim.warmup_steps`, `optim.lr` -> `optim.min_lr`).

A linear warm-up whose first step already trains, at `lr / (warmup_steps + 1)`, and reaches `lr` at step
`warmup_steps`; then a `cosine` or `linear` decay that reaches `min_lr` at the last step, or the peak held
(`constant`), or `wsd` (warm-up, stable, decay): the peak held until the last `decay_steps(total, fraction)` steps,
which fall to `min_lr` as `1 - sqrt(progress)` (the cool-down shape Hägele et al. 2024, arXiv:2405.18392, found
best). `min_lr` counts as a rate of `lr`, so each optimizer parameter group ends at `min_lr / lr` of its own learning
rate.

`wsd` is what lets one run stand for several: until its decay starts, a run of `T` steps has the same learning rates
as every shorter run, so the run at step `stable_steps(t)` is the state a run of `t` steps decays from
(`train.branch_budgets`, `tuning.branches`).

`cosine` and `constant` are transformers' own `cosine_warmup_with_min_lr` schedule (`get_scheduler`): its warm-up
`(step + 1) / W` and its cosine over the `T - W` steps after it are this schedule exactly with `W = warmup_steps + 1`
and `T = total_steps + 1` (`constant` is that cosine with a floor of 1). transformers' usual warm-up `step / W`
(`cosine_with_min_lr`, `linear`, `constant_with_warmup`, `warmup_stable_decay`) would spend the first step at a
learning rate of 0, and no transformers schedule decays linearly to a floor after this warm-up, so `linear` keeps a
rule of its own; `wsd` too (transformers' `warmup_stable_decay` has the step-0 warm-up, and its decay length is not
a share of the run).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler

__all__ = ["decay_steps", "lr_lambda", "lr_scheduler", "stable_steps"]


def decay_steps(total_steps: int, decay_fraction: float) -> int:
    """`wsd`: steps of the decay at the end of a run of `total_steps` (`decay_fraction` of them, at least 1)."""
    return min(total_steps, max(1, round(decay_fraction * total_steps)))


def stable_steps(total_steps: int, decay_fraction: float) -> int:
    """`wsd`: optimizer steps before the decay of a run of `total_steps`: where a longer run branches off to it."""
    return total_steps - decay_steps(total_steps, decay_fraction)


def lr_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    lr: float,
    min_lr: float,
    decay_fraction: float = 0.2,
) -> LambdaLR:
    """The schedule of `optimizer` for a run of `total_steps` optimizer steps (see the module docstring).

    Args:
        optimizer (`torch.optim.Optimizer`): its parameter groups' learning rates are the peaks.
        schedule (`str`): `cosine`, `linear`, `constant` or `wsd` (`optim.schedule`).
        warmup_steps (`int`): steps of the linear warm-up (`optim.warmup_steps`).
        total_steps (`int`): optimizer steps of the run; the decay reaches the floor there.
        lr (`float`): the peak learning rate (`optim.lr`).
        min_lr (`float`): the final learning rate of the decay (`optim.min_lr`), at most `lr`.
        decay_fraction (`float`, *optional*, defaults to 0.2): `wsd`: share of the steps that decay
            (`optim.decay_fraction`).
    """
    floor = min_lr / lr
    if schedule == "linear":
        rule = partial(_linear_with_floor, warmup_steps=warmup_steps, total_steps=total_steps, floor=floor)
        return LambdaLR(optimizer, rule)
    if schedule == "wsd":
        decay = decay_steps(total_steps, decay_fraction)
        rule = partial(_wsd, warmup_steps=warmup_steps, total_steps=total_steps, decay=decay, floor=floor)
        return LambdaLR(optimizer, rule)
    return get_scheduler(
        "cosine_warmup_with_min_lr",
        optimizer,
        num_warmup_steps=warmup_steps + 1,
        num_training_steps=total_steps + 1,
        scheduler_specific_kwargs={"min_lr_rate": 1.0 if schedule == "constant" else floor},
    )


def lr_lambda(
    schedule: str, warmup_steps: int, total_steps: int, lr: float, min_lr: float, decay_fraction: float = 0.2
) -> Callable[[int], float]:
    """The factor that `lr_scheduler` multiplies the peak learning rate by at each step (`step -> factor`)."""
    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    return lr_scheduler(probe, schedule, warmup_steps, total_steps, lr, min_lr, decay_fraction).lr_lambdas[0]


def _linear_with_floor(step: int, *, warmup_steps: int, total_steps: int, floor: float) -> float:
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1.0 - floor) * (1.0 - progress)


def _wsd(step: int, *, warmup_steps: int, total_steps: int, decay: int, floor: float) -> float:
    # the decay comes first: a run too short for its warm-up still ends at the floor
    start = total_steps - decay
    if step >= start:
        progress = min(1.0, (step - start + 1) / decay)
        return floor + (1.0 - floor) * (1.0 - math.sqrt(progress))
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    return 1.0
