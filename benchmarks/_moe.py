"""Shared by the MoE benchmarks: the study's real upcycled SmolLM2 MoE if cached, else a random Mixtral of its
widths."""

from __future__ import annotations

from pathlib import Path

import torch

import hf_attn_zoo
from hf_attn_zoo.upcycling.pipeline import cached_moe


def load_moe(model: Path | None, layers: int) -> tuple[torch.nn.Module, object, str]:
    """`(model, tokenizer, description)`: `model` if given, the study's BTX MoE (tuned if available) if cached
    (`hf-attn-zoo upcycle-study --stage build`), otherwise a random `layers`-layer Mixtral, 4 experts top-2."""
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    folder = model or cached_moe("btx")
    if folder is not None:
        loaded = hf_attn_zoo.from_pretrained(folder, dtype=torch.float32)
        return loaded, AutoTokenizer.from_pretrained(folder), f"{folder} (real MoE checkpoint)"
    seed = hf_attn_zoo.assets.default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(seed)
    config = MixtralConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        num_local_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return (
        MixtralForCausalLM(config),
        tokenizer,
        f"random Mixtral, SmolLM2-135M widths, {layers} layers, 4 experts top-2",
    )
