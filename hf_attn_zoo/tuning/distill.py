"""Self-distillation during tuning (the recipe's `distill:` section): the frozen unpatched model as teacher.

`load_teacher` loads the teacher (by default the recipe's own `model`, without its `patches`); `distillation_loss`
is the token-level `T^2 KL(teacher_T || student_T)` that `ZooTrainer` adds to the loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .recipe import Recipe

__all__ = ["distillation_loss", "load_teacher", "teacher_logits"]


def load_teacher(recipe: Recipe) -> torch.nn.Module:
    """The frozen teacher of `recipe.distill`: `distill.teacher` or the recipe's model, loaded as saved (a patched
    checkpoint keeps its recorded patches; the recipe's `patches` are not applied), in eval mode."""
    from .model import load_model_and_tokenizer

    source = recipe.model_copy(deep=True)
    if recipe.distill is not None and recipe.distill.teacher is not None:
        source.model.path = recipe.distill.teacher
    source._source = recipe._source
    teacher, _ = load_model_and_tokenizer(source)
    teacher.eval().requires_grad_(False)
    teacher.config.use_cache = False  # type: ignore[union-attr]
    return teacher


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over tokens of `T^2 KL(softmax(t / T) || softmax(s / T))`, in fp32 (`[B, T, V]` logits; padding
    positions, `attention_mask == 0`, do not count)."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)  # [B, T]
    if attention_mask is not None:
        weights = attention_mask.to(kl.dtype)
        return (kl * weights).sum() / weights.sum().clamp_min(1.0) * temperature**2
    return kl.mean() * temperature**2


def teacher_logits(teacher: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The teacher's logits for a training batch (no gradient)."""
    with torch.no_grad():
        kwargs = {k: inputs[k] for k in ("input_ids", "attention_mask") if k in inputs}
        return teacher(**kwargs, use_cache=False).logits
