"""Undoing a family's RoPE inside an attention function, for methods that work on the vectors before the rotation
(content-based routing clusters, NaLaFormer's features).

The attention function receives q/k after RoPE. A family's own `apply_rotary_pos_emb` with `-sin` rotates them back
(whatever its channel pairing or partial rotary share), given the `position_embeddings` (cos, sin) its attention
module was called with, which `capture_position_embeddings` stores on the module for the handler to `pop`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from ..errors import UnsupportedArchitectureError
from .spec import FamilySpec

__all__ = ["capture_position_embeddings", "channel_pairs", "pre_rope_refusal", "rotary_function"]

RotaryFunction = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (q, k, cos, sin) -> (q, k) rotated


def pre_rope_refusal(family: FamilySpec, what: str) -> str | None:
    """Why `family`'s pre-RoPE vectors cannot be recovered (`what` needs them), or None."""
    if family.attention.kind != "standard":
        return (
            f"its {family.attention.kind} attention rotates only part of each key, so the pre-RoPE vectors {what} "
            "cannot be recovered"
        )
    return None


def channel_pairs(family: FamilySpec, config: Any) -> tuple[int, list[int]]:
    """How RoPE pairs the channels of a standard attention head: `(rotary pairs, pair of each channel)`.

    Pair `i` of the `r` rotated channels turns at the `i`-th frequency: channels `c` and `c + r/2` in the
    `rotate_half` layout, `2i` and `2i + 1` in the interleaved one (`attention.rope`). Channels past the rotary share
    (partial rotary) are never rotated; each gets an id of its own after the rotary pairs.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layout = family.head_layout(text)
    rope = getattr(text, "rope_parameters", None) or {}  # transformers v5 keeps the factor there, older configs not
    factor = getattr(text, "partial_rotary_factor", None) or rope.get("partial_rotary_factor") or 1.0
    rotary = int(layout.head_dim * factor)
    free = [rotary // 2 + c for c in range(layout.head_dim - rotary)]
    pairs = (
        [c // 2 for c in range(rotary)]
        if family.attention.rope == "interleaved"
        else [c % (rotary // 2) for c in range(rotary)]
    )
    return rotary // 2, pairs + free


def rotary_function(attention: torch.nn.Module, method: str) -> RotaryFunction:
    """The `apply_rotary_pos_emb` of the module that defines `attention`'s class (one clear error if it has none)."""
    rope = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)
    if rope is None:
        raise UnsupportedArchitectureError(
            f"{method}: {type(attention).__module__} has no apply_rotary_pos_emb to undo; it needs the vectors "
            "before RoPE."
        )
    return rope


def capture_position_embeddings(
    attention: torch.nn.Module, attr: str, method: str
) -> torch.utils.hooks.RemovableHandle:
    """A forward pre-hook that stores the (cos, sin) `attention` is called with in `attention.__dict__[attr]`."""

    def capture(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        rope = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        if rope is None:
            raise UnsupportedArchitectureError(
                f"{method} needs the rotary embeddings (position_embeddings) that {type(module).__name__} receives; "
                "this call passed none."
            )
        module.__dict__[attr] = rope

    return attention.register_forward_pre_hook(capture, with_kwargs=True)
