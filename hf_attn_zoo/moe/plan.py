"""One MoE layer's resolved routing override (`LayerPlan`), its masks on a device, and merging plans."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = ["LayerPlan", "describe_plan", "describe_rows", "merge_plans", "plan_tensors"]


@dataclass(frozen=True)
class LayerPlan:
    """One layer's resolved, validated override."""

    disabled: frozenset[int] = frozenset()
    dropped: frozenset[int] = frozenset()
    forced: frozenset[int] = frozenset()
    gain: tuple[tuple[int, float], ...] = ()
    top_k: int | None = None
    rank: int | None = None

    def is_empty(self) -> bool:
        return (
            not (self.disabled or self.dropped or self.forced or self.gain) and self.top_k is None and self.rank is None
        )


# an lru_cache, not a dict filled on first use: torch.compile traces through it (a small graph of constants) where it
# would guard on the dict and recompile once it fills
@functools.lru_cache(maxsize=256)
def plan_tensors(plan: LayerPlan, num_experts: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The plan's expert masks (`disabled`, `dropped`, `forced`) and gain vector on `device`."""
    tensors = {}
    for name in ("disabled", "dropped", "forced"):
        mask = torch.zeros(num_experts, dtype=torch.bool)
        mask[list(getattr(plan, name))] = True
        tensors[name] = mask.to(device)
    gain = torch.ones(num_experts, dtype=torch.float32)
    for expert, factor in plan.gain:
        gain[expert] = factor
    tensors["gain"] = gain.to(device)
    return tensors


def merge_plans(base: LayerPlan, extra: LayerPlan) -> LayerPlan:
    """`extra` on top of `base` (one layer): the union of their disabled, dropped and forced experts, the gains of
    both (`extra`'s factor wins for an expert in both), and `extra`'s `top_k` or `rank` when it sets either (it then
    replaces `base`'s selection size), else `base`'s. Not validated: see `check_plan`."""
    gain = dict(base.gain)
    gain.update(extra.gain)
    sized = extra.top_k is not None or extra.rank is not None
    return LayerPlan(
        disabled=base.disabled | extra.disabled,
        dropped=base.dropped | extra.dropped,
        forced=base.forced | extra.forced,
        gain=tuple(sorted(gain.items())),
        top_k=extra.top_k if sized else base.top_k,
        rank=extra.rank if sized else base.rank,
    )


def describe_plan(plan: LayerPlan) -> str:
    """A layer plan in words, for error messages (`"disabled experts [0], rank=2"`)."""
    parts = [
        f"{name} experts {sorted(getattr(plan, name))}"
        for name in ("disabled", "dropped", "forced")
        if getattr(plan, name)
    ]
    if plan.gain:
        parts.append(f"gains {dict(plan.gain)}")
    parts += [f"{name}={getattr(plan, name)}" for name in ("top_k", "rank") if getattr(plan, name) is not None]
    return ", ".join(parts) or "no change"


def describe_rows(rows: frozenset[int]) -> str:
    first, last = min(rows), max(rows)
    return f"{first}..{last}" if len(rows) == last - first + 1 else str(sorted(rows))
