"""Architecture adapters as data: where the layers, attention and MLP modules of a family live, and what a patch
must know about them (q/k-norm scope, attention sinks, block layout, MoE routing rule).

A method asks the family spec for modules ("the attention module of layer 3", "the head counts") and properties; it
never hard-codes `model.layers`, `self_attn` or a model type. A decoder of the common shape needs no file: its layout
is read from its modules (`discover.py`). A `<name>.yaml` next to this one names a family, the tiny config the test
grid runs it on, and only what differs from (or cannot be read from) the modules, such as the MoE routing rule.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
import yaml
from pydantic import BaseModel, ConfigDict, model_validator
from transformers import PretrainedConfig, PreTrainedModel, __version__

from ..errors import UnsupportedArchitectureError
from .discover import discover_layout

__all__ = ["FamilySpec", "HeadLayout", "family_specs", "resolve_family", "supported_model_types"]

logger = logging.getLogger(__name__)

_HERE = Path(__file__).parent


class AttentionSpec(BaseModel):
    """The attention module; `kind: standard` names its q/k/v/o projections (the layout attention patches need).

    `kind: mla` (DeepSeek-V3 multi-head latent attention: low-rank q and compressed kv projections) names only the
    module; attention patches refuse such a family in their `check()`. `qk_norm_scope` says whether the q/k norms
    normalise each head (`head`) or the whole projection before the head split (`projection`: OLMo 2); `sinks` names
    a learned per-head parameter the family's own attention function uses (GPT-OSS attention sinks), which a patch
    that replaces that function must honour or refuse. `rope` is how RoPE pairs the channels of a head: `half`
    (`rotate_half`: channel c with c + r/2, most families) or `interleaved` (channels 2i and 2i+1: Helium, Cohere, GLM;
    read from the family's `rotate_half`).
    `rope_layers` says which layers rotate at all: `all`, `sliding_only` (the global layers are NoPE: EXAONE 4, Command
    R7B) or `no_rope_layers` (the config's `no_rope_layers` list, 1 = RoPE: SmolLM3).
    `interface` says whether the module computes attention through transformers' attention interface (where
    attention-function patches take over); a module that computes it itself cannot take them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    module: str
    kind: Literal["standard", "mla"] = "standard"
    q: str | None = None
    k: str | None = None
    v: str | None = None
    o: str | None = None
    qk_norm: tuple[str, str] | None = None
    qk_norm_scope: Literal["head", "projection"] | None = None
    sinks: str | None = None
    rope: Literal["half", "interleaved"] = "half"
    rope_layers: Literal["all", "sliding_only", "no_rope_layers"] = "all"
    interface: bool = True

    @model_validator(mode="after")
    def _projection_names(self) -> AttentionSpec:
        named = [getattr(self, p) is not None for p in "qkvo"]
        if self.kind == "standard" and not all(named):
            raise ValueError("a standard attention spec names all of q, k, v and o")
        if self.kind != "standard" and (any(named) or self.qk_norm is not None):
            raise ValueError(f"an attention spec of kind {self.kind!r} names no q/k/v/o projections or qk_norm")
        if (self.qk_norm is None) != (self.qk_norm_scope is None):
            raise ValueError("an attention spec gives qk_norm_scope (head or projection) exactly when it names qk_norm")
        return self


class RoutingSpec(BaseModel):
    """How a MoE router turns its logits into `(weights, experts)`: the rule `hf_attn_zoo.moe` reproduces exactly
    (and changes under routing overrides). Rules are kinds, shared by every family whose router works that way:

    - `softmax_topk`: softmax over all experts, top-k; `renormalise: always` (Mixtral) or `norm_topk_prob` (the
      router's flag decides: Qwen-MoE, OLMoE); `weights: float32` (Mixtral) or `logits` (cast back to the logits'
      dtype).
    - `grouped_sigmoid`: sigmoid scores, selection on scores + `e_score_correction_bias` within the `topk_group` best
      groups, weights from the unbiased scores (DeepSeek-V3, GLM-4-MoE, dots1).
    - `topk_softmax`: top-k on the logits, softmax over the k picked (GPT-OSS, GraniteMoE).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    rule: Literal["softmax_topk", "grouped_sigmoid", "topk_softmax"]
    renormalise: Literal["always", "norm_topk_prob"] = "norm_topk_prob"
    weights: Literal["float32", "logits"] = "logits"


class MLPSpec(BaseModel):
    """The feed-forward block; for `kind: moe`, the names of its router and fused experts sub-modules."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    module: str
    kind: Literal["dense", "moe"]
    router: str | None = None
    experts: str | None = None
    routing: RoutingSpec | None = None

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


class UpcycleSpec(BaseModel):
    """A dense seed family's upcycling: which MoE family its upcycled model is written as, with MoE on every layer
    (`every_layer`) or on some (`some_layers`); `qkv_bias: true` where the architecture always has q/k/v biases
    (Qwen2), otherwise the seed's `attention_bias` decides."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    every_layer: str
    some_layers: str
    qkv_bias: bool = False


class UpcycleTargetSpec(BaseModel):
    """How a MoE family's config is written for an upcycled model: the names of its expert count, expert width and
    dense-layer list, the seed config keys it carries over besides the common ones, fixed values, where the seed's
    q/k/v bias goes, and what it cannot express (projection biases, head_dim x heads != hidden, a sliding window)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    num_experts: str
    expert_size: str
    dense_layers: str | None = None
    carry: tuple[Literal["intermediate_size", "head_dim", "sliding_window"], ...] = ()
    fixed: dict[str, Any] = {}
    qkv_bias: str | None = None
    projection_biases: bool = True
    free_head_dim: bool = True
    sliding_window: bool = True


Block = Literal["pre_norm", "post_norm", "sandwich", "parallel", "other"]


class FamilySpec(BaseModel):
    """One architecture family: a `families/<name>.yaml` completed by the layout read from its modules, or a decoder
    of the common shape recognised without a file.

    `block` is the decoder layer's norm layout: `pre_norm` (x + attn(input_layernorm(x)), then
    post_attention_layernorm -> MLP), `post_norm` (norms after attention and MLP: OLMo 2), `sandwich` (pre and post
    norms around both: Gemma), `parallel` (one input norm feeding attention and MLP: Cohere), or `other`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    model_types: tuple[str, ...]
    layers: str
    attention: AttentionSpec
    mlp: MLPSpec
    block: Block = "other"
    upcycle: UpcycleSpec | None = None
    upcycle_target: UpcycleTargetSpec | None = None
    tiny: dict[str, Any] = {}

    def decoder_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        """The decoder layers of `model` (a `*ForCausalLM` or its inner `*Model`)."""
        module = model
        for part in self.layers.split("."):
            if not hasattr(module, part) and part == "model" and isinstance(module, PreTrainedModel):
                continue  # `model` is already the inner `*Model`
            module = getattr(module, part)
        return cast(torch.nn.ModuleList, module)

    def attention_module(self, model: torch.nn.Module, layer: int) -> torch.nn.Module:
        return getattr(self.decoder_layers(model)[layer], self.attention.module)

    def mlp_module(self, model: torch.nn.Module, layer: int) -> torch.nn.Module:
        return getattr(self.decoder_layers(model)[layer], self.mlp.module)

    def moe_router(self, model: torch.nn.Module, layer: int) -> torch.nn.Module:
        """The router of layer `layer`'s sparse MoE block (`mlp.gate`, `mlp.router`, ...)."""
        assert self.mlp.router is not None, f"{self.name}: not a MoE family"
        return getattr(self.mlp_module(model, layer), self.mlp.router)

    def moe_layers(self, model: torch.nn.Module) -> list[int]:
        """Indices of the layers whose MLP is a sparse MoE block (some MoE families keep dense layers)."""
        if self.mlp.kind != "moe":
            return []
        router = self.mlp.router
        assert router is not None  # MLPSpec names a router exactly when its kind is moe
        layers = range(len(self.decoder_layers(model)))
        return [i for i in layers if hasattr(self.mlp_module(model, i), router)]

    def uses_rope(self, config: PretrainedConfig, layer: int) -> bool:
        """Whether decoder layer `layer` applies RoPE to its queries and keys (`attention.rope_layers`)."""
        text = config.get_text_config()
        if self.attention.rope_layers == "no_rope_layers":
            return bool(text.no_rope_layers[layer])
        if self.attention.rope_layers == "sliding_only" and getattr(text, "sliding_window", None) is not None:
            return text.layer_types[layer] == "sliding_attention"
        return True

    def head_layout(self, config: PretrainedConfig) -> HeadLayout:
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        return HeadLayout(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)

    def tiny_config(self, **overrides: Any) -> PretrainedConfig:
        """A tiny random config of this family, for tests."""
        return _tiny_config(self.model_types, {**self.tiny, **overrides})


def _tiny_config(model_types: Sequence[str], tiny: Mapping[str, Any]) -> PretrainedConfig:
    from transformers import AutoConfig

    return AutoConfig.for_model(model_types[0], **tiny)


def _merged(read: Mapping[str, Any], declared: Mapping[str, Any]) -> dict[str, Any]:
    """The layout read from the modules, with the YAML's declarations on top (one level deep for sections)."""
    out = dict(read)
    for key, value in declared.items():
        out[key] = {**read.get(key, {}), **value} if isinstance(value, dict) and key in ("attention", "mlp") else value
    return out


@functools.cache
def _declared() -> dict[str, dict[str, Any]]:
    """The shipped YAML files, by family name, as written."""
    files = {}
    for path in sorted(_HERE.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if data.get("name") != path.stem:
            raise RuntimeError(f"{path}: family name {data.get('name')!r} must equal the file stem {path.stem!r}")
        files[path.stem] = data
    return files


def _spec(declared: Mapping[str, Any], config: PretrainedConfig) -> FamilySpec:
    return FamilySpec(**_merged(discover_layout(config), declared))


@functools.cache
def family_specs() -> dict[str, FamilySpec]:
    """All shipped families that the installed transformers has, by name (each completed from the modules of its
    tiny config). A family added in a later transformers than this one is left out: no model of it can load here."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    specs = {}
    for name, data in _declared().items():
        if data["model_types"][0] not in CONFIG_MAPPING_NAMES:
            logger.debug("family %s: transformers %s has no model type %r", name, __version__, data["model_types"][0])
            continue
        specs[name] = _spec(data, _tiny_config(data["model_types"], data.get("tiny", {})))
    return specs


def supported_model_types() -> list[str]:
    """The model types with a family file (any other decoder of the common shape is recognised from its modules)."""
    return sorted(t for spec in family_specs().values() for t in spec.model_types)


def resolve_family(config: PretrainedConfig) -> FamilySpec:
    """The family of a model config: its family file completed from the model's modules, or, for a model type
    without one, the layout read from the modules alone. An architecture of another shape gets one error that says
    what did not fit."""
    text = config.get_text_config()
    model_type = getattr(text, "model_type", None)
    for data in _declared().values():
        if model_type in data["model_types"]:
            return _spec(data, text)
    try:
        return _spec({"name": model_type, "model_types": [model_type]}, text)
    except UnsupportedArchitectureError as error:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not recognised by hf_attn_zoo: {error}. Family files exist for "
            f"{', '.join(supported_model_types())}; describe this one in hf_attn_zoo/families/<name>.yaml."
        ) from error
