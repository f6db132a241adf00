"""Which transformers MoE architecture a dense seed becomes, and how its config is written: both are family data.

A seed family's spec names its targets (`upcycle: {every_layer: ..., some_layers: ...}`), and a target family's spec
says how its config is written (`upcycle_target`: the names of the expert count, the expert width and the dense-layer
list, what it carries over from the seed and what it cannot express). The shipped choices:

| seed | MoE on every layer | MoE on some layers |
|---|---|---|
| llama, mistral | `mixtral` | `qwen2_moe` (empty shared expert, no q/k/v bias) |
| qwen2 | `qwen2_moe` (empty shared expert) | same, with `mlp_only_layers` |
| qwen3 | `qwen3_moe` | same, with `mlp_only_layers` |

Every target is a stock transformers class, so FFN-only upcycled models load with plain `AutoModelForCausalLM`.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

from ..errors import IncompatibleModelsError, UnsupportedArchitectureError
from ..families.spec import FamilySpec, UpcycleTargetSpec, family_specs, resolve_family

__all__ = ["moe_config", "seed_families"]

_COMMON = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "attention_dropout",
)


def seed_families() -> list[str]:
    """The families whose dense models can be upcycled."""
    return sorted(name for name, spec in family_specs().items() if spec.upcycle is not None)


def _common(seed: PretrainedConfig) -> dict[str, Any]:
    out = {k: getattr(seed, k) for k in _COMMON if getattr(seed, k, None) is not None}
    out["rope_parameters"] = dict(seed.rope_parameters)
    out["dtype"] = getattr(seed, "dtype", None)
    return out


def _uses_sliding_window(seed: PretrainedConfig) -> bool:
    return bool(getattr(seed, "sliding_window", None)) and getattr(seed, "use_sliding_window", True) is not False


def _check(
    seed: PretrainedConfig,
    family: FamilySpec,
    every_layer: str,
    target: FamilySpec,
    spec: UpcycleTargetSpec,
    head_dim: int,
) -> None:
    if not spec.projection_biases and (getattr(seed, "attention_bias", False) or getattr(seed, "mlp_bias", False)):
        raise IncompatibleModelsError(
            f"{target.name} has no projection biases; this {family.name} seed uses "
            "attention_bias or mlp_bias and cannot be upcycled."
        )
    if not spec.free_head_dim and head_dim * seed.num_attention_heads != seed.hidden_size:
        raise IncompatibleModelsError(
            f"{family.name} seed with head_dim {head_dim} x {seed.num_attention_heads} heads != hidden_size: "
            f"{target.name} (used when only some layers become MoE) cannot express it; make every layer MoE."
        )
    if not spec.sliding_window and _uses_sliding_window(seed):
        raise IncompatibleModelsError(
            f"a sliding-window {family.name} seed can only be upcycled on every layer ({every_layer})."
        )


def moe_config(seed: PretrainedConfig, num_experts: int, top_k: int, moe_layers: list[int]) -> PretrainedConfig:
    """The config of the MoE built from `seed`: `num_experts` experts, top-k routing, MoE on `moe_layers`."""
    try:
        family = resolve_family(seed)
    except UnsupportedArchitectureError:
        family = None
    upcycle = family.upcycle if family is not None else None
    if family is None or upcycle is None:
        raise UnsupportedArchitectureError(
            f"cannot upcycle a {seed.model_type!r} model; supported seed architectures: {', '.join(seed_families())}."
        )
    all_layers = moe_layers == list(range(seed.num_hidden_layers))
    target = family_specs()[upcycle.every_layer if all_layers else upcycle.some_layers]
    spec = target.upcycle_target
    if spec is None:
        raise UnsupportedArchitectureError(f"family {target.name!r} names no upcycle_target to write its config")
    head_dim = getattr(seed, "head_dim", None) or seed.hidden_size // seed.num_attention_heads
    _check(seed, family, upcycle.every_layer, target, spec, head_dim)
    carried = {
        "intermediate_size": seed.intermediate_size,
        "head_dim": head_dim,
        "sliding_window": getattr(seed, "sliding_window", None),
    }
    kwargs: dict[str, Any] = {key: carried[key] for key in spec.carry}
    kwargs.update(spec.fixed)
    kwargs[spec.num_experts] = num_experts
    kwargs[spec.expert_size] = seed.intermediate_size
    if spec.dense_layers is not None:
        kwargs[spec.dense_layers] = [i for i in range(seed.num_hidden_layers) if i not in moe_layers]
    if spec.qkv_bias is not None:
        kwargs[spec.qkv_bias] = upcycle.qkv_bias or bool(getattr(seed, "attention_bias", False))
    return AutoConfig.for_model(target.model_types[0], **_common(seed), **kwargs, num_experts_per_tok=top_k)
