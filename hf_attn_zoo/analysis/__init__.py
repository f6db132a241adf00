"""Analyses of patched models (statistics, plots). Imports patches, never the reverse."""

from .expert_profile import ExpertProfile, plot_expert_profile, profile_experts
from .head_usage import head_usage, plot_head_usage, reset_head_usage
from .perplexity import held_out_nll, held_out_perplexity

__all__ = [
    "ExpertProfile",
    "head_usage",
    "held_out_nll",
    "held_out_perplexity",
    "plot_expert_profile",
    "plot_head_usage",
    "profile_experts",
    "reset_head_usage",
]
