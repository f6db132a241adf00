"""Tiny dense checkpoints on disk: a seed, two specialists (perturbed copies) and incompatible models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hf_attn_zoo.families import family_specs
from tests.tiny import save_tiny_llama


def perturbed_copy(src: Path, dst: Path, seed: int, scale: float = 0.05, **config_overrides) -> Path:
    """Save `src` with every weight moved by Gaussian noise (a stand-in for a fine-tuned descendant)."""
    config = AutoConfig.from_pretrained(src)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    if config_overrides:
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = AutoModelForCausalLM.from_pretrained(src)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


@pytest.fixture(scope="session")
def dense_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("upcycling")
    seed = save_tiny_llama(root / "seed", vocab_size=256, max_position_embeddings=128, bos_prefix=True)
    models = {"seed": seed}
    models["code"] = perturbed_copy(seed, root / "code", seed=1)
    models["prose"] = perturbed_copy(seed, root / "prose", seed=2)
    models["wide"] = perturbed_copy(seed, root / "wide", seed=3, hidden_size=96)
    models["deep"] = perturbed_copy(seed, root / "deep", seed=4, num_hidden_layers=3)
    other_vocab = save_tiny_llama(root / "other_vocab", vocab_size=300, max_position_embeddings=128, bos_prefix=True)
    models["other_vocab"] = other_vocab
    # same shapes and vocabulary size, different tokenizer: two ordinary tokens swap their ids
    swapped = root / "swapped_tokenizer"
    shutil.copytree(seed, swapped)
    data = json.loads((swapped / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = [t for t, i in vocab.items() if i in (40, 41)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (swapped / "tokenizer.json").write_text(json.dumps(data))
    models["swapped_tokenizer"] = swapped
    for family in ("mistral", "qwen3", "qwen2", "olmo2"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(
            family_specs()[family].tiny_config(sliding_window=None)
            if family == "mistral"
            else family_specs()[family].tiny_config()
        )
        model.save_pretrained(root / family)
        models[family] = root / family
    return models
