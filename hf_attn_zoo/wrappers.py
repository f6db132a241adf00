"""The transformers model inside the wrappers training adds around it (PEFT, DDP, FSDP, accelerate)."""

from __future__ import annotations

import torch

__all__ = ["inner_model"]


def inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside PEFT / DDP / accelerate wrappers (`model` itself when it is not wrapped)."""
    for _ in range(8):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()  # PEFT
        elif not hasattr(model, "config") and isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module  # DDP, FSDP, accelerate
        else:
            break
    return model
