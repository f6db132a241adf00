"""Analyses of patched models (statistics, plots). Imports patches, never the reverse."""

from .head_usage import head_usage, plot_head_usage, reset_head_usage
from .perplexity import held_out_perplexity

__all__ = ["head_usage", "held_out_perplexity", "plot_head_usage", "reset_head_usage"]
