"""Architecture adapters as data: where the layers, attention and MLP modules of a family live.

A method asks the family spec for modules ("the attention module of layer 3", "the head counts"); it never
hard-codes `model.layers` or `self_attn`. Adding a family is one `<name>.yaml` file next to this one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, model_validator
from transformers import PretrainedConfig, PreTrainedModel

from ..errors import UnsupportedArchitectureError

__all__ = ["FamilySpec", "HeadLayout", "family_specs", "resolve_family", "supported_model_types"]

_HERE = Path(__file__).parent


class AttentionSpec(BaseModel):
    """The attention module; `kind: standard` names its q/k/v/o projections (the layout attention patches need).

    `kind: mla` (DeepSeek-V3 multi-head latent attention: low-rank q and compressed kv projections) names only the
    module; attention patches refuse such a family in their `check()`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    module: str
    kind: Literal["standard", "mla"] = "standard"
    q: str | None = None
    k: str | None = None
    v: str | None = None
    o: str | None = None
    qk_norm: tuple[str, str] | None = None

    @model_validator(mode="after")
    def _projection_names(self) -> AttentionSpec:
        named = [getattr(self, p) is not None for p in "qkvo"]
        if self.kind == "standard" and not all(named):
            raise ValueError("a standard attention spec names all of q, k, v and o")
        if self.kind != "standard" and (any(named) or self.qk_norm is not None):
            raise ValueError(f"an attention spec of kind {self.kind!r} names no q/k/v/o projections or qk_norm")
        return self


class MLPSpec(BaseModel):
    """The feed-forward block; for `kind: moe`, the names of its router and fused experts sub-modules."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    module: str
    kind: Literal["dense", "moe"]
    router: str | None = None
    experts: str | None = None

    @model_validator(mode="after")
    def _moe_names(self) -> MLPSpec:
        if (self.kind == "moe") != (self.router is not None and self.experts is not None):
            raise ValueError("an MLP spec names `router` and `experts` exactly when its kind is moe")
        return self


@dataclass(frozen=True)
class HeadLayout:
    """Head counts of one attention layer (GQA: `num_heads` query heads share `num_kv_heads` key/value heads)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


class FamilySpec(BaseModel):
    """One architecture family, loaded from `families/<name>.yaml`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    model_types: tuple[str, ...]
    layers: str
    attention: AttentionSpec
    mlp: MLPSpec
    tiny: dict[str, Any]

    def decoder_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        """The decoder layers of `model` (a `*ForCausalLM` or its inner `*Model`)."""
        module = model
        for part in self.layers.split("."):
            if not hasattr(module, part) and part == "model" and isinstance(module, PreTrainedModel):
                continue  # `model` is already the inner `*Model`
            module = getattr(module, part)
        return module

    def attention_module(self, model: torch.nn.Module, layer: int) -> torch.nn.Module:
        return getattr(self.decoder_layers(model)[layer], self.attention.module)

    def mlp_module(self, model: torch.nn.Module, layer: int) -> torch.nn.Module:
        return getattr(self.decoder_layers(model)[layer], self.mlp.module)

    def moe_router(self, model: torch.nn.Module, layer: int) -> torch.nn.Module:
        """The router of layer `layer`'s sparse MoE block (`mlp.gate`, `mlp.router`, ...)."""
        return getattr(self.mlp_module(model, layer), self.mlp.router)

    def moe_layers(self, model: torch.nn.Module) -> list[int]:
        """Indices of the layers whose MLP is a sparse MoE block (some MoE families keep dense layers)."""
        if self.mlp.kind != "moe":
            return []
        return [i for i in range(len(self.decoder_layers(model))) if hasattr(self.mlp_module(model, i), self.mlp.router)]

    def head_layout(self, config: PretrainedConfig) -> HeadLayout:
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        return HeadLayout(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)

    def tiny_config(self, **overrides: Any) -> PretrainedConfig:
        """A tiny random config of this family, for tests."""
        from transformers import AutoConfig

        return AutoConfig.for_model(self.model_types[0], **{**self.tiny, **overrides})


@functools.cache
def family_specs() -> dict[str, FamilySpec]:
    """All shipped families, by name."""
    specs = {}
    for path in sorted(_HERE.glob("*.yaml")):
        spec = FamilySpec(**yaml.safe_load(path.read_text()))
        if spec.name != path.stem:
            raise RuntimeError(f"{path}: family name {spec.name!r} must equal the file stem {path.stem!r}")
        specs[spec.name] = spec
    return specs


def supported_model_types() -> list[str]:
    return sorted(t for spec in family_specs().values() for t in spec.model_types)


def resolve_family(config: PretrainedConfig) -> FamilySpec:
    """The family of a model config, or an error listing the supported `model_type`s."""
    config = getattr(config, "text_config", None) if config.model_type == "gemma3" else config
    model_type = getattr(config, "model_type", None)
    for spec in family_specs().values():
        if model_type in spec.model_types:
            return spec
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} has no hf_attn_zoo family adapter; supported: {', '.join(supported_model_types())}. "
        "Add one as hf_attn_zoo/families/<name>.yaml."
    )
