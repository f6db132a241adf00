"""Decoding methods for MoE models: SCMoE self-contrast decoding (arXiv:2405.14507).

`registry` lists the decoding methods (`DECODING_METHODS`, shown by `hf_attn_zoo.methods()` with kind "decoding");
`scmoe` is the SCMoE package (options, the contrast, the `generate` loop, `pick_beta`); `custom_generate_repo` writes
SCMoE as a hub `custom_generate` repository (`write_custom_generate`). The GSM8K helpers `pick_beta`
defaults to live in `hf_attn_zoo.eval_harness.gsm8k`.
"""

from .custom_generate_repo import write_custom_generate
from .registry import DECODING_METHODS, DecodingMethod, register_decoding
from .scmoe import (
    CUSTOM_GENERATE_DIR,
    SCMoEConfig,
    SCMoEOutput,
    check_model,
    contrastive_scores,
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
    "DECODING_METHODS",
    "DecodingMethod",
    "SCMoEConfig",
    "SCMoEOutput",
    "check_model",
    "contrastive_scores",
    "move_stop_strings",
    "parse_weak",
    "pick_beta",
    "register_decoding",
    "scmoe_decode",
    "scmoe_forward",
    "scmoe_generate",
    "scmoe_logprobs",
    "write_custom_generate",
]
