"""The recipe's learning-rate schedule (`optim.schedule`, `optim.warmup_steps`, `optim.lr` -> `optim.min_lr`).

A linear warm-up whose first step already trains, at `lr / (warmup_steps + 1)`, and reaches `lr` at step
`warmup_steps`; then a `cosine` or `linear` decay that reaches `min_lr` at the last step, or the peak held
(`constant`). `min_lr` counts as a rate of `lr`, so each optimizer parameter group ends at `min_lr / lr` of its own
learning rate.

`cosine` and `constant` are transformers' own `cosine_warmup_with_min_lr` schedule (`get_scheduler`): its warm-up
`(step + 1) / W` and its cosine over the `T - W` steps after it are this schedule exactly with `W = warmup_steps + 1`
and `T = total_steps + 1` (`constant` is that cosine with a floor of 1). transformers' usual warm-up `step / W`
(`cosine_with_min_lr`, `linear`, `constant_with_warmup`, `warmup_stable_decay`) would spend the first step at a
learning rate of 0, and no transformers schedule decays linearly to a floor after this warm-up, so `linear` keeps a
rule of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler

__all__ = ["lr_lambda", "lr_scheduler"]


def lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int, lr: float, min_lr: float
) -> LambdaLR:
    """The schedule of `optimizer` for a run of `total_steps` optimizer steps (see the module docstring).

    Args:
        optimizer (`torch.optim.Optimizer`): its parameter groups' learning rates are the peaks.
        schedule (`str`): `cosine`, `linear` or `constant` (`optim.schedule`).
        warmup_steps (`int`): steps of the linear warm-up (`optim.warmup_steps`).
        total_steps (`int`): optimizer steps of the run; the decay reaches the floor there.
        lr (`float`): the peak learning rate (`optim.lr`).
        min_lr (`float`): the final learning rate of the decay (`optim.min_lr`), at most `lr`.
    """
    floor = min_lr / lr
    if schedule == "linear":
        rule = partial(_linear_with_floor, warmup_steps=warmup_steps, total_steps=total_steps, floor=floor)
        return LambdaLR(optimizer, rule)
    return get_scheduler(
        "cosine_warmup_with_min_lr",
        optimizer,
        num_warmup_steps=warmup_steps + 1,
        num_training_steps=total_steps + 1,
        scheduler_specific_kwargs={"min_lr_rate": 1.0 if schedule == "constant" else floor},
    )


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int, lr: float, min_lr: float) -> Callable[[int], float]:
    """The factor that `lr_scheduler` multiplies the peak learning rate by at each step (`step -> factor`)."""
    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    return lr_scheduler(probe, schedule, warmup_steps, total_steps, lr, min_lr).lr_lambdas[0]


def _linear_with_floor(step: int, *, warmup_steps: int, total_steps: int, floor: float) -> float:
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1.0 - floor) * (1.0 - progress)
