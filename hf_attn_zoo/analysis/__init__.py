"""Analyses of patched models (statistics, plots). Imports patches, never the reverse."""

from .expert_profile import ExpertProfile, plot_expert_profile, profile_experts
from .head_usage import head_usage, plot_head_usage, reset_head_usage
from .perplexity import held_out_nll, held_out_perplexity
from .report import expert_usage, head_contributions, write_report
from .routing_stability import plot_routing_stability, routing_stability
from .sinks import SinkReport, find_sinks, plot_sinks

__all__ = [
    "ExpertProfile",
    "SinkReport",
    "expert_usage",
    "find_sinks",
    "head_contributions",
    "head_usage",
    "held_out_nll",
    "held_out_perplexity",
    "plot_expert_profile",
    "plot_head_usage",
    "plot_routing_stability",
    "plot_sinks",
    "profile_experts",
    "reset_head_usage",
    "routing_stability",
    "write_report",
]
