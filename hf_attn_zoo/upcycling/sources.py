"""The dense models an MoE is upcycled from, read tensor by tensor from their safetensors files.

A `Source` never loads a whole model: `tensor(name)` opens the file holding `name` and reads that one tensor, so
building an MoE from N dense models needs memory for the output model plus one tensor per source.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from ..assets.model import resolve_model
from ..errors import IncompatibleModelsError, MissingAssetError

__all__ = ["Expert", "Source", "check_compatible", "open_source"]

logger = logging.getLogger(__name__)

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
# config fields that must agree for weights to be stacked or averaged
_SHAPE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)


@dataclass
class Expert:
    """One expert of an upcycled MoE: a dense model (path, hub id or `"default"`) and optional routing prompts.

    Args:
        source (`str`): the dense model whose MLP (and, for BAM, attention) becomes this expert.
        prompts (`list[str]`): example texts of this expert's domain, for `router_init="hidden"|"embed"`.
        negative_prompts (`list[str]`): texts this expert should *not* receive (their mean is subtracted).
        noise_scale (`float`): std of Gaussian noise added to the expert's weights, relative to each weight's std.
        residual_scale (`float`): factor on the expert's down projection (mergekit's `residual_scale`).
    """

    source: str
    prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    noise_scale: float = 0.0
    residual_scale: float = 1.0


class Source:
    """A dense checkpoint folder: its config, tokenizer location and lazily-read tensors."""

    def __init__(self, name: str, path: Path, config: PretrainedConfig):
        self.name = name
        self.path = path
        self.config = config

    def __repr__(self) -> str:
        return f"Source({self.name!r})"

    @cached_property
    def _files(self) -> dict[str, Path]:
        index = self.path / _INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: self.path / file for name, file in weight_map.items()}
        single = self.path / _SINGLE
        if not single.is_file():
            raise MissingAssetError(
                f"{self.name}: no {_SINGLE} or {_INDEX} in {self.path}; upcycling reads safetensors checkpoints "
                "(re-save the model with save_pretrained)."
            )
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}

    def has(self, name: str) -> bool:
        return name in self._files

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor `name` (e.g. `model.layers.0.mlp.up_proj.weight`); tied `lm_head` falls back to the embedding."""
        if name not in self._files and name == "lm_head.weight":
            name = "model.embed_tokens.weight"
        if name not in self._files:
            raise IncompatibleModelsError(f"{self.name}: checkpoint has no tensor {name!r}.")
        with safe_open(self._files[name], framework="pt") as f:
            return f.get_tensor(name)


def open_source(name: str | Path, **hub_kwargs: Any) -> Source:
    """Open a dense checkpoint: a local folder, `"default"` (SmolLM2-135M-Instruct, offline) or a hub id."""
    resolved = resolve_model(name)
    path = Path(resolved)
    if not path.is_dir():
        if str(resolved).startswith((".", "/", "~")) or path.suffix:
            raise MissingAssetError(f"model folder {resolved} does not exist.")
        from huggingface_hub import snapshot_download

        try:
            path = Path(
                snapshot_download(
                    str(resolved),
                    allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
                    **hub_kwargs,
                )
            )
        except Exception as err:  # offline, unknown repo, gated: one message
            raise MissingAssetError(
                f"could not get {resolved!r} from the Hugging Face hub ({err}); pass a local folder instead."
            ) from err
    config = AutoConfig.from_pretrained(path)
    return Source(str(name), path, config)


def _tokenizer_vocab(source: Source) -> dict[str, int] | None:
    from transformers import AutoTokenizer

    if not any((source.path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return AutoTokenizer.from_pretrained(source.path).get_vocab()


def check_compatible(sources: list[Source]) -> None:
    """Raise `IncompatibleModelsError` unless all sources share architecture, shapes and tokenizer."""
    seed = sources[0]
    for other in sources[1:]:
        if other.config.model_type != seed.config.model_type:
            raise IncompatibleModelsError(
                f"{other.name} is a {other.config.model_type!r} model but the seed {seed.name} is "
                f"{seed.config.model_type!r}; all models of an upcycled MoE must share one architecture."
            )
        for key in _SHAPE_FIELDS:
            a, b = getattr(seed.config, key, None), getattr(other.config, key, None)
            if a != b:
                raise IncompatibleModelsError(
                    f"{other.name} has {key}={b} but the seed {seed.name} has {key}={a}; experts must come from "
                    "models of identical shape (fine-tuned or continue-trained copies of the seed)."
                )
    vocabs = [(s, _tokenizer_vocab(s)) for s in sources]
    seed_vocab = vocabs[0][1]
    for source, vocab in vocabs[1:]:
        if seed_vocab is not None and vocab is not None and vocab != seed_vocab:
            raise IncompatibleModelsError(
                f"{source.name} has a different tokenizer vocabulary than the seed {seed.name}; the merged model "
                "shares one embedding table, so every expert must use the seed's tokenizer."
            )
        if vocab is None:
            logger.warning("%s has no tokenizer files; its vocabulary is assumed to be the seed's.", source.name)
