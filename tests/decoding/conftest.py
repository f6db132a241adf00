"""Fixtures for the decoding tests: a tiny random Mixtral with a small byte-level BPE, saved once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny import save_tiny_llama


def save_tiny_mixtral(out: Path) -> Path:
    """A 2-layer Mixtral (4 experts, top-2, sharp routers) with the 512-token BPE of `tests.tiny` in `out`."""
    from transformers import AutoConfig, MixtralConfig, MixtralForCausalLM

    save_tiny_llama(out, vocab_size=512, max_position_embeddings=2048, bos_prefix=True)
    llama = AutoConfig.from_pretrained(out)
    config = MixtralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=2048,
        vocab_size=llama.vocab_size,
        bos_token_id=llama.bos_token_id,
        eos_token_id=llama.eos_token_id,
        pad_token_id=llama.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = MixtralForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            # sharp routers, so the rank-2 expert differs clearly from the top-2 mixture
            layer.mlp.gate.weight.mul_(8.0)
    for stale in out.glob("*.safetensors"):
        stale.unlink()
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_mixtral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return save_tiny_mixtral(tmp_path_factory.mktemp("tiny_mixtral"))
