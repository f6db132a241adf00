"""The `zoo` attention implementation: a dispatcher in front of the model's own attention function.

A patch that needs the per-head attention outputs (MoH gates them, sparse methods replace them) installs a
*handler* on an attention module instance. While any layer of a model carries a handler, the model runs with
`config._attn_implementation = "zoo"`; layers without a handler call the original implementation (`sdpa`,
`eager`, `flex_attention` ...), which is remembered in `config._zoo_base_attn_implementation`.

The attention function and its mask function are registered together: without the mask function transformers
passes `attention_mask=None` and padding is silently ignored.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

__all__ = ["ZOO_ATTENTION", "AttentionHandler", "base_attention_function", "install_handler", "remove_handler"]

# "zoo" holds none of the substrings ("flash", "sdpa", "flex_attention", "/") that transformers parses specially.
ZOO_ATTENTION = "zoo"
_BASE_ATTR = "_zoo_base_attn_implementation"
_HANDLER_ATTR = "_zoo_attention_handler"

AttentionFunction = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
# handler(base_fn, module, query, key, value, attention_mask, **kwargs) -> (attn_output [B, T, H, D], weights)
AttentionHandler = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def _base_name(config: Any) -> str:
    return getattr(config, _BASE_ATTR, None) or "sdpa"


def base_attention_function(config: Any, module: torch.nn.Module | None = None) -> AttentionFunction:
    """The attention function the model used before the `zoo` dispatcher took over.

    `eager` is not in transformers' registry: each family's attention module calls the `eager_attention_forward` of
    its own modeling file (Gemma 2's applies the logit softcap, GPT-OSS's adds the sink logits), so that one is used
    when `module` is given; Llama's otherwise.
    """
    name = _base_name(config)
    if name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    for cls in type(module).__mro__ if module is not None else ():
        own = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if callable(own):
            return own
    return eager_attention_forward


def zoo_attention_forward(module, query, key, value, attention_mask, **kwargs):
    base = base_attention_function(module.config, module)
    handler = getattr(module, _HANDLER_ATTR, None)
    if handler is None:
        return base(module, query, key, value, attention_mask, **kwargs)
    return handler(base, module, query, key, value, attention_mask, **kwargs)


def zoo_attention_mask(*args, config=None, **kwargs):
    return ALL_MASK_ATTENTION_FUNCTIONS[_base_name(config)](*args, config=config, **kwargs)


AttentionInterface.register(ZOO_ATTENTION, zoo_attention_forward)
AttentionMaskInterface.register(ZOO_ATTENTION, zoo_attention_mask)


def _configs(model: torch.nn.Module) -> list[Any]:
    """The model's config and any sub-configs that carry their own attention implementation."""
    configs = [model.config]
    for sub in ("text_config",):
        if getattr(model.config, sub, None) is not None:
            configs.append(getattr(model.config, sub))
    return configs


def install_handler(model: torch.nn.Module, module: torch.nn.Module, handler: AttentionHandler) -> None:
    """Route `module`'s attention through `handler`, switching the model to the `zoo` dispatcher if needed."""
    if getattr(module, _HANDLER_ATTR, None) is not None:
        raise RuntimeError(f"{type(module).__name__} already has an attention handler")
    for config in _configs(model):
        current = config._attn_implementation
        if current != ZOO_ATTENTION:
            setattr(config, _BASE_ATTR, current or "sdpa")
            config._attn_implementation = ZOO_ATTENTION
    setattr(module, _HANDLER_ATTR, handler)


def remove_handler(model: torch.nn.Module, module: torch.nn.Module) -> None:
    """Undo `install_handler`; the model returns to its own implementation once no handler is left."""
    if hasattr(module, _HANDLER_ATTR):
        delattr(module, _HANDLER_ATTR)
    if any(getattr(m, _HANDLER_ATTR, None) is not None for m in model.modules()):
        return
    for config in _configs(model):
        if config._attn_implementation == ZOO_ATTENTION:
            config._attn_implementation = _base_name(config)
        if hasattr(config, _BASE_ATTR):
            delattr(config, _BASE_ATTR)
