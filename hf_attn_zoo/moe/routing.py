"""Routing overrides for every MoE family: mask, drop, force or re-weight experts, change top-k, route by rank.

This is the mechanism under SCMoE (Self-Contrast MoE, arXiv:2405.14507: a strong and a weak routing of the same
model) and MoTE (Mixture of Tunable Experts, arXiv:2502.11096: switch experts off or force them on). It changes
how the router of each MoE layer turns its logits into `(top_k_weights, top_k_index)`; the experts, the logits and
every parameter stay as they are.

How it works: `set_routing` replaces the `forward` of each router *instance* (no new modules, parameters or
buffers, so the state dict is unchanged) with a wrapper that calls the router's own forward, and then, for the
tokens an override applies to, recomputes the selection from the router logits with the family's **routing
rule**, which reproduces the transformers router exactly when nothing is overridden. A family names the kind of its
rule in its spec (`mlp.routing`, see `families/spec.py`); the kinds (`ROUTING_RULES`):

- softmax_topk: softmax (fp32) -> top-k -> renormalise always (Mixtral, fp32 weights) or iff `norm_topk_prob`
  (Qwen-MoE, OLMoE, FlexOlmo; weights in the logits' dtype).
- grouped_sigmoid: sigmoid scores; selection on scores + `e_score_correction_bias`, limited to the `topk_group` best
  of `n_group` groups (group score = sum of its 2 best); weights from the *unbiased* scores, renormalised iff
  `norm_topk_prob`, times `routed_scaling_factor` (DeepSeek-V3, GLM-4-MoE, dots1).
- topk_softmax: top-k on the logits (with the router bias where it has one), softmax over the k picked logits
  (GPT-OSS, GraniteMoE).

A forward pre-hook on each MoE block records the `(batch, length)` shape of its input, so overrides can be limited
to some rows of the batch (`RoutingOverride.rows`): the router sees the tokens flattened row-major, token `n` is
row `n // length`. Rows that no override claims are routed normally, by the router's own output. When overrides
with different numbers of selected experts meet in one batch, shorter selections are padded with zero-weight
slots (the token's first expert, weight 0, `active=False`), so every expert implementation works unchanged.

Override semantics (per MoE layer):

- `disabled`: its router logit counts as -inf before the top-k, so the next-ranked expert takes the place (the
  top-k count is unchanged); for the softmax families it also leaves the softmax, as if the model did not have it
  (this changes the weights only where they are not renormalised, i.e. `norm_topk_prob=False`).
- `dropped`: removed after the top-k; the remaining weights are renormalised if the family renormalises (for
  GPT-OSS: softmax over the remaining picked logits), otherwise just left out. No replacement, fewer experts run.
- `forced`: always in the top-k, taking the place of the lowest-ranked ones; their weights come from the family's
  own scores (DeepSeek-V3: a forced expert's group is always among the selected groups).
- `gain`: multiplies an expert's final routing weight (after renormalisation and scaling); nothing else changes.
- `top_k`: the number of experts selected (the router's `top_k` otherwise).
- `rank`: only the expert ranked `rank` (1-based) by the family's selection order, with weight 1 (for DeepSeek-V3
  too: no `routed_scaling_factor`): SCMoE's "rank-k" weak routing (Eq. 4). The order is the one the family's top-k
  uses (DeepSeek-V3: biased scores within the selected groups). Disabled experts are skipped; `gain` still applies.

Example:
    >>> from hf_attn_zoo.moe import RoutingOverride, routing_override, set_routing
    >>> with routing_override(model, RoutingOverride(disabled={"all": [3]}, top_k=1)):
    ...     logits = model(ids).logits
    >>> # SCMoE in one batched forward: rows 0..B-1 normal, rows B..2B-1 rank-2
    >>> handle = set_routing(model, RoutingOverride(rank=2, rows=range(B, 2 * B)), record=True)
    >>> out = model(torch.cat([ids, ids]))
    >>> handle.decisions[layer].index   # (2B*T, k) experts of the last forward (and .weight, .active)
    >>> handle.remove()

Overrides on top of installed ones: `with_row_override(model, override, rows)` routes some batch rows by `override`
for a `with` block. With nothing installed it is `set_routing` limited to `rows`; on a model that already carries
overrides applying to every row (a MoTE patch, `switch_experts`, a `set_routing` without `rows`) it swaps the
installed overrides, for the block, for two: the other rows keep them, `rows` get them merged with `override` per
layer (`_merge_plans`). SCMoE's weak pass uses it, so SCMoE runs on a MoTE-patched model.

Limits: a GPT-OSS MLP whose forward was replaced by a hub kernel (`use_kernels=True`, MegaBlocks) never calls its
router, so overrides do not reach it; random jitter noise (Mixtral training) is applied before the router and is
unaffected.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import math
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from ..errors import InvalidOptionError, PatchConflictError, UnsupportedArchitectureError
from ..families.spec import FamilySpec, RoutingSpec, family_specs, resolve_family
from ..wrappers import inner_model

__all__ = [
    "ROUTING_RULES",
    "GroupedSigmoidRule",
    "RoutingDecision",
    "RoutingHandle",
    "RoutingOverride",
    "RoutingRule",
    "SoftmaxTopKRule",
    "TopKSoftmaxRule",
    "moe_families_with_rules",
    "register_routing_rule",
    "routing_rule",
    "route",
    "routing_override",
    "set_routing",
    "with_row_override",
]

LayerKey = Union[int, str]
_STATE = "_zoo_routing"
_SHAPE = "_zoo_routing_shape"
_HANDLE = "_zoo_routing_handle"


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
class RoutingDecision:
    """What one router selected in one call (detached).

    Attributes:
        logits (`torch.Tensor`): `(N, E)` router logits (N = batch * length tokens, row-major).
        index (`torch.Tensor`): `(N, k)` selected experts.
        weight (`torch.Tensor`): `(N, k)` their routing weights (0 in inactive slots).
        active (`torch.Tensor`): `(N, k)` bool; False for dropped experts and padding slots.
        shape (`tuple[int, int] | None`): `(batch, length)` of the MoE block input, when known.
    """

    logits: torch.Tensor
    index: torch.Tensor
    weight: torch.Tensor
    active: torch.Tensor
    shape: tuple[int, int] | None = None

    def counts(self, num_experts: int | None = None) -> torch.Tensor:
        """`(E,)` number of active (token, expert) selections per expert."""
        num_experts = num_experts or self.logits.shape[-1]
        return torch.bincount(self.index[self.active].reshape(-1), minlength=num_experts)


@dataclass(frozen=True)
class _LayerPlan:
    """One layer's resolved, validated override."""

    disabled: frozenset[int] = frozenset()
    dropped: frozenset[int] = frozenset()
    forced: frozenset[int] = frozenset()
    gain: tuple[tuple[int, float], ...] = ()
    top_k: int | None = None
    rank: int | None = None

    def is_empty(self) -> bool:
        return not (self.disabled or self.dropped or self.forced or self.gain) and self.top_k is None \
            and self.rank is None


class RoutingRule(abc.ABC):
    """How one family's router turns its logits into `(weights, index)`, with the override hooks.

    Subclasses implement `scores` (the quantity ranked for selection and the one the weights come from),
    `select` (the top-k) and `weigh` (weights of the selected experts); the generic `apply` adds masking, forcing,
    dropping, gain and rank on top. With an empty plan `apply` reproduces the transformers router bit for bit.
    """

    def num_experts(self, router: torch.nn.Module) -> int:
        return int(router.weight.shape[0])

    @abc.abstractmethod
    def scores(self, router: torch.nn.Module, logits: torch.Tensor, disabled: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(choice, weight_scores)`, both `(N, E)`: the selection ranks `choice`, the weights use `weight_scores`.

        `disabled` (`(E,)` bool, or None): experts whose logit counts as -inf (the caller also masks `choice`).
        """

    def select(self, router: torch.nn.Module, choice: torch.Tensor, k: int, ordered: bool, masked: bool
               ) -> torch.Tensor:
        """`(N, k)` indices of the top-k of `choice` (decreasing when `ordered`; `masked`: it holds -inf entries)."""
        return torch.topk(choice, k, dim=-1).indices

    @abc.abstractmethod
    def weigh(self, router: torch.nn.Module, weight_scores: torch.Tensor, logits: torch.Tensor, index: torch.Tensor,
              active: torch.Tensor | None) -> torch.Tensor:
        """`(N, k)` weights of the selected experts; `active` (or None: all) marks the ones not dropped."""

    def weight_dtype(self, router: torch.nn.Module, logits: torch.Tensor) -> torch.dtype:
        return logits.dtype

    def capacity(self, router: torch.nn.Module, disabled: frozenset[int]) -> int:
        """How many experts a token can always select once `disabled` are masked."""
        return self.num_experts(router) - len(disabled)

    def check_forced(self, router: torch.nn.Module, forced: frozenset[int]) -> str | None:
        """Why this set of forced experts cannot all be selected, or None."""
        return None

    def apply(self, router: torch.nn.Module, logits: torch.Tensor, plan: _LayerPlan
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`(weights, index, active)` of `logits` `(N, E)` under `plan` (active None: every slot is active)."""
        masks = _plan_tensors(plan, self.num_experts(router), logits.device)
        disabled = masks["disabled"] if plan.disabled else None
        choice, weight_scores = self.scores(router, logits, disabled)
        if disabled is not None:
            choice = choice.masked_fill(disabled, float("-inf"))
        if plan.forced:
            choice = choice.masked_fill(masks["forced"], float("inf"))
        masked = disabled is not None
        if plan.rank is not None:
            index = self.select(router, choice, plan.rank, ordered=True, masked=masked)[:, plan.rank - 1:]
            weights = torch.ones(index.shape, dtype=self.weight_dtype(router, logits), device=logits.device)
            active = None
        else:
            k = plan.top_k if plan.top_k is not None else router.top_k
            index = self.select(router, choice, k, ordered=False, masked=masked)
            active = ~masks["dropped"][index] if plan.dropped else None
            weights = self.weigh(router, weight_scores, logits, index, active)
        if plan.gain:
            weights = weights * masks["gain"].to(weights.dtype)[index]
        return weights, index, active


class SoftmaxTopKRule(RoutingRule):
    """`softmax_topk` (Mixtral, Qwen-MoE, OLMoE): softmax over all experts (fp32), top-k, renormalise.

    Args:
        always_renormalise (`bool`): Mixtral; otherwise the router's `norm_topk_prob` decides.
        cast_back (`bool`): return the weights in the logits' dtype (Qwen, OLMoE) instead of fp32 (Mixtral).
    """

    def __init__(self, always_renormalise: bool, cast_back: bool):
        self.always_renormalise = always_renormalise
        self.cast_back = cast_back

    def scores(self, router, logits, disabled):
        if disabled is not None:
            # a disabled expert is left out of the softmax too, as if the model did not have it
            logits = logits.masked_fill(disabled, float("-inf"))
        # fp32 softmax as the families' own routers; `weigh` casts back where the family does
        if self.cast_back:
            probs = torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1)
        else:
            probs = torch.nn.functional.softmax(logits.float(), dim=-1)
        return probs, probs

    def weigh(self, router, weight_scores, logits, index, active):
        weights = weight_scores.gather(-1, index)
        if active is not None:
            weights = weights.masked_fill(~active, 0.0)
        if self.always_renormalise or router.norm_topk_prob:
            total = weights.sum(dim=-1, keepdim=True)
            if active is not None:
                total = torch.where(total > 0, total, torch.ones_like(total))  # every expert of the token dropped
            weights = weights / total
        return weights.to(logits.dtype) if self.cast_back else weights

    def weight_dtype(self, router, logits):
        return logits.dtype if self.cast_back else torch.float32


class GroupedSigmoidRule(RoutingRule):
    """`grouped_sigmoid` (DeepSeek-V3, GLM-4-MoE, dots1): sigmoid scores, selection on scores +
    `e_score_correction_bias` within the `topk_group` best groups (group score = sum of its 2 best), weights from the
    unbiased scores, renormalised iff `norm_topk_prob`, times `routed_scaling_factor`."""

    def scores(self, router, logits, disabled):
        scores = logits.sigmoid()
        return scores + router.e_score_correction_bias, scores

    def select(self, router, choice, k, ordered, masked):
        groups, per_group = router.num_group, self.num_experts(router) // router.num_group
        best_two = choice.view(-1, groups, per_group).topk(2, dim=-1)[0]
        if masked:
            # disabled experts: a group scores with the experts it has left, a group with none is never chosen
            empty = torch.isneginf(best_two[..., 0])
            group_scores = best_two.masked_fill(torch.isneginf(best_two), 0.0).sum(dim=-1)
            group_scores = group_scores.masked_fill(empty, float("-inf"))
        else:
            group_scores = best_two.sum(dim=-1)
        group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, groups, per_group).reshape(-1, groups * per_group)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        return torch.topk(choice, k=k, dim=-1, sorted=ordered)[1]

    def weigh(self, router, weight_scores, logits, index, active):
        weights = weight_scores.gather(1, index)
        if active is not None:
            weights = weights.masked_fill(~active, 0.0)
        if router.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * router.routed_scaling_factor

    def weight_dtype(self, router, logits):
        return torch.float32

    def capacity(self, router, disabled):
        per_group = self.num_experts(router) // router.num_group
        left = [per_group - sum(e // per_group == g for e in disabled) for g in range(router.num_group)]
        # the selected groups can be any `topk_group` of those with an expert left: count the worst case
        return sum(sorted(c for c in left if c)[: router.topk_group])

    def check_forced(self, router, forced):
        per_group = self.num_experts(router) // router.num_group
        groups = sorted({e // per_group for e in forced})
        if len(groups) > router.topk_group:
            return (f"the forced experts lie in {len(groups)} expert groups {groups}, but only topk_group="
                    f"{router.topk_group} groups are selected per token (groups of {per_group} experts)")
        return None


class TopKSoftmaxRule(RoutingRule):
    """`topk_softmax` (GPT-OSS, GraniteMoE): top-k on the logits (weight @ x, + bias where the router has one),
    softmax over the k picked logits."""

    def scores(self, router, logits, disabled):
        return logits, logits

    def weigh(self, router, weight_scores, logits, index, active):
        picked = logits.gather(-1, index)
        if active is None:
            return torch.nn.functional.softmax(picked, dim=1, dtype=picked.dtype)
        weights = torch.nn.functional.softmax(picked.masked_fill(~active, float("-inf")), dim=1, dtype=picked.dtype)
        return weights.masked_fill(~active, 0.0)  # also the NaN of a token whose experts were all dropped


RuleFactory = Callable[[RoutingSpec], RoutingRule]

ROUTING_RULES: dict[str, RuleFactory] = {
    "softmax_topk": lambda spec: SoftmaxTopKRule(always_renormalise=spec.renormalise == "always",
                                                 cast_back=spec.weights == "logits"),
    "grouped_sigmoid": lambda spec: GroupedSigmoidRule(),
    "topk_softmax": lambda spec: TopKSoftmaxRule(),
}


def register_routing_rule(kind: str, factory: RuleFactory, overwrite: bool = False) -> None:
    """Add a kind of routing rule; a family spec names it as `mlp.routing.rule`. `factory` builds the rule from the
    family's `RoutingSpec`."""
    if kind in ROUTING_RULES and not overwrite:
        raise InvalidOptionError(f"routing rule {kind!r} already exists; pass overwrite=True to replace it")
    ROUTING_RULES[kind] = factory


def routing_rule(family: FamilySpec) -> RoutingRule | None:
    """The routing rule of a MoE family, or None where its spec names none (or a kind that is not registered)."""
    spec = family.mlp.routing
    factory = ROUTING_RULES.get(spec.rule) if spec is not None else None
    return factory(spec) if factory is not None else None


def missing_rule_reason(family: FamilySpec) -> str:
    """Why `family` has no routing rule, and the fix."""
    spec = family.mlp.routing
    if spec is None:
        return (f"its router has no routing rule: if it works like one of {', '.join(ROUTING_RULES)}, declare "
                f"`mlp.routing` in hf_attn_zoo/families/{family.name}.yaml (see families/spec.py RoutingSpec)")
    return (f"its routing rule {spec.rule!r} is not registered (known: {', '.join(ROUTING_RULES)}); add it with "
            "hf_attn_zoo.moe.register_routing_rule")


def moe_families_with_rules() -> list[str]:
    """The shipped MoE families whose routing the overrides reproduce."""
    return sorted(name for name, spec in family_specs().items() if spec.mlp.kind == "moe" and routing_rule(spec))


# (plan, num_experts, device) -> the plan's expert masks and gain vector on that device
_PLAN_TENSORS: dict[tuple, dict[str, torch.Tensor]] = {}


def _plan_tensors(plan: _LayerPlan, num_experts: int, device: torch.device) -> dict[str, torch.Tensor]:
    cache = _PLAN_TENSORS.get((plan, num_experts, device))
    if cache is None:
        cache = {}
        for name in ("disabled", "dropped", "forced"):
            mask = torch.zeros(num_experts, dtype=torch.bool)
            mask[list(getattr(plan, name))] = True
            cache[name] = mask.to(device)
        gain = torch.ones(num_experts, dtype=torch.float32)
        for expert, factor in plan.gain:
            gain[expert] = factor
        cache["gain"] = gain.to(device)
        if len(_PLAN_TENSORS) > 256:
            _PLAN_TENSORS.clear()
        _PLAN_TENSORS[(plan, num_experts, device)] = cache
    return cache


@dataclass
class _Target:
    """The MoE layers of a model and what routing them needs."""

    model: torch.nn.Module
    family: FamilySpec
    rule: RoutingRule
    num_layers: int
    layers: list[int]
    routers: dict[int, torch.nn.Module]
    blocks: dict[int, torch.nn.Module]


def _target(model: torch.nn.Module) -> _Target:
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
    return _Target(inner, family, rule, len(family.decoder_layers(inner)), layers, routers, blocks)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _by_layer(target: _Target, name: str, value: Any) -> list[tuple[list[int], Any]]:
    """`[(layers, value)]` of one override field, `"all"` entries first (so specific layers win)."""
    if value is None:
        return []
    if name in ("top_k", "rank") and _is_int(value):
        return [(list(target.layers), value)]
    if not isinstance(value, Mapping):
        kind = "an int or a dict {layer: int}" if name in ("top_k", "rank") else "a dict {layer: ...}"
        raise InvalidOptionError(f"RoutingOverride.{name} must be {kind}, got {value!r}")
    items = []
    for key, entry in value.items():
        if key == "all":
            items.insert(0, (list(target.layers), entry))
            continue
        if not _is_int(key):
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
        if not _is_int(expert) or not 0 <= expert < num_experts:
            raise InvalidOptionError(
                f"RoutingOverride.{name}[{layer}]: expert {expert!r} is out of range; layer {layer} has {num_experts} "
                f"experts (0..{num_experts - 1})"
            )
        experts.add(expert)
    return experts


def _resolve(target: _Target, override: RoutingOverride) -> dict[int, _LayerPlan]:
    """Validate one override against the model; its non-empty per-layer plans."""
    if not isinstance(override, RoutingOverride):
        raise InvalidOptionError(f"expected a RoutingOverride, got {type(override).__name__}")
    fields: dict[int, dict[str, Any]] = {i: {"disabled": set(), "dropped": set(), "forced": set(), "gain": {}}
                                         for i in target.layers}
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
                if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) \
                        or factor < 0:
                    raise InvalidOptionError(
                        f"RoutingOverride.gain[{layer}][{expert}] must be a finite number >= 0, got {factor!r}"
                    )
                fields[layer]["gain"][expert] = float(factor)
    for name in ("top_k", "rank"):
        for layers, entry in _by_layer(target, name, getattr(override, name)):
            if not _is_int(entry):
                raise InvalidOptionError(f"RoutingOverride.{name} values must be ints, got {entry!r}")
            for layer in layers:
                fields[layer][name] = entry

    plans = {}
    for layer, f in fields.items():
        plan = _LayerPlan(frozenset(f["disabled"]), frozenset(f["dropped"]), frozenset(f["forced"]),
                          tuple(sorted(f["gain"].items())), f.get("top_k"), f.get("rank"))
        if plan.is_empty():
            continue
        _check_plan(target, layer, plan)
        plans[layer] = plan
    return plans


def _check_plan(target: _Target, layer: int, plan: _LayerPlan) -> None:
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
    k = plan.top_k if plan.top_k is not None else int(router.top_k)
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
class _Entry:
    rows: frozenset[int] | None
    plans: dict[int, _LayerPlan]


def _entries(target: _Target, overrides: RoutingOverride | Sequence[RoutingOverride] | None) -> list[_Entry]:
    if overrides is None:
        overrides = []
    elif isinstance(overrides, RoutingOverride):
        overrides = [overrides]
    elif not isinstance(overrides, Sequence):
        raise InvalidOptionError(f"overrides must be a RoutingOverride or a list of them, got {overrides!r}")
    entries, claimed, default = [], set(), False
    for override in overrides:
        plans = _resolve(target, override)
        rows = override.rows
        if rows is None:
            if default:
                raise InvalidOptionError("at most one override may leave rows=None (every row the others do not claim)")
            default = True
        else:
            if isinstance(rows, (str, bytes, torch.Tensor)) or not isinstance(rows, Iterable):
                raise InvalidOptionError(f"RoutingOverride.rows must be a list or range of row indices, got {rows!r}")
            rows = frozenset(rows)
            if not rows or not all(_is_int(r) and r >= 0 for r in rows):
                raise InvalidOptionError(
                    f"RoutingOverride.rows must be non-empty and hold row indices >= 0, got {sorted(rows, key=str)}"
                )
            if rows & claimed:
                raise InvalidOptionError(
                    f"rows {sorted(rows & claimed)} are claimed by two overrides; row sets must be disjoint"
                )
            claimed |= rows
        entries.append(_Entry(rows, plans))
    return entries


class RoutingHandle:
    """What `set_routing` returns: `remove()` restores the routers exactly, `update()` swaps the overrides.

    Attributes:
        layers (`list[int]`): the MoE layers whose routers are wrapped.
        decisions (`dict[int, RoutingDecision]`): with `record=True`, each layer's routing in the last forward.
    """

    def __init__(self, target: _Target, entries: list[_Entry], record: bool,
                 on_route: Callable[[int, RoutingDecision], None] | None):
        self._target = target
        self._entries = entries
        self._record = record
        self._on_route = on_route
        self._undo: list[Callable[[], None]] = []
        self._rows_cache: dict[tuple, list[torch.Tensor]] = {}
        self.layers = list(target.layers)
        self.decisions: dict[int, RoutingDecision] = {}
        self.removed = False

    def update(self, overrides: RoutingOverride | Sequence[RoutingOverride] | None) -> None:
        """Replace the installed overrides (validated first; on error the old ones stay)."""
        if self.removed:
            raise InvalidOptionError("this routing handle was removed; call set_routing again")
        self._entries = _entries(self._target, overrides)
        self._rows_cache = {}

    def remove(self) -> None:
        """Restore every router's forward and remove the hooks (idempotent)."""
        if self.removed:
            return
        while self._undo:
            self._undo.pop()()
        if self._target.model.__dict__.get(_HANDLE) is self:
            del self._target.model.__dict__[_HANDLE]
        self.removed = True

    def __enter__(self) -> RoutingHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def _token_groups(self, layer: int, num_tokens: int, shape: tuple[int, int] | None, device: torch.device
                      ) -> list[tuple[_LayerPlan, torch.Tensor | None]]:
        """`[(plan, token indices or None = all tokens)]` of the overrides with a plan in this layer."""
        entries = self._entries
        active = [(e, e.plans[layer]) for e in entries if layer in e.plans]
        if not active:
            return []
        if len(entries) == 1 and entries[0].rows is None:
            return [(active[0][1], None)]
        if shape is None or shape[0] * shape[1] != num_tokens:
            raise InvalidOptionError(
                f"layer {layer}: row-limited routing overrides need the (batch, length) shape of the MoE block input, "
                "but the router was called outside its MoE block"
            )
        key = (tuple(shape), device)
        tokens = self._rows_cache.get(key)
        if tokens is None:
            batch, length = shape
            row_of_token = torch.arange(num_tokens, device=device) // length
            tokens, claimed = [], set()
            for entry in entries:
                if entry.rows is None:
                    tokens.append(None)
                    continue
                if max(entry.rows) >= batch:
                    raise InvalidOptionError(
                        f"routing override rows {sorted(r for r in entry.rows if r >= batch)} are out of range for a "
                        f"batch of {batch} rows"
                    )
                claimed |= entry.rows
                rows = torch.tensor(sorted(entry.rows), device=device)
                tokens.append(torch.isin(row_of_token, rows).nonzero().squeeze(-1))
            rest = torch.tensor(sorted(set(range(batch)) - claimed), device=device, dtype=torch.long)
            tokens = [torch.isin(row_of_token, rest).nonzero().squeeze(-1) if t is None else t for t in tokens]
            if len(self._rows_cache) > 16:
                self._rows_cache.clear()
            self._rows_cache[key] = tokens
        return [(entry.plans[layer], tokens[i]) for i, entry in enumerate(entries) if layer in entry.plans]


@dataclass
class _RouterState:
    handle: RoutingHandle
    layer: int
    rule: RoutingRule
    original: Any  # the instance's own `forward` attribute before ours, or None (the class's)

    def call_original(self, router: torch.nn.Module, hidden_states: torch.Tensor) -> Any:
        if self.original is None:
            return type(router).forward(router, hidden_states)
        return self.original(hidden_states)

    def restore(self, router: torch.nn.Module) -> None:
        router.__dict__.pop(_STATE, None)
        router.__dict__.pop(_SHAPE, None)
        if self.original is None:
            router.__dict__.pop("forward", None)
        else:
            router.__dict__["forward"] = self.original


def _pad(tensor: torch.Tensor, width: int, fill: torch.Tensor | float | bool) -> torch.Tensor:
    if tensor.shape[1] == width:
        return tensor
    if isinstance(fill, torch.Tensor):
        extra = fill.expand(-1, width - tensor.shape[1])
    else:
        extra = tensor.new_full((tensor.shape[0], width - tensor.shape[1]), fill)
    return torch.cat([tensor, extra], dim=1)


def _routed_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> Any:
    state: _RouterState = self.__dict__[_STATE]
    shape = self.__dict__.pop(_SHAPE, None)
    if hidden_states.dim() == 3:  # DeepSeek-V3 routes the unflattened block input
        shape = tuple(hidden_states.shape[:2])
    output = state.call_original(self, hidden_states)
    handle = state.handle
    logits, weights, index = output
    groups = handle._token_groups(state.layer, logits.shape[0], shape, logits.device)
    active = None
    if groups:
        if len(groups) == 1 and groups[0][1] is None:
            new_weights, index, active = state.rule.apply(self, logits, groups[0][0])
            weights = new_weights.to(weights.dtype)
        else:
            results = [(tokens, state.rule.apply(self, logits[tokens], plan)) for plan, tokens in groups]
            width = max([index.shape[1]] + [r[1].shape[1] for _, r in results])
            active = _pad(torch.ones_like(index, dtype=torch.bool), width, False)
            index, weights = _pad(index, width, index[:, :1]), _pad(weights, width, 0.0)
            for tokens, (w, i, a) in results:
                a = torch.ones_like(i, dtype=torch.bool) if a is None else a
                index = index.index_copy(0, tokens, _pad(i, width, i[:, :1]))
                weights = weights.index_copy(0, tokens, _pad(w.to(weights.dtype), width, 0.0))
                active = active.index_copy(0, tokens, _pad(a, width, False))
        output = (logits, weights, index)
    if handle._record or handle._on_route is not None:
        decision = RoutingDecision(
            logits.detach(), index.detach(), weights.detach(),
            torch.ones_like(index, dtype=torch.bool) if active is None else active.detach(),
            None if shape is None else (int(shape[0]), int(shape[1])),
        )
        if handle._record:
            handle.decisions[state.layer] = decision
        if handle._on_route is not None:
            handle._on_route(state.layer, decision)
    return output


def _remember_shape(router: torch.nn.Module, block: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    hidden = args[0] if args else kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
        router.__dict__[_SHAPE] = tuple(hidden.shape[:2])


def set_routing(
    model: torch.nn.Module,
    overrides: RoutingOverride | Sequence[RoutingOverride] | None = None,
    *,
    record: bool = False,
    on_route: Callable[[int, RoutingDecision], None] | None = None,
) -> RoutingHandle:
    """Install routing overrides on every MoE router of `model` until `handle.remove()`.

    Args:
        model (`PreTrainedModel`): a MoE causal LM of a family with a routing rule (or a PEFT/DDP wrapper of one).
        overrides (`RoutingOverride | list[RoutingOverride]`, *optional*): one override, or several for disjoint
            `rows`; `None` or an empty override routes normally (useful with `record`).
        record (`bool`, *optional*, defaults to `False`): keep each layer's `RoutingDecision` of the last forward
            in `handle.decisions`.
        on_route (`Callable[[int, RoutingDecision], None]`, *optional*): called after every router call with the
            layer index and its decision (e.g. to accumulate expert counts over a generation).

    Returns:
        `RoutingHandle`: `remove()` restores the routers (also a context manager); `update()` changes overrides.

    Raises:
        `UnsupportedArchitectureError`: a dense model, or a family without a routing rule.
        `InvalidOptionError`: a bad override (layer, expert, top_k, rank, forced count, rows); nothing is changed.
        `PatchConflictError`: routing overrides are already installed on this model.
    """
    target = _target(model)
    if target.model.__dict__.get(_HANDLE) is not None or any(_STATE in r.__dict__ for r in target.routers.values()):
        raise PatchConflictError(
            "routing overrides are already installed on this model; use handle.update(...) or handle.remove() first"
        )
    entries = _entries(target, overrides)
    handle = RoutingHandle(target, entries, bool(record), on_route)
    try:
        for layer in target.layers:
            router, block = target.routers[layer], target.blocks[layer]
            state = _RouterState(handle, layer, target.rule, router.__dict__.get("forward"))
            router.__dict__[_STATE] = state
            router.__dict__["forward"] = types.MethodType(_routed_forward, router)
            handle._undo.append(functools.partial(state.restore, router))
            hook = block.register_forward_pre_hook(functools.partial(_remember_shape, router), with_kwargs=True)
            handle._undo.append(hook.remove)
    except BaseException:
        handle.remove()
        raise
    target.model.__dict__[_HANDLE] = handle
    return handle


@contextlib.contextmanager
def routing_override(
    model: torch.nn.Module,
    overrides: RoutingOverride | Sequence[RoutingOverride] | None = None,
    *,
    record: bool = False,
    on_route: Callable[[int, RoutingDecision], None] | None = None,
) -> Iterator[RoutingHandle]:
    """`set_routing` for the duration of a `with` block (see there for the arguments)."""
    handle = set_routing(model, overrides, record=record, on_route=on_route)
    try:
        yield handle
    finally:
        handle.remove()


def _merge_plans(base: _LayerPlan, extra: _LayerPlan) -> _LayerPlan:
    """`extra` on top of `base` (one layer): the union of their disabled, dropped and forced experts, the gains of
    both (`extra`'s factor wins for an expert in both), and `extra`'s `top_k` or `rank` when it sets either (it then
    replaces `base`'s selection size), else `base`'s. Not validated: see `_check_plan`."""
    gain = dict(base.gain)
    gain.update(extra.gain)
    sized = extra.top_k is not None or extra.rank is not None
    return _LayerPlan(
        disabled=base.disabled | extra.disabled,
        dropped=base.dropped | extra.dropped,
        forced=base.forced | extra.forced,
        gain=tuple(sorted(gain.items())),
        top_k=extra.top_k if sized else base.top_k,
        rank=extra.rank if sized else base.rank,
    )


def _describe_plan(plan: _LayerPlan) -> str:
    """A layer plan in words, for error messages (`"disabled experts [0], rank=2"`)."""
    parts = [f"{name} experts {sorted(getattr(plan, name))}" for name in ("disabled", "dropped", "forced")
             if getattr(plan, name)]
    if plan.gain:
        parts.append(f"gains {dict(plan.gain)}")
    parts += [f"{name}={getattr(plan, name)}" for name in ("top_k", "rank") if getattr(plan, name) is not None]
    return ", ".join(parts) or "no change"


def _describe_rows(rows: frozenset[int]) -> str:
    first, last = min(rows), max(rows)
    return f"{first}..{last}" if len(rows) == last - first + 1 else str(sorted(rows))


_MERGE_FIX = "choose an override that fits the installed ones, or change or remove the installed overrides"


def _merged_plans(target: _Target, base: dict[int, _LayerPlan], added: _Entry, fix: str) -> dict[int, _LayerPlan]:
    """Per layer, the installed plan `base` merged with the added entry's plan; each merge validated."""
    plans = {}
    for layer in target.layers:
        old, new = base.get(layer), added.plans.get(layer)
        if old is None or new is None:
            plan = new if old is None else old
            if plan is not None:
                plans[layer] = plan
            continue
        plan = _merge_plans(old, new)
        try:
            _check_plan(target, layer, plan)
        except InvalidOptionError as err:
            raise InvalidOptionError(
                f"{err}. In layer {layer} the routing overrides installed on this model (e.g. a MoTE patch) have "
                f"{_describe_plan(old)}, and the override added for rows {_describe_rows(added.rows)} has "
                f"{_describe_plan(new)}; {fix}"
            ) from None
        plans[layer] = plan
    return plans


def _layered_entries(handle: RoutingHandle, override: RoutingOverride, fix: str) -> list[_Entry]:
    """The entries that route `override.rows` by `override` on top of `handle`'s (every-row) overrides, and the
    other rows by those overrides unchanged. Validates everything; changes nothing."""
    limited = sorted({r for entry in handle._entries if entry.rows is not None for r in entry.rows})
    (added,) = _entries(handle._target, override)
    if limited:
        raise PatchConflictError(
            f"routing overrides limited to rows {limited} are installed on this model; an override for rows "
            f"{_describe_rows(added.rows)} can only be added on top of installed overrides that apply to every row "
            "(rows=None): remove them (handle.remove()) or install them without rows"
        )
    if not handle._entries:
        return [added]
    (base,) = handle._entries  # at most one entry has rows=None
    return [_Entry(added.rows, _merged_plans(handle._target, base.plans, added, fix)), base]


@contextlib.contextmanager
def with_row_override(
    model: torch.nn.Module,
    override: RoutingOverride,
    rows: Iterable[int],
    *,
    conflict_fix: str | None = None,
) -> Iterator[RoutingHandle]:
    """Route batch `rows` by `override`, on top of any routing overrides installed on `model`, in a `with` block.

    With nothing installed this is `routing_override(model, override limited to rows)`. On a model whose installed
    overrides apply to every row (a MoTE patch, `switch_experts`, `set_routing` without `rows`), their handle's
    overrides are swapped for the block: the other rows keep them unchanged, `rows` get per MoE layer the installed
    plan merged with `override` (union of disabled / dropped / forced experts, both gains with `override`'s winning
    per expert, `override`'s `top_k` or `rank` replacing the installed one). On exit, also on error, the installed
    overrides are restored exactly (so a `handle.update()` inside the block does not outlive it). The installed
    handle's `record` / `on_route` keep working and see every row.

    Args:
        model (`PreTrainedModel`): a MoE causal LM of a family with a routing rule (or a PEFT/DDP wrapper of one).
        override (`RoutingOverride`): the routing of `rows`; its own `rows` must be `None`.
        rows (`Iterable[int]`): batch rows it applies to (e.g. `range(B, 2 * B)`).
        conflict_fix (`str`, *optional*): the fix a merge error suggests (a generic one otherwise).

    Yields:
        `RoutingHandle`: the handle in force (the installed one, or a fresh one removed on exit).

    Raises:
        `InvalidOptionError`: a bad override or rows, or a layer where the merged routing cannot work (named, with
            both plans); nothing is changed.
        `PatchConflictError`: the installed overrides are limited to some rows.
        `UnsupportedArchitectureError`: a dense model, or a family without a routing rule.
    """
    if not isinstance(override, RoutingOverride):
        raise InvalidOptionError(f"with_row_override: expected a RoutingOverride, got {type(override).__name__}")
    if override.rows is not None:
        raise InvalidOptionError(
            f"with_row_override: pass the rows as rows=..., not as RoutingOverride.rows (got {override.rows!r})"
        )
    limited = dataclasses.replace(override, rows=rows)
    target = _target(model)
    handle = target.model.__dict__.get(_HANDLE)
    if handle is None:
        with routing_override(model, limited) as fresh:
            yield fresh
        return
    entries = _layered_entries(handle, limited, conflict_fix or _MERGE_FIX)
    saved = handle._entries, handle._rows_cache
    handle._entries, handle._rows_cache = entries, {}
    try:
        yield handle
    finally:
        handle._entries, handle._rows_cache = saved


def route(model: torch.nn.Module, layer: int, router_logits: torch.Tensor,
          override: RoutingOverride | None = None) -> RoutingDecision:
    """The routing `layer`'s router would produce for `router_logits` `(N, E)` under `override` (rows ignored).

    With no override this is the family rule itself, equal to the router's own `(weights, index)`.
    """
    target = _target(model)
    if not _is_int(layer) or layer not in target.routers:
        raise InvalidOptionError(f"layer {layer!r} is not a MoE layer; the MoE layers are {target.layers}")
    plan = _resolve(target, override).get(layer, _LayerPlan()) if override is not None else _LayerPlan()
    router = target.routers[layer]
    weights, index, active = target.rule.apply(router, router_logits.reshape(-1, router_logits.shape[-1]), plan)
    active = torch.ones_like(index, dtype=torch.bool) if active is None else active
    return RoutingDecision(router_logits, index, weights, active)
