"""Combiner: Full Attention Transformer with Sparse Computation Cost (arXiv:2107.05768), Sec. 3-4.

Attention as a conditional expectation, factorised: query `i`'s causal support `{j <= i}` is split into a direct
part `Ω_i^0` and disjoint regions `Ω_i^r`,

    A(x_i) = sum_{j in Ω_i^0} p~(j|i) v_j + sum_r p(Ω_i^r|i) sum_{j in Ω_i^r} p(j|Ω_i^r) v_j,

`p~(j|i) ∝ exp(q_i.k_j / sqrt d)`, `p(Ω^r|i) ∝ exp(q_i.k_{Ω^r} / sqrt d)` with the region key the max-pool of its
keys, both under ONE normaliser; `p(j|Ω^r) ∝ exp(q_{Ω^r}.k_j / sqrt d)` with `q_{Ω^r}` the max-pool of the region's
queries, normalised within the region (query-independent, so computed once per region). Every key stays reachable
in one layer at sub-quadratic cost. Blocks of `block_size` tokens (from each row's first real token); a query
attends its last `direct_blocks` blocks directly (its own, partial block always: causal); earlier blocks are
regions: `fixed` (Combiner-Fixed, one region per block, `O(L sqrt L)` at `block_size ~ sqrt L`) or `logsparse`
(Combiner-Logsparse, aligned spans whose size doubles with the distance, `O(L log L)`)
(`hf_attn_zoo.kernels.combiner`). Not in the paper: `sink_blocks` keeps each row's first blocks exact (pretrained
LLMs park attention on the first tokens, which a pooled region blurs), `size_bias` adds `log |Ω^r|` to a region's
logit, `pooling="mean"` (with RoPE, max-pooling rotated keys depends on absolute positions; mean-pooling is linear,
so the logits stay functions of relative positions). The layer's scaling, logit softcap (Gemma 2) and sliding window
(regions only where wholly inside it; the window's other keys direct) are kept.

Decode: the KV cache keeps every key (and value) plus every query (the pooled region queries need them: `H/KV`
times the key cache, e.g. 3x for SmolLM2); each step recomputes the region summaries from the cache, `O(S d)` per
head and step for `fixed` (`O(S log S d)` for `logsparse`), the order of a dense decode step, so decoding is exact
(equals the full forward's last row) but no cheaper than dense.

Training-free (parameter-free pooling), though the paper trains from scratch: expect to continue-tune. What it
replaces: the attention function of each patched layer (through the `zoo` dispatcher). While no query of the input
has a region (rows of at most `direct_blocks * block_size` tokens) the layer runs the model's own attention
function. Neutral setting: one block as long as the model's position range.
Official code: https://github.com/google-research/google-research/tree/master/combiner
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PretrainedConfig

from ..errors import UnsupportedArchitectureError
from ..families.spec import FamilySpec
from ..kernels.combiner import combiner_attention, has_regions
from ..kernels.kv_cache import RetainingLayer, current_kv_layer, use_kv_layer
from ..kernels.masks import longest_row
from ..kernels.pattern_handler import check_length, max_positions, unsupported_attention_reason
from ..kernels.register import install_handler, remove_handler
from ..kernels.sparse_attention import PaddingTracker
from ..options import POSITIONS, blocks_of
from ..registry import Capabilities, Patch, PatchConfig, PatchHandle, register_patch

__all__ = ["CombinerConfig", "CombinerPatch", "QueryCacheLayer"]


@dataclass
class CombinerConfig(PatchConfig):
    factorisation: Literal["fixed", "logsparse"] = field(
        default="fixed",
        metadata={
            "help": "fixed (Combiner-Fixed: every earlier block is one region) or logsparse (Combiner-Logsparse: "
            "spans of blocks doubling in size with the distance, O(L log L))."
        },
    )
    block_size: int = field(
        default=64,
        metadata={
            "help": "tokens per block, the finest region (paper, fixed: about sqrt of the sequence length).",
            "ge": 1,
            "le": POSITIONS,
        },
    )
    direct_blocks: int = field(
        default=1,
        metadata={
            "help": "most recent blocks, the query's own included, attended directly (paper: 1).",
            "ge": 1,
            "le": blocks_of("block_size"),
        },
    )
    sink_blocks: int = field(
        default=0,
        metadata={
            "help": "each row's first blocks, always attended exactly (attention sinks, as StreamingLLM keeps; not in "
            "the paper): the regions start after them.",
            "ge": 0,
            "le": blocks_of("block_size"),
        },
    )
    pooling: Literal["max", "mean"] = field(
        default="max",
        metadata={"help": "pooling of a region's keys (its key) and queries (its query): max (paper) or mean."},
    )
    size_bias: bool = field(
        default=False,
        metadata={
            "help": "add log(region size) to each region's logit, so a region weighs as the keys it stands for "
            "(not in the paper; can help training-free use)."
        },
    )


class QueryCacheLayer(RetainingLayer):
    """A cache layer that keeps every key and value, and every query (`queries`, appended by the handler): the
    pooled region queries of a decode step read the queries of positions already in the cache."""

    def __init__(self) -> None:
        super().__init__()
        self.queries: torch.Tensor | None = None

    def add_queries(self, query: torch.Tensor) -> torch.Tensor:
        """Append this call's queries `[B, H, Q, D]`; returns every query so far `[B, H, S, D]`."""
        self.queries = query if self.queries is None else torch.cat([self.queries, query], dim=-2)
        return self.queries

    def reset(self) -> None:
        super().reset()
        self.queries = None

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.queries is not None:
            self.queries = self.queries.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.queries is not None:
            self.queries = self.queries[indices]

    @property
    def nbytes(self) -> int:
        return super().nbytes + (0 if self.queries is None else self.queries.nbytes)


def _combiner_handler(
    base, module, query, key, value, attention_mask, *, config: CombinerConfig, tracker: PaddingTracker, **kwargs
):
    """Attention handler of a Combiner layer (see `hf_attn_zoo.kernels.register`)."""
    batch, _, q_len, _ = query.shape
    total = key.shape[2]
    check_length(module, total)
    layer = current_kv_layer(module)
    # every call's queries go to the cache, also those the model's own attention serves below
    queries = layer.add_queries(query) if isinstance(layer, QueryCacheLayer) else query
    padding = tracker.padding(attention_mask, batch, total)
    longest = longest_row(padding, total)  # under torch.compile the padded length
    if not has_regions(longest, config.block_size, config.direct_blocks + config.sink_blocks):
        return base(module, query, key, value, attention_mask, **kwargs)
    if queries.shape[2] != total:
        raise UnsupportedArchitectureError(
            f"combiner: a call with {q_len} queries over {total} cached keys, but the cache holds no queries for "
            "the earlier positions (the region queries pool them); decode with a DynamicCache (the default), not a "
            "static or pre-filled cache."
        )
    out = combiner_attention(
        query,
        key,
        value,
        factorisation=config.factorisation,
        block_size=config.block_size,
        direct_blocks=config.direct_blocks,
        sink_blocks=config.sink_blocks,
        pooling=config.pooling,
        size_bias=config.size_bias,
        scaling=kwargs.get("scaling"),
        padding=padding,
        window=kwargs.get("sliding_window"),
        softcap=kwargs.get("softcap"),
        region_queries=queries,
        dropout=kwargs.get("dropout", 0.0) or 0.0,
    )
    return out, None


@register_patch
class CombinerPatch(Patch):
    name = "combiner"
    summary = "Combiner: full-support attention, earlier blocks as max-pooled regions (fixed or logsparse)."
    config_class = CombinerConfig
    # the complete blocks and region levels of a decode call are Python structure (tables, loops) sized by the length
    capabilities = Capabilities(
        training_free=True,
        new_params=False,
        kv_cache=True,
        generate=True,
        static_decode_graph=False,
        static_cache=False,
    )
    targets = ("attention_fn",)

    def check(self, family: FamilySpec, model_config: PretrainedConfig) -> str | None:
        return unsupported_attention_reason(family)

    def apply(
        self, model: torch.nn.Module, config: PatchConfig, family: FamilySpec, layers: list[int], handle: PatchHandle
    ) -> None:
        assert isinstance(config, CombinerConfig)
        tracker = PaddingTracker()
        for hook in tracker.install(model):
            handle.on_revert(hook.remove)
        handler = functools.partial(_combiner_handler, config=config, tracker=tracker)
        for index in layers:
            attention = family.attention_module(model, index)
            install_handler(model, attention, handler)
            handle.on_revert(functools.partial(remove_handler, model, attention))
            hook = use_kv_layer(attention, QueryCacheLayer)
            handle.on_revert(hook.remove)

    def neutral_config(self, family: FamilySpec, model_config: PretrainedConfig) -> CombinerConfig | None:
        limit = max_positions(model_config)
        if not limit:
            return None  # without a position range no block covers every input
        return CombinerConfig(block_size=limit, direct_blocks=1)
