"""Which transformers MoE architecture a dense seed becomes, and how its config is written.

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

__all__ = ["SEED_MODEL_TYPES", "moe_config"]

SEED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

_COMMON = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
           "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "tie_word_embeddings",
           "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout")


def _common(seed: PretrainedConfig) -> dict[str, Any]:
    out = {k: getattr(seed, k) for k in _COMMON if getattr(seed, k, None) is not None}
    out["rope_parameters"] = dict(seed.rope_parameters)
    out["dtype"] = getattr(seed, "dtype", None)
    return out


def moe_config(seed: PretrainedConfig, num_experts: int, top_k: int, moe_layers: list[int]) -> PretrainedConfig:
    """The config of the MoE built from `seed`: `num_experts` experts, top-k routing, MoE on `moe_layers`."""
    model_type = seed.model_type
    if model_type not in SEED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"cannot upcycle a {model_type!r} model; supported seed architectures: {', '.join(SEED_MODEL_TYPES)}."
        )
    all_layers = moe_layers == list(range(seed.num_hidden_layers))
    dense_layers = [i for i in range(seed.num_hidden_layers) if i not in moe_layers]
    common = _common(seed)
    head_dim = getattr(seed, "head_dim", None) or seed.hidden_size // seed.num_attention_heads
    if model_type in ("llama", "mistral") and all_layers:
        if getattr(seed, "attention_bias", False) or getattr(seed, "mlp_bias", False):
            raise IncompatibleModelsError("Mixtral has no projection biases; this Llama seed uses attention_bias or "
                                          "mlp_bias and cannot be upcycled.")
        return AutoConfig.for_model(
            "mixtral", **common, head_dim=head_dim, intermediate_size=seed.intermediate_size,
            num_local_experts=num_experts, num_experts_per_tok=top_k,
            sliding_window=getattr(seed, "sliding_window", None),
        )
    if model_type in ("llama", "mistral", "qwen2"):
        if head_dim * seed.num_attention_heads != seed.hidden_size:
            raise IncompatibleModelsError(
                f"{model_type} seed with head_dim {head_dim} x {seed.num_attention_heads} heads != hidden_size: "
                "Qwen2-MoE (used when only some layers become MoE) cannot express it; make every layer MoE."
            )
        if getattr(seed, "sliding_window", None) and model_type == "mistral":
            raise IncompatibleModelsError(
                "a sliding-window Mistral seed can only be upcycled on every layer (Mixtral)."
            )
        return AutoConfig.for_model(
            "qwen2_moe", **common, intermediate_size=seed.intermediate_size,
            moe_intermediate_size=seed.intermediate_size,
            shared_expert_intermediate_size=0, num_experts=num_experts, num_experts_per_tok=top_k,
            norm_topk_prob=True, mlp_only_layers=dense_layers, decoder_sparse_step=1,
            qkv_bias=model_type == "qwen2" or bool(getattr(seed, "attention_bias", False)),
        )
    return AutoConfig.for_model(
        "qwen3_moe", **common, head_dim=head_dim, attention_bias=getattr(seed, "attention_bias", False),
        intermediate_size=seed.intermediate_size, moe_intermediate_size=seed.intermediate_size,
        num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=True, mlp_only_layers=dense_layers,
        decoder_sparse_step=1,
    )
