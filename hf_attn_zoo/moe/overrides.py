"""Routing overrides resolved against a model: which MoE layers it has, and each override turned into validated
per-layer plans (`entries`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union, cast

import torch

from ..errors import InvalidOptionError, UnsupportedArchitectureError
from ..families.spec import FamilySpec, resolve_family
from ..wrappers import inner_model
from .plan import LayerPlan
from .rules import RoutingRule, missing_rule_reason, moe_families_with_rules, routing_rule

__all__ = [
    "Entry",
    "LayerKey",
    "RoutingOverride",
    "Target",
    "check_plan",
    "is_int",
    "resolve_entries",
    "resolve_override",
    "routing_target",
]

LayerKey = Union[int, str]


@dataclass
class RoutingOverride:
    """A change of routing, per MoE layer. Layer keys are the model's layer indices, or `"all"` (every MoE layer);
    a specific layer adds to `"all"` for the expert lists and wins over it for `gain` entries, `top_k` and `rank`.

    Args:
        disabled (`dict[int | str, list[int]]`, *optional*): experts masked before the top-k (replaced by the next).
        dropped (`dict[int | str, list[int]]`, *optional*): experts removed after the top-k (not replaced).
        forced (`dict[int | str, list[int]]`, *optional*): experts always selected (at most top-k of them).
        gain (`dict[int | str, dict[int, float]]`, *optional*): factor (finite, >= 0) on an expert's routing weight.
        top_k (`int | dict[int | str, int]`, *optional*): experts selected per token (1..num_experts).
        rank (`int | dict[int | str, int]`, *optional*): route each token to its `rank`-th expert alone, weight 1;
            excludes `top_k`, `forced` and `dropped` in the same layer.
        rows (`Iterable[int]`, *optional*, defaults to `None`): batch rows this override applies to (e.g.
            `range(B, 2 * B)`); `None` means every row no other override of the same installation claims.
    """

    disabled: Mapping[LayerKey, Iterable[int]] = field(default_factory=dict)
    dropped: Mapping[LayerKey, Iterable[int]] = field(default_factory=dict)
    forced: Mapping[LayerKey, Iterable[int]] = field(default_factory=dict)
    gain: Mapping[LayerKey, Mapping[int, float]] = field(default_factory=dict)
    top_k: int | Mapping[LayerKey, int] | None = None
    rank: int | Mapping[LayerKey, int] | None = None
    rows: Iterable[int] | None = None


@dataclass
class Target:
    """The MoE layers of a model and what routing them needs."""

    model: torch.nn.Module
    family: FamilySpec
    rule: RoutingRule
    num_layers: int
    layers: list[int]
    routers: dict[int, torch.nn.Module]
    blocks: dict[int, torch.nn.Module]


def routing_target(model: torch.nn.Module) -> Target:
    inner = inner_model(model)
    config = getattr(inner, "config", None)
    if config is None:
        raise UnsupportedArchitectureError(f"{type(model).__name__} is not a transformers model (it has no config)")
    family = resolve_family(config)
    layers = family.moe_layers(inner)
    supported = ", ".join(moe_families_with_rules())
    if not layers:
        raise UnsupportedArchitectureError(
            f"this {family.name} model has no MoE layer, so there is no routing to override; supported MoE "
            f"families: {supported}"
        )
    rule = routing_rule(family)
    if rule is None:
        raise UnsupportedArchitectureError(f"{missing_rule_reason(family)}; supported MoE families: {supported}")
    blocks = {i: family.mlp_module(inner, i) for i in layers}
    routers = {i: family.moe_router(inner, i) for i in layers}
    return Target(inner, family, rule, len(family.decoder_layers(inner)), layers, routers, blocks)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _by_layer(target: Target, name: str, value: Any) -> list[tuple[list[int], Any]]:
    """`[(layers, value)]` of one override field, `"all"` entries first (so specific layers win)."""
    if value is None:
        return []
    if name in ("top_k", "rank") and is_int(value):
        return [(list(target.layers), value)]
    if not isinstance(value, Mapping):
        kind = "an int or a dict {layer: int}" if name in ("top_k", "rank") else "a dict {layer: ...}"
        raise InvalidOptionError(f"RoutingOverride.{name} must be {kind}, got {value!r}")
    items: list[tuple[list[int], Any]] = []
    for key, entry in value.items():
        if key == "all":
            items.insert(0, (list(target.layers), entry))
            continue
        if not is_int(key):
            raise InvalidOptionError(
                f"RoutingOverride.{name}: layer keys are layer indices (int) or 'all', got {key!r}"
            )
        if not 0 <= key < target.num_layers:
            raise InvalidOptionError(
                f"RoutingOverride.{name}: layer {key} is out of range; the model has {target.num_layers} layers "
                f"(0..{target.num_layers - 1})"
            )
        if key not in target.routers:
            raise InvalidOptionError(
                f"RoutingOverride.{name}: layer {key} is not a MoE layer (its MLP is dense); the MoE layers of this "
                f"{target.family.name} model are {target.layers}"
            )
        items.append(([key], entry))
    return items


def _experts(name: str, layer: int, entry: Any, num_experts: int) -> set[int]:
    if isinstance(entry, (str, bytes)) or not isinstance(entry, Iterable):
        raise InvalidOptionError(f"RoutingOverride.{name}[{layer}] must be a list of expert indices, got {entry!r}")
    experts = set()
    for expert in entry:
        if not is_int(expert) or not 0 <= expert < num_experts:
            raise InvalidOptionError(
                f"RoutingOverride.{name}[{layer}]: expert {expert!r} is out of range; layer {layer} has {num_experts} "
                f"experts (0..{num_experts - 1})"
            )
        experts.add(expert)
    return experts


def resolve_override(target: Target, override: RoutingOverride) -> dict[int, LayerPlan]:
    """Validate one override against the model; its non-empty per-layer plans."""
    if not isinstance(override, RoutingOverride):
        raise InvalidOptionError(f"expected a RoutingOverride, got {type(override).__name__}")
    fields: dict[int, dict[str, Any]] = {
        i: {"disabled": set(), "dropped": set(), "forced": set(), "gain": {}} for i in target.layers
    }
    for name in ("disabled", "dropped", "forced"):
        for layers, entry in _by_layer(target, name, getattr(override, name)):
            for layer in layers:
                fields[layer][name] |= _experts(name, layer, entry, target.rule.num_experts(target.routers[layer]))
    for layers, entry in _by_layer(target, "gain", override.gain):
        if not isinstance(entry, Mapping):
            raise InvalidOptionError(f"RoutingOverride.gain values must be dicts {{expert: factor}}, got {entry!r}")
        for layer in layers:
            num_experts = target.rule.num_experts(target.routers[layer])
            for expert, factor in entry.items():
                _experts("gain", layer, [expert], num_experts)
                if (
                    isinstance(factor, bool)
                    or not isinstance(factor, (int, float))
                    or not math.isfinite(factor)
                    or factor < 0
                ):
                    raise InvalidOptionError(
                        f"RoutingOverride.gain[{layer}][{expert}] must be a finite number >= 0, got {factor!r}"
                    )
                fields[layer]["gain"][expert] = float(factor)
    for name in ("top_k", "rank"):
        for layers, entry in _by_layer(target, name, getattr(override, name)):
            if not is_int(entry):
                raise InvalidOptionError(f"RoutingOverride.{name} values must be ints, got {entry!r}")
            for layer in layers:
                fields[layer][name] = entry

    plans = {}
    for layer, f in fields.items():
        plan = LayerPlan(
            frozenset(f["disabled"]),
            frozenset(f["dropped"]),
            frozenset(f["forced"]),
            tuple(sorted(f["gain"].items())),
            f.get("top_k"),
            f.get("rank"),
        )
        if plan.is_empty():
            continue
        check_plan(target, layer, plan)
        plans[layer] = plan
    return plans


def check_plan(target: Target, layer: int, plan: LayerPlan) -> None:
    router, rule = target.routers[layer], target.rule
    num_experts = rule.num_experts(router)
    where = f"layer {layer}"
    both = plan.forced & plan.disabled
    if both:
        raise InvalidOptionError(f"{where}: experts {sorted(both)} are both forced and disabled")
    both = plan.forced & plan.dropped
    if both:
        raise InvalidOptionError(f"{where}: experts {sorted(both)} are both forced and dropped")
    capacity = rule.capacity(router, plan.disabled)
    if capacity < 1:
        raise InvalidOptionError(f"{where}: every expert is disabled, so no token could be routed")
    if plan.rank is not None:
        if plan.top_k is not None or plan.forced or plan.dropped:
            raise InvalidOptionError(
                f"{where}: rank={plan.rank} routes each token to one expert, so it excludes top_k, forced and dropped "
                "in the same layer"
            )
        if not 1 <= plan.rank <= capacity:
            raise InvalidOptionError(
                f"{where}: rank={plan.rank} is out of range; ranks go from 1 to {capacity} (the experts a token can "
                f"select{' once the disabled ones are masked' if plan.disabled else ''})"
            )
        return
    k = plan.top_k if plan.top_k is not None else cast(int, router.top_k)
    if plan.top_k is not None and not 1 <= plan.top_k <= num_experts:
        raise InvalidOptionError(f"{where}: top_k={plan.top_k} must be between 1 and num_experts={num_experts}")
    if k > capacity:
        raise InvalidOptionError(
            f"{where}: top_k={k} experts per token, but only {capacity} can be selected"
            f"{' once the disabled ones are masked' if plan.disabled else ''}"
        )
    if len(plan.forced) > k:
        raise InvalidOptionError(
            f"{where}: {len(plan.forced)} forced experts {sorted(plan.forced)} do not fit in top_k={k}"
        )
    reason = rule.check_forced(router, plan.forced) if plan.forced else None
    if reason:
        raise InvalidOptionError(f"{where}: cannot force experts {sorted(plan.forced)}: {reason}")


@dataclass(frozen=True)
class Entry:
    rows: frozenset[int] | None
    plans: dict[int, LayerPlan]


def resolve_entries(target: Target, overrides: RoutingOverride | Sequence[RoutingOverride] | None) -> list[Entry]:
    if overrides is None:
        overrides = []
    elif isinstance(overrides, RoutingOverride):
        overrides = [overrides]
    elif not isinstance(overrides, Sequence):
        raise InvalidOptionError(f"overrides must be a RoutingOverride or a list of them, got {overrides!r}")
    entries: list[Entry] = []
    claimed: set[int] = set()
    default = False
    for override in overrides:
        plans = resolve_override(target, override)
        rows = override.rows
        if rows is None:
            if default:
                raise InvalidOptionError("at most one override may leave rows=None (every row the others do not claim)")
            default = True
        else:
            if isinstance(rows, (str, bytes, torch.Tensor)) or not isinstance(rows, Iterable):
                raise InvalidOptionError(f"RoutingOverride.rows must be a list or range of row indices, got {rows!r}")
            rows = frozenset(rows)
            if not rows or not all(is_int(r) and r >= 0 for r in rows):
                raise InvalidOptionError(
                    f"RoutingOverride.rows must be non-empty and hold row indices >= 0, got {sorted(rows, key=str)}"
                )
            if rows & claimed:
                raise InvalidOptionError(
                    f"rows {sorted(rows & claimed)} are claimed by two overrides; row sets must be disjoint"
                )
            claimed |= rows
        entries.append(Entry(rows, plans))
    return entries
