"""Mixture-of-Experts tools shared by the MoE methods (SCMoE, MoTE): routing overrides for every MoE family, and
expert switching (MoTE) on top of them."""

from .routing import (
    ROUTING_RULES,
    RoutingDecision,
    RoutingHandle,
    RoutingOverride,
    RoutingRule,
    observe_routing,
    register_routing_rule,
    route,
    routing_override,
    routing_rule,
    set_routing,
    with_row_override,
)
from .switching import experts_to_switch, random_experts, switch_experts

__all__ = [
    "ROUTING_RULES",
    "RoutingDecision",
    "RoutingHandle",
    "RoutingOverride",
    "RoutingRule",
    "experts_to_switch",
    "observe_routing",
    "random_experts",
    "register_routing_rule",
    "route",
    "routing_override",
    "routing_rule",
    "set_routing",
    "switch_experts",
    "with_row_override",
]
