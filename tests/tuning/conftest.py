"""Fixtures for the tuning tests: a tiny random Llama with a tiny BPE tokenizer, saved as a plain HF folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tiny import save_tiny_llama

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_tiny_llama(out: Path, seed: int = 0) -> Path:
    """Write a tiny random Llama and a 320-token byte-level BPE tokenizer (trained on Python's help topics)."""
    return save_tiny_llama(out, vocab_size=320, max_position_embeddings=256, bos_prefix=False, seed=seed)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
