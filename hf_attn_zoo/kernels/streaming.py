"""StreamingLLM positions for decoding past the prefill ("Efficient Streaming Language Models with Attention Sinks",
arXiv:2309.17453, Sec. 3.2): positions are counted *inside the cache*, not in the text.

The cache holds the `sinks` first tokens and the last `window` positions. StreamingLLM (and transformers v4's
`SinkCache`) gives them the cache positions `0..sinks-1` and `sinks..sinks+window-1` and the query the last one. RoPE
scores depend only on the distance between query and key, and the window keys are contiguous and end at the query, so
their distances are the same in text and cache positions; only the sinks move closer: a query at text position `p`
sees sink `s` at distance `sinks + window - 1 - s` instead of `p - s`. Here the keys keep their text positions (as
`SinkWindowLayer` stores them) and each query is rotated back by `delta = max(0, p - (sinks + window - 1))` for its
scores against the sinks only; the result equals re-rotating the whole cache at cache positions (tested), and every
distance stays below `sinks + window`, so decoding can run past `max_position_embeddings`.
"""

from __future__ import annotations

import torch

from ..errors import InvalidOptionError
from .masks import left_padding

__all__ = ["StreamingPositions", "rotate", "streaming_rotary"]

# RoPE variants whose frequencies do not depend on the sequence length (dynamic NTK and LongRoPE switch with it)
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE rotation of `x` `[..., Q, D]` by `positions` (broadcast to `[..., Q]`), in transformers' half-split layout
    (`rotate_half`); a negative position rotates back."""
    angles = positions.to(inv_freq.dtype)[..., None] * inv_freq  # [..., Q, D/2]
    angles = torch.cat([angles, angles], dim=-1)
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * angles.cos() + rotated_half * angles.sin()).to(x.dtype)


def streaming_rotary(model: torch.nn.Module, head_dim: int) -> torch.Tensor:
    """The inverse frequencies of `model`'s RoPE, or one clear error when StreamingLLM positions cannot apply."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None:
        raise InvalidOptionError(
            "sliding_window: stream=True needs a model with rotary position embeddings "
            "(`rotary_emb`); use stream=False."
        )
    if not isinstance(getattr(rotary, "inv_freq", None), torch.Tensor):
        raise InvalidOptionError(
            "sliding_window: stream=True is not supported on models whose RoPE differs per layer "
            "type (e.g. Gemma 3's local and global layers); use stream=False."
        )
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type not in _STATIC_ROPE:
        raise InvalidOptionError(
            f"sliding_window: stream=True needs RoPE frequencies that do not change with the "
            f"length; this model uses rope_type={rope_type!r} ({', '.join(_STATIC_ROPE)} work)."
        )
    if rotary.inv_freq.numel() * 2 != head_dim:
        raise InvalidOptionError(
            f"sliding_window: stream=True needs RoPE on the whole head ({head_dim} dims), this "
            f"model rotates {rotary.inv_freq.numel() * 2}; use stream=False."
        )
    return rotary.inv_freq


class StreamingPositions:
    """Attention of decode-time queries over a `SinkWindowLayer` cache with StreamingLLM's cache positions."""

    def __init__(self, inv_freq: torch.Tensor, sinks: int, window: int):
        self.inv_freq, self.sinks, self.window = inv_freq, sinks, window

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_positions: torch.Tensor,
        query_positions: torch.Tensor,
        padding: torch.Tensor | None,
        scaling: float,
    ) -> torch.Tensor:
        """`query` `[B, H, Q, D]` at text positions `query_positions` `[Q]`; `key`/`value` `[B, KV, K, D]` (the cache,
        GQA not repeated) at `key_positions` `[K]`; `padding` `[B, T]` (True = real token) or None. Returns
        `[B, Q, H, D]`."""
        batch, heads = query.shape[:2]
        group = heads // key.shape[1]
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        offsets = left_padding(padding, batch, query.device)[:, None]  # [B, 1]: each row's first real position
        q_rel = query_positions[None, :] - offsets  # [B, Q]
        k_rel = key_positions[None, :] - offsets  # [B, K]
        distance = q_rel[:, :, None] - k_rel[:, None, :]  # [B, Q, K]
        sink = (k_rel >= 0) & (k_rel < self.sinks)
        allowed = (distance >= 0) & (k_rel[:, None, :] >= 0) & ((distance < self.window) | sink[:, None, :])
        if padding is not None:
            allowed = allowed & padding[:, key_positions][:, None, :]
        delta = (q_rel - (self.sinks + self.window - 1)).clamp(min=0)  # [B, Q]
        shifted = rotate(query, -delta[:, None, :], self.inv_freq.to(query.device))
        scores = torch.where(sink[:, None, None, :], shifted @ key.transpose(-1, -2), query @ key.transpose(-1, -2))
        # fp32 softmax, cast back to the values' dtype
        scores = (scores.float() * scaling).masked_fill(~allowed[:, None], float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # padding queries attend nothing: zeros
        return (weights.to(value.dtype) @ value).transpose(1, 2).contiguous()
