"""PowerAttention: exponentially scaling receptive fields (arXiv:2503.03588, Alg. 1).

Static block-sparse causal pattern with blocks of `block_size` tokens. With `d = q // b - k // b` the block distance,
query `q` attends key `k <= q` when `d < window_blocks` (local window), `d` is a power of two (`d & (d - 1) == 0`,
dilated blocks at distances 1, 2, 4, 8 ...), or `k` lies in the first `sink_blocks` blocks. Any distance below `2^L`
is reachable in at most `L` layers; each query reads `O(window + log2(N / b))` blocks.

Paper defaults: 256-token blocks, a 5-block window, one sink block; the paper continue-trains (1B tokens) and keeps
some full-attention layers (2 of every 7). Training-free here as a drop-in; tunable with the recipe runner (no new
parameters: tune the base weights or LoRA). Decode reads the full KV cache with the same pattern (no eviction: the
power-of-two blocks reach back to the start). Neutral setting: a window as long as the model's position range.
Official code: https://github.com/w568w/PowerAttention
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PretrainedConfig

from ..families.spec import FamilySpec
from ..kernels.pattern_handler import install_pattern, max_positions, unsupported_attention_reason
from ..kernels.sparse_attention import AttentionPattern
from ..options import POSITIONS, blocks_of
from ..registry import Capabilities, Patch, PatchConfig, PatchHandle, register_patch

__all__ = ["PowerAttentionConfig", "PowerAttentionPatch", "PowerPattern"]


@dataclass
class PowerAttentionConfig(PatchConfig):
    block_size: int = field(
        default=256, metadata={"help": "tokens per block b (paper: 256).", "ge": 1, "le": POSITIONS}
    )
    window_blocks: int = field(
        default=5,
        metadata={
            "help": "local window W in blocks, the query's own included (paper: 5).",
            "ge": 1,
            "le": blocks_of("block_size"),
        },
    )
    sink_blocks: int = field(
        default=1,
        metadata={"help": "initial blocks every query attends (paper: 1).", "ge": 0, "le": blocks_of("block_size")},
    )
    backend: Literal["auto", "flex", "blocks", "masked"] = field(
        default="auto",
        metadata={
            "help": "auto (one masked SDPA for short inputs; else gathered-block SDPA on CPU, "
            "compiled flex on a GPU), or force one."
        },
    )


class PowerPattern(AttentionPattern):
    def __init__(self, block_size: int, window_blocks: int, sink_blocks: int):
        self.block_size, self.window_blocks, self.sink_blocks = block_size, window_blocks, sink_blocks
        # tensors, so compiled FlexAttention does not specialise (and recompile) on every setting
        self._block, self._window, self._sink_end = (
            torch.tensor(v) for v in (block_size, window_blocks, sink_blocks * block_size)
        )

    def allowed(self, q, k, head):
        d = q // self._block - k // self._block
        power_of_two = (d & (d - 1)) == 0
        return (q >= k) & ((d < self._window) | power_of_two | (k < self._sink_end))

    def cache_key(self):
        return ("power", self.block_size, self.window_blocks, self.sink_blocks)


@register_patch
class PowerAttentionPatch(Patch):
    name = "power_attention"
    summary = "PowerAttention: sink + local window + power-of-two dilated blocks (static block-sparse)."
    config_class = PowerAttentionConfig
    capabilities = Capabilities(training_free=True, new_params=False, kv_cache=True, generate=True, static_cache=False)
    targets = ("attention_fn",)

    def check(self, family: FamilySpec, model_config: PretrainedConfig) -> str | None:
        return unsupported_attention_reason(family)

    def pattern(self, config: PowerAttentionConfig) -> PowerPattern:
        return PowerPattern(config.block_size, config.window_blocks, config.sink_blocks)

    def apply(
        self, model, config: PowerAttentionConfig, family: FamilySpec, layers: list[int], handle: PatchHandle
    ) -> None:
        pattern = self.pattern(config)
        install_pattern(model, family, layers, handle, lambda index: pattern, config.backend)

    def neutral_config(self, family: FamilySpec, model_config: PretrainedConfig) -> PowerAttentionConfig:
        limit = max_positions(model_config)
        return PowerAttentionConfig(block_size=1, window_blocks=limit, sink_blocks=0)
