"""Padding from the attention mask transformers hands an attention function, in one canonical form.

Sparse kernels build their own causal pattern, so all they need from the model's mask is which keys are padding.
transformers passes, depending on the base implementation: `None` (no padding), a 4-D boolean mask `[B, 1, Q, KV]`
(`sdpa`, True = attend), a 4-D additive float mask (`eager`, 0 = attend), or a 2-D `[B, KV]` padding mask
(`flash_attention_*`). A flex `BlockMask` carries no readable padding and is refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UnsupportedArchitectureError

__all__ = ["allowed_keys", "key_padding", "left_padding", "longest_row", "masked_sdpa", "padding_or_none"]


def key_padding(attention_mask: torch.Tensor | None, batch: int, kv_len: int) -> torch.Tensor | None:
    """Real (non-padding) keys `[B, KV]` (bool, True = real token), or `None` when no key is padding.

    Under `torch.compile` a mask without padding is returned as it is: telling it from `None` reads its values (a host
    sync and a graph break), and every kernel gives the same result for an all-real mask as for `None`.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise UnsupportedArchitectureError(
            f"sparse attention cannot read padding from a {type(attention_mask).__name__}; load the model with "
            "attn_implementation='sdpa' (or 'eager') before patching it with a sparse-attention method"
        )
    mask = attention_mask
    if mask.dim() == 4:
        # the last query row of a causal mask allows every key up to the end of the cache, except padding
        mask = mask[:, 0, -1, :]
    if mask.dtype != torch.bool:
        mask = mask == 0 if mask.is_floating_point() and attention_mask.dim() == 4 else mask.bool()
    mask = mask[:, -kv_len:]
    if mask.shape[0] == 1 and batch > 1:
        mask = mask.expand(batch, -1)
    return padding_or_none(mask)


def padding_or_none(mask: torch.Tensor) -> torch.Tensor | None:
    """`mask` (real tokens `[B, S]`), or `None` when no token is padding, so kernels take their unpadded fast path.

    Under `torch.compile` the mask is returned as it is: telling it from `None` reads its values (a host sync and a
    graph break), and every kernel gives the same result for an all-real mask as for `None`.
    """
    return mask if torch.compiler.is_compiling() or not bool(mask.all()) else None


def left_padding(padding: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """Per row, the index of the first real key `[B]` (0 without padding): patterns count positions from it."""
    if padding is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    return padding.to(torch.int8).argmax(dim=-1).to(device)


def longest_row(padding: torch.Tensor | None, total: int) -> int:
    """Real tokens of the batch's longest row, for a handler's "is this input long enough for the method" check;
    under `torch.compile` (no host sync) the padded length `total` stands for it."""
    if padding is None or torch.compiler.is_compiling():
        return total
    return total - int(left_padding(padding, padding.shape[0], padding.device).min())


def masked_sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float, dropout: float
) -> torch.Tensor:
    """SDPA with a boolean mask (GQA keys not repeated); rows with no allowed key (padding queries) give zeros
    instead of NaN. Under `torch.compile` the empty rows are always handled (no host sync to find whether there are
    any)."""
    empty = ~mask.any(-1, keepdim=True)
    any_empty = torch.compiler.is_compiling() or bool(empty.any())
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask | empty if any_empty else mask,
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.masked_fill(empty, 0.0) if any_empty else out


def allowed_keys(
    attention_mask: torch.Tensor | None, batch: int, q_len: int, k_len: int, device: torch.device
) -> torch.Tensor:
    """Which keys each query attends `[B or 1, 1, Q, K]` (bool), for analyses that read the model's own attention;
    the queries are the last `q_len` of the `k_len` positions. `None` is causal; a 2-D padding mask is causal too."""
    if attention_mask is None:
        queries = torch.arange(k_len - q_len, k_len, device=device)[:, None]
        return (torch.arange(k_len, device=device)[None, :] <= queries)[None, None]
    if not isinstance(attention_mask, torch.Tensor):
        raise UnsupportedArchitectureError(
            f"cannot read which keys are attended from a {type(attention_mask).__name__} (flex attention's "
            "BlockMask); load the model with attn_implementation='sdpa' or 'eager'"
        )
    if attention_mask.dim() == 4:
        mask = attention_mask[:, :1, -q_len:, -k_len:]
        return mask if mask.dtype == torch.bool else mask == 0
    causal = allowed_keys(None, batch, q_len, k_len, device)
    return causal & attention_mask[:, None, None, -k_len:].bool()
