"""Decoding methods for MoE models: SCMoE self-contrast decoding (arXiv:2405.14507)."""

from .scmoe import (
    CUSTOM_GENERATE_DIR,
    SCMoEConfig,
    SCMoEOutput,
    check_model,
    contrastive_scores,
    gsm8k_correct,
    gsm8k_heldout,
    gsm8k_prompt,
    move_stop_strings,
    parse_weak,
    pick_beta,
    scmoe_decode,
    scmoe_forward,
    scmoe_generate,
    scmoe_logprobs,
)

__all__ = [
    "CUSTOM_GENERATE_DIR",
    "SCMoEConfig",
    "SCMoEOutput",
    "check_model",
    "contrastive_scores",
    "gsm8k_correct",
    "gsm8k_heldout",
    "gsm8k_prompt",
    "move_stop_strings",
    "parse_weak",
    "pick_beta",
    "scmoe_decode",
    "scmoe_forward",
    "scmoe_generate",
    "scmoe_logprobs",
]
