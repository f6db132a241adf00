"""The generic family adapter: read a decoder's layout from its modules instead of a YAML file.

Most transformers decoders share one shape: `model.layers[i]` holding an attention module with separate
`q_proj`/`k_proj`/`v_proj`/`o_proj` projections (run through the shared attention interface) and an MLP that is either
dense or a sparse MoE block with a `gate`/`router` and fused `experts`. `discover_layout` builds the model on the meta
device (no memory, no weights) and reads what a family spec says from it: where the layers are, the attention's
projections, q/k norms and their scope, per-head attention sinks, the norms around the block, the MLP kind and its
router and experts. What it cannot read, the MoE routing rule, a family YAML declares (`mlp.routing`); without one
the routing tools refuse that family, naming the fix. A decoder of another shape (fused q/k/v, no decoder-layer
list) gets one error that says what was found.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from ..errors import UnsupportedArchitectureError

__all__ = ["discover_layout"]

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLA = ("q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
_QK_NORMS = (("q_norm", "k_norm"), ("q_layernorm", "k_layernorm"), ("query_layernorm", "key_layernorm"))
_MLP_NAMES = ("mlp", "block_sparse_moe", "feed_forward")
_ROUTER_NAMES = ("gate", "router")
# decoder-layer norms -> block layout (what BAM's parallel block and similar rewiring must know)
_BLOCKS = {
    frozenset({"input_layernorm", "post_attention_layernorm"}): "pre_norm",
    frozenset({"post_attention_layernorm", "post_feedforward_layernorm"}): "post_norm",
    frozenset(
        {"input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"}
    ): "sandwich",
    frozenset({"input_layernorm"}): "parallel",
}


def _layers_path(model: torch.nn.Module, num_layers: int) -> str:
    lists = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers and name.endswith("layers")
    ]
    if not lists:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no list of {num_layers} decoder layers named `layers` to patch"
        )
    return min(lists, key=len)


def _attention(layer: torch.nn.Module, head_dim: int) -> dict[str, Any]:
    for name, module in layer.named_children():
        if all(isinstance(getattr(module, p, None), torch.nn.Linear) for p in _PROJECTIONS):
            spec: dict[str, Any] = {"module": name, "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
            for q_norm, k_norm in _QK_NORMS:
                norm = getattr(module, q_norm, None)
                weight = getattr(norm, "weight", None)
                if isinstance(weight, torch.Tensor) and hasattr(module, k_norm):
                    spec["qk_norm"] = (q_norm, k_norm)
                    spec["qk_norm_scope"] = "head" if weight.shape[-1] == head_dim else "projection"
            sinks = getattr(module, "sinks", None)
            if isinstance(sinks, torch.nn.Parameter):
                spec["sinks"] = "sinks"
            spec["interface"] = _uses_attention_interface(module)
            spec["rope"] = _rope_layout(module)
            return spec
        if all(hasattr(module, p) for p in _MLA):
            return {"module": name, "kind": "mla", "interface": _uses_attention_interface(module)}
    children = ", ".join(f"{n} ({type(m).__name__})" for n, m in layer.named_children())
    raise UnsupportedArchitectureError(
        f"its decoder layer has no attention module with separate q_proj/k_proj/v_proj/o_proj projections (fused "
        f"q/k/v or another layout); the layer holds: {children}"
    )


def _uses_attention_interface(module: torch.nn.Module) -> bool:
    """Whether the module's forward dispatches through transformers' attention interface (`ALL_ATTENTION_FUNCTIONS`),
    where attention-function patches take over; one that computes attention itself would silently ignore them."""
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source or "attention_interface" in source


def _rope_layout(module: torch.nn.Module) -> str:
    """How the family's `rotate_half` pairs a head's channels: `interleaved` (2i with 2i + 1) or `half` (c with
    c + d/2, the default and what a module without its own `rotate_half` is assumed to use)."""
    rotate_half = getattr(sys.modules.get(type(module).__module__), "rotate_half", None)
    try:
        source = inspect.getsource(rotate_half) if rotate_half is not None else ""
    except (OSError, TypeError):
        source = ""
    return "interleaved" if "0::2]" in source or "..., ::2]" in source else "half"


def _mlp(layers: torch.nn.ModuleList) -> dict[str, Any]:
    first = layers[0]
    name = next((n for n in _MLP_NAMES if hasattr(first, n)), None)
    if name is None:
        children = ", ".join(n for n, _ in first.named_children())
        raise UnsupportedArchitectureError(f"its decoder layer has no MLP named {' / '.join(_MLP_NAMES)} ({children})")
    for layer in layers:  # MoE families may keep dense layers first
        block = getattr(layer, name)
        router = next(
            (r for r in _ROUTER_NAMES if isinstance(getattr(getattr(block, r, None), "weight", None), torch.Tensor)),
            None,
        )
        if router is not None and hasattr(block, "experts"):
            return {"module": name, "kind": "moe", "router": router, "experts": "experts"}
    return {"module": name, "kind": "dense"}


def _block(layer: torch.nn.Module) -> str:
    norms = frozenset(n for n, _ in layer.named_children() if n.endswith("layernorm"))
    return _BLOCKS.get(norms, "other")


_CACHE: dict[str, dict[str, Any]] = {}


def discover_layout(config: PretrainedConfig) -> dict[str, Any]:
    """The layout fields of a family spec (`layers`, `attention`, `mlp`, `block`) read from the modules of a model
    of `config`, built on the meta device (cached per config). Raises `UnsupportedArchitectureError` naming what
    does not fit."""
    key = config.to_json_string(use_diff=False)
    if key not in _CACHE:
        if len(_CACHE) > 64:
            _CACHE.clear()
        _CACHE[key] = _read_layout(config)
    return _CACHE[key]


def _read_layout(config: PretrainedConfig) -> dict[str, Any]:
    text = config.get_text_config()
    heads, layers_count = getattr(text, "num_attention_heads", None), getattr(text, "num_hidden_layers", None)
    if not isinstance(heads, int) or not isinstance(layers_count, int):
        raise UnsupportedArchitectureError(
            "its config names no num_attention_heads / num_hidden_layers (the names the common decoder shape uses)"
        )
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as error:
        raise UnsupportedArchitectureError(
            f"transformers has no causal LM for model_type {config.model_type!r}: {error}"
        ) from error
    except Exception as error:  # a config transformers itself cannot build a model from
        raise UnsupportedArchitectureError(
            f"transformers cannot build a {config.model_type!r} model from this config ({type(error).__name__}: "
            f"{error})"
        ) from error
    path = _layers_path(model, layers_count)
    layers = model.get_submodule(path)
    return {
        "layers": path,
        "attention": _attention(layers[0], head_dim),
        "mlp": _mlp(layers),
        "block": _block(layers[0]),
    }
