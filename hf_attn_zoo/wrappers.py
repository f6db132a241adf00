"""The transformers model inside the wrappers training adds around it (PEFT, DDP, FSDP, accelerate, torch.compile),
and how to hand it a KV cache whatever its transformers version."""

from __future__ import annotations

import inspect
from typing import Any

import torch

__all__ = ["cache_kwargs", "inner_model"]

# wrappers whose `__getattr__` forwards to `.module` (so they seem to have a `config`)
_MODULE_WRAPPERS = ("FullyShardedDataParallel", "DistributedDataParallel", "DataParallel", "DeepSpeedEngine")


def inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside PEFT / DDP / FSDP / accelerate / `torch.compile` wrappers (`model` itself when it
    is not wrapped).

    Unwraps `get_base_model()` (PEFT), `._orig_mod` (`torch.compile`'s `OptimizedModule`) and `.module` (DDP, FSDP1,
    accelerate, DeepSpeed) until a `transformers.PreTrainedModel` is reached.
    """
    from transformers import PreTrainedModel

    for _ in range(8):
        if isinstance(model, PreTrainedModel):
            break
        orig = getattr(model, "__dict__", {}).get("_modules", {}).get("_orig_mod")
        if isinstance(orig, torch.nn.Module):
            model = orig  # torch.compile (checked first: OptimizedModule forwards attribute lookups to the inner one)
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()  # PEFT
        elif isinstance(getattr(model, "module", None), torch.nn.Module) and (
            not hasattr(model, "config") or type(model).__name__ in _MODULE_WRAPPERS
        ):
            model = model.module  # DDP, FSDP, accelerate
        else:
            break
    return model


def cache_kwargs(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """`{name: cache}` for a call of `model`, by the name its forward takes the KV cache: `cache` from transformers
    5.24 on (`past_key_values` is a deprecated alias there), `past_key_values` before, where a `cache=` would go into
    `**kwargs` unused and the model would run without its cache."""
    forward = inspect.signature(inner_model(model).forward).parameters
    return {"cache" if "cache" in forward else "past_key_values": cache}
