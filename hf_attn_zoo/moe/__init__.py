"""Mixture-of-Experts tools shared by the MoE methods (SCMoE, MoTE): routing overrides for every MoE family."""

from .routing import (
    ROUTING_RULES,
    RoutingDecision,
    RoutingHandle,
    RoutingOverride,
    RoutingRule,
    register_routing_rule,
    route,
    routing_override,
    set_routing,
)

__all__ = [
    "ROUTING_RULES",
    "RoutingDecision",
    "RoutingHandle",
    "RoutingOverride",
    "RoutingRule",
    "register_routing_rule",
    "route",
    "routing_override",
    "set_routing",
]
