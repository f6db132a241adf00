"""Routing rules: how a MoE router turns its logits into `(weights, experts)`, reproduced exactly and changed by a
`LayerPlan` (mask, drop, force, re-weight, top-k, rank). A family names the kind of its rule in its spec
(`mlp.routing`, see `families/spec.py`); the kinds (`ROUTING_RULES`):

- softmax_topk: softmax (fp32) -> top-k -> renormalise always (Mixtral, fp32 weights) or iff `norm_topk_prob`
  (Qwen-MoE, OLMoE, FlexOlmo; weights in the logits' dtype).
- grouped_sigmoid: sigmoid scores; selection on scores + `e_score_correction_bias`, limited to the `topk_group` best
  of `n_group` groups (group score = sum of its 2 best); weights from the *unbiased* scores, renormalised iff
  `norm_topk_prob`, times `routed_scaling_factor` (DeepSeek-V3, GLM-4-MoE, dots1).
- topk_softmax: top-k on the logits (with the router bias where it has one), softmax over the k picked logits
  (GPT-OSS, GraniteMoE).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import cast

import torch

from ..errors import InvalidOptionError
from ..families.spec import FamilySpec, RoutingSpec, family_specs
from .plan import LayerPlan, plan_tensors

__all__ = [
    "ROUTING_RULES",
    "GroupedSigmoidRule",
    "RoutingRule",
    "SoftmaxTopKRule",
    "TopKSoftmaxRule",
    "missing_rule_reason",
    "moe_families_with_rules",
    "register_routing_rule",
    "routing_rule",
]


class RoutingRule(abc.ABC):
    """How one family's router turns its logits into `(weights, index)`, with the override hooks.

    Subclasses implement `scores` (the quantity ranked for selection and the one the weights come from),
    `select` (the top-k) and `weigh` (weights of the selected experts); the generic `apply` adds masking, forcing,
    dropping, gain and rank on top. With an empty plan `apply` reproduces the transformers router bit for bit.
    """

    def num_experts(self, router: torch.nn.Module) -> int:
        return int(cast(torch.Tensor, router.weight).shape[0])

    @abc.abstractmethod
    def scores(
        self, router: torch.nn.Module, logits: torch.Tensor, disabled: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(choice, weight_scores)`, both `(N, E)`: the selection ranks `choice`, the weights use `weight_scores`.

        `disabled` (`(E,)` bool, or None): experts whose logit counts as -inf (the caller also masks `choice`).
        """

    def select(
        self, router: torch.nn.Module, choice: torch.Tensor, k: int, ordered: bool, masked: bool
    ) -> torch.Tensor:
        """`(N, k)` indices of the top-k of `choice` (decreasing when `ordered`; `masked`: it holds -inf entries)."""
        return torch.topk(choice, k, dim=-1).indices

    @abc.abstractmethod
    def weigh(
        self,
        router: torch.nn.Module,
        weight_scores: torch.Tensor,
        logits: torch.Tensor,
        index: torch.Tensor,
        active: torch.Tensor | None,
    ) -> torch.Tensor:
        """`(N, k)` weights of the selected experts; `active` (or None: all) marks the ones not dropped."""

    def weight_dtype(self, router: torch.nn.Module, logits: torch.Tensor) -> torch.dtype:
        return logits.dtype

    def gates(self, router: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
        """`(N, E)` fp32 per-token gate scores that may be averaged over tokens (graph-of-tokens routing): the
        softmax over the experts; `logits_of_gates` maps an average of them back to logits this rule routes by."""
        return torch.softmax(logits.float(), dim=-1)

    def logits_of_gates(self, router: torch.nn.Module, gates: torch.Tensor) -> torch.Tensor:
        """Logits whose routing under this rule is the routing by `gates` (log: the softmax of the result is
        `gates`, and a top-k on it is the top-k of `gates`)."""
        return gates.clamp_min(torch.finfo(gates.dtype).tiny).log()

    def capacity(self, router: torch.nn.Module, disabled: frozenset[int]) -> int:
        """How many experts a token can always select once `disabled` are masked."""
        return self.num_experts(router) - len(disabled)

    def check_forced(self, router: torch.nn.Module, forced: frozenset[int]) -> str | None:
        """Why this set of forced experts cannot all be selected, or None."""
        return None

    def apply(
        self, router: torch.nn.Module, logits: torch.Tensor, plan: LayerPlan
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`(weights, index, active)` of `logits` `(N, E)` under `plan` (active None: every slot is active)."""
        masks = plan_tensors(plan, self.num_experts(router), logits.device)
        disabled = masks["disabled"] if plan.disabled else None
        choice, weight_scores = self.scores(router, logits, disabled)
        if disabled is not None:
            choice = choice.masked_fill(disabled, float("-inf"))
        if plan.forced:
            choice = choice.masked_fill(masks["forced"], float("inf"))
        masked = disabled is not None
        if plan.rank is not None:
            index = self.select(router, choice, plan.rank, ordered=True, masked=masked)[:, plan.rank - 1 :]
            weights = torch.ones(index.shape, dtype=self.weight_dtype(router, logits), device=logits.device)
            active = None
        else:
            k = plan.top_k if plan.top_k is not None else cast(int, router.top_k)
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

    def gates(self, router, logits):
        return logits.float().sigmoid()

    def logits_of_gates(self, router, gates):
        eps = torch.finfo(gates.dtype).eps
        return torch.logit(gates, eps=eps)

    def capacity(self, router, disabled):
        per_group = self.num_experts(router) // router.num_group
        left = [per_group - sum(e // per_group == g for e in disabled) for g in range(router.num_group)]
        # the selected groups can be any `topk_group` of those with an expert left: count the worst case
        return sum(sorted(c for c in left if c)[: router.topk_group])

    def check_forced(self, router, forced):
        per_group = self.num_experts(router) // router.num_group
        groups = sorted({e // per_group for e in forced})
        if len(groups) > router.topk_group:
            return (
                f"the forced experts lie in {len(groups)} expert groups {groups}, but only topk_group="
                f"{router.topk_group} groups are selected per token (groups of {per_group} experts)"
            )
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
    "softmax_topk": lambda spec: SoftmaxTopKRule(
        always_renormalise=spec.renormalise == "always", cast_back=spec.weights == "logits"
    ),
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
    if spec is None or spec.rule not in ROUTING_RULES:
        return None
    return ROUTING_RULES[spec.rule](spec)


def missing_rule_reason(family: FamilySpec) -> str:
    """Why `family` has no routing rule, and the fix."""
    spec = family.mlp.routing
    if spec is None:
        return (
            f"its router has no routing rule: if it works like one of {', '.join(ROUTING_RULES)}, declare "
            f"`mlp.routing` in hf_attn_zoo/families/{family.name}.yaml (see families/spec.py RoutingSpec)"
        )
    return (
        f"its routing rule {spec.rule!r} is not registered (known: {', '.join(ROUTING_RULES)}); add it with "
        "hf_attn_zoo.moe.register_routing_rule"
    )


def moe_families_with_rules() -> list[str]:
    """The shipped MoE families whose routing the overrides reproduce."""
    return sorted(name for name, spec in family_specs().items() if spec.mlp.kind == "moe" and routing_rule(spec))
