"""MoA's plan search (arXiv:2406.14909, §3.3 "Automatic optimization"): one elastic rule per head by an MILP.

Candidates (MoA's grid): `alpha` in multiples of `alpha_step` from `-max_len` to `max_len`, `beta` in
`{0, 0.125, ..., 1}`, kept when the span fits the longest profiled length (`alpha + beta * max_len <= max_len`) and is
positive at the shortest (`alpha + beta * min_len > 0`); rules with the same spans at every profiled length are one.

For a unit (a KV head, its query heads' influence summed or maxed, or a query head) and a rule at profiled length `n`:
`loss_n = sum over blocks of |E| x (1 - share of the block's causal pairs the rule keeps)` (the influence of the pairs
the rule drops; exact on whole blocks, proportional inside the diagonal and sink-edge blocks), and the rule's
density is `kept causal pairs / all causal pairs` (token-exact, `rule_stats`).

MILP (`scipy.optimize.milp`, HiGHS; MoA uses Gurobi): one-hot binaries `x[u, c]`; minimise the total loss at the
primary length subject to, at every profiled length, `0.9 * budget <= mean density <= budget`, and at most
`max_rules_per_layer` distinct rules per layer (binary "rule used in layer" `y[l, c] >= x[u, c]`). Multi-objective,
simplified from MoA's epsilon-constraint Pareto set: each profiled length is the primary objective in turn, and the
plan with the lowest loss at the longest profiled length is chosen (MoA validates on an unseen longer length).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import Bounds, LinearConstraint, milp

from ..errors import InvalidOptionError
from .plan import DEFAULT_SINKS, MoAPlan, rule_span
from .profile import AttentionProfile

__all__ = ["BETAS", "SearchResult", "candidate_rules", "rule_stats", "search_plan", "uniform_beta"]

BETAS = tuple(i / 8 for i in range(9))


@dataclass
class SearchResult:
    """`plans[i]`: the plan with `lengths[i]` as the primary objective; `chosen`: the validation choice."""

    plans: list[MoAPlan]
    lengths: list[int]
    chosen: MoAPlan


def candidate_rules(lengths: list[int], alpha_step: int) -> list[tuple[float, float]]:
    """MoA's `(alpha, beta)` grid for the profiled `lengths`, one rule per distinct tuple of spans."""
    low, high = min(lengths), max(lengths)
    rules, seen = [], set()
    for beta in BETAS:
        for alpha in range(-high, high + 1, alpha_step):
            if alpha + beta * high > high or alpha + beta * low <= 0:
                continue
            spans = tuple(min(n, max(1, math.floor(alpha + beta * n))) for n in lengths)
            if spans not in seen:
                seen.add(spans)
                rules.append((float(alpha), beta))
    return rules


def rule_stats(alpha: float, beta: float, length: int, sinks: int, block: int) -> tuple[torch.Tensor, float]:
    """`(kept, density)`: per `block x block` tile the share of its causal pairs the rule keeps `[nb, nb]`, and the
    share of all causal pairs kept (query `i` keeps key `j <= i` iff `j < s` or `i - j < w`, see `plan.rule_span`)."""
    sink, window = rule_span(alpha, beta, length, sinks)
    nb = -(-length // block)
    first = torch.arange(nb)[:, None] * block
    last = torch.clamp(first + block, max=length)
    j = torch.arange(length)[None, :]
    reach = torch.where(j < sink, last, torch.minimum(last, j + window))
    start = torch.maximum(first, j)
    kept = torch.clamp(reach - start, min=0)  # [nb, length]: rows of tile-row b that keep key j
    causal = torch.clamp(last - start, min=0)
    pad = nb * block - length
    kept = torch.nn.functional.pad(kept, (0, pad)).view(nb, nb, block).sum(-1)
    causal = torch.nn.functional.pad(causal, (0, pad)).view(nb, nb, block).sum(-1)
    share = torch.where(causal > 0, kept / causal.clamp(min=1), torch.ones(()))
    return share, float(kept.sum() / causal.sum())


def uniform_beta(density: float, length: int, sinks: int = DEFAULT_SINKS) -> float:
    """The `beta` of the uniform rule `(0, beta)` whose density at `length` is closest to `density` (bisection)."""
    low, high = 0.0, 1.0
    for _ in range(40):
        mid = (low + high) / 2
        if rule_stats(0.0, mid, length, sinks, length)[1] < density:
            low = mid
        else:
            high = mid
    return high


def _units(influence: torch.Tensor, model: dict, granularity: str, reduce: str) -> torch.Tensor:
    """`[layers, units, nb, nb]`: per KV head (its group's query heads reduced) or per query head."""
    if granularity == "head":
        return influence
    layers, heads = influence.shape[:2]
    grouped = influence.view(layers, model["num_kv_heads"], heads // model["num_kv_heads"], *influence.shape[2:])
    return grouped.sum(2) if reduce == "sum" else grouped.amax(2)


def _solve(
    loss: np.ndarray,
    densities: np.ndarray,
    layers: int,
    budget: float,
    max_rules: int | None,
    time_limit: float,
    gap: float,
) -> tuple[np.ndarray, str]:
    """One-hot rule index per unit minimising `loss` `[U, C]` under the density band at every length `[N, C]`."""
    units, rules = loss.shape
    per_layer = units // layers
    nx, ny = units * rules, (layers * rules if max_rules else 0)
    scale = float(np.abs(loss).max()) or 1.0
    cost = np.concatenate([loss.ravel() / scale, np.zeros(ny)])
    rows = [sp.hstack([sp.kron(sp.eye(units), np.ones((1, rules))), sp.csr_matrix((units, ny))])]
    lower, upper = [np.ones(units)], [np.ones(units)]
    for d in densities:
        rows.append(sp.csr_matrix(np.concatenate([np.tile(d, units) / units, np.zeros(ny)])[None]))
        lower.append(np.array([0.9 * budget]))
        upper.append(np.array([budget]))
    if max_rules:
        unit_layer = sp.kron(sp.eye(layers), np.ones((per_layer, 1)))
        link = sp.hstack([sp.eye(nx), -sp.kron(unit_layer, sp.eye(rules))])
        rows += [link, sp.hstack([sp.csr_matrix((layers, nx)), sp.kron(sp.eye(layers), np.ones((1, rules)))])]
        lower += [np.full(nx, -np.inf), np.zeros(layers)]
        upper += [np.zeros(nx), np.full(layers, max_rules)]
    constraints = LinearConstraint(sp.vstack(rows).tocsr(), np.concatenate(lower), np.concatenate(upper))
    result = milp(
        cost,
        constraints=constraints,
        integrality=np.ones(nx + ny),
        bounds=Bounds(0, 1),
        options={"time_limit": time_limit, "mip_rel_gap": gap},
    )
    if result.x is None:
        raise InvalidOptionError(
            f"moa search: the MILP found no plan ({result.message}); raise the density budget, "
            "max_rules_per_layer or time_limit."
        )
    return result.x[:nx].reshape(units, rules).argmax(1), result.message


def search_plan(
    profile: AttentionProfile,
    density: float = 0.5,
    sinks: int = DEFAULT_SINKS,
    alpha_step: int | None = None,
    max_rules_per_layer: int | None = 2,
    granularity: Literal["kv_head", "head"] = "kv_head",
    group_reduce: Literal["sum", "max"] = "sum",
    time_limit: float = 30.0,
    gap: float = 0.01,
    profile_name: str | None = None,
) -> SearchResult:
    """Plans for `profile` under a mean-density budget (see the module docstring).

    Args:
        profile (`AttentionProfile`): from `hf_attn_zoo.moa.profile`.
        density (`float`, *optional*, defaults to 0.5): budget on the mean density (MoA: 0.5), in (0, 1].
        sinks (`int`, *optional*, defaults to 64): sink tokens of every rule (MoA: 64).
        alpha_step (`int`, *optional*): grid step of `alpha` (default: an eighth of the shortest length, at least
            one block; MoA uses 1024 with 2k-8k profiles).
        max_rules_per_layer (`int`, *optional*, defaults to 2): distinct rules per layer (None: no limit).
        granularity (`str`, *optional*, defaults to `"kv_head"`): one rule per KV head or per query head.
        group_reduce (`str`, *optional*, defaults to `"sum"`): how a KV head's query heads' influence combine (sum:
            the loss of masking all of them alike; max: MoA's `--num_key_value_groups` reduction).
        time_limit (`float`, *optional*, defaults to 30): seconds per MILP (the best plan found so far is kept).
        gap (`float`, *optional*, defaults to 0.01): relative optimality gap at which HiGHS stops (0: prove the
            optimum, which can take minutes for 90 KV heads; 1% is reached in about a second).
        profile_name (`str`, *optional*): recorded in the plans' provenance.
    """
    if not 0.0 < density <= 1.0:
        raise InvalidOptionError(f"moa search: density={density} must be in (0, 1].")
    if granularity not in ("kv_head", "head") or group_reduce not in ("sum", "max"):
        raise InvalidOptionError("moa search: granularity must be 'kv_head' or 'head', group_reduce 'sum' or 'max'.")
    lengths = profile.lengths
    block = profile.block_size
    step = alpha_step or max(block, min(lengths) // 8)
    rules = candidate_rules(lengths, step)
    stats = {n: [rule_stats(a, b, n, sinks, block) for a, b in rules] for n in lengths}
    densities = np.array([[d for _, d in stats[n]] for n in lengths])
    for n, row in zip(lengths, densities):
        if row.min() > density + 1e-12:
            raise InvalidOptionError(
                f"moa search: density={density} is infeasible: the minimum achievable density at "
                f"length {n} is {row.min():.3f} (sinks={sinks}, alpha_step={step}); raise the "
                "budget or lower sinks."
            )
    losses = {}
    for n in lengths:
        if not bool(torch.isfinite(profile.influence[n]).all()):
            raise InvalidOptionError(
                f"moa search: the profile's influence at length {n} is not finite; re-profile (in float32 or wider)."
            )
        units = _units(profile.influence[n].double(), profile.model, granularity, group_reduce)
        dropped = torch.stack([1 - share.double() for share, _ in stats[n]]).flatten(1)  # [C, nb*nb]
        losses[n] = (units.flatten(2) @ dropped.T).flatten(0, 1).numpy()  # [L*units, C]
    layers = profile.model["num_layers"]
    per_layer = losses[lengths[0]].shape[0] // layers
    plans = []
    for primary in lengths:
        choice, status = _solve(losses[primary], densities, layers, density, max_rules_per_layer, time_limit, gap)
        picked = [rules[c] for c in choice]
        alphas = [[_number(a) for a, _ in picked[i * per_layer : (i + 1) * per_layer]] for i in range(layers)]
        betas = [[b for _, b in picked[i * per_layer : (i + 1) * per_layer]] for i in range(layers)]
        loss = {str(n): float(losses[n][np.arange(len(choice)), choice].sum()) for n in lengths}
        dens = {str(n): float(densities[i][choice].mean()) for i, n in enumerate(lengths)}
        plans.append(
            MoAPlan(
                model=dict(profile.model),
                alphas=alphas,
                betas=betas,
                granularity=granularity,
                length=max(lengths),
                sinks=sinks,
                density=dens[str(max(lengths))],
                provenance={
                    "profile": profile_name,
                    "budget": density,
                    "lengths": lengths,
                    "block_size": block,
                    "alpha_step": step,
                    "candidates": len(rules),
                    "max_rules_per_layer": max_rules_per_layer,
                    "gap": gap,
                    "group_reduce": group_reduce,
                    "primary_length": primary,
                    "loss": loss,
                    "density": dens,
                    "solver": f"scipy.optimize.milp (HiGHS): {status}",
                    "profile_metadata": {k: v for k, v in profile.metadata.items() if k in ("corpus", "samples")},
                },
            )
        )
    longest = str(max(lengths))
    chosen = min(plans, key=lambda p: p.provenance["loss"][longest])
    chosen.provenance["choice"] = (
        f"lowest influence loss at the longest profiled length ({longest}) among the plans "
        f"with primary lengths {lengths}"
    )
    return SearchResult(plans, lengths, chosen)


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value
