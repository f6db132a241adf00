"""Fixtures for the lm-eval plugin tests: a tiny random Llama with a small byte-level BPE, saved once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny import save_tiny_llama


def build_tiny_model(out: Path) -> Path:
    """Save a 2-layer Llama (hidden 64, GQA 4/2) and a 512-token byte-level BPE that prepends `<s>` to `out`."""
    return save_tiny_llama(out, vocab_size=512, max_position_embeddings=2048, bos_prefix=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"))
