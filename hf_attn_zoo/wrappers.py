"""The transformers model inside the wrappers training adds around it (PEFT, DDP, FSDP, accelerate, torch.compile)."""

from __future__ import annotations

import torch

__all__ = ["inner_model"]

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
