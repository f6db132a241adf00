"""MoA: Mixture of Sparse Attention for Automatic LLM Compression (arXiv:2406.14909; CoLM'25 as "Mixture of Attention
Spans").

Every head gets its own static sink + sliding-window rule with an *elastic* span `S_h(N) = alpha_h + beta_h * N`:
query `q` attends key `k <= q` iff `k < s_h` (the row's first real tokens) or `q - k < w_h`, with
`S_h = clamp(floor(alpha_h + beta_h * N), 1, N)`, `s_h = min(sinks, S_h - 1)`, `w_h = S_h - s_h`
(`hf_attn_zoo.moa.plan`). The rules come from a *plan*, found offline by profiling attention influence on real text
(`hf_attn_zoo.moa.profile`) and an MILP under a density budget (`hf_attn_zoo.moa.search`); without a plan every head
gets the uniform rule `(alpha, beta)` (MoA's StreamingLLM baseline is `alpha=0, beta=0.5`).

`N`, the reference length, is one number for the whole model, so prefill and decode use the same rules: the `length`
option, else the plan's `length`, else the model's `max_position_embeddings` (MoA uses prompt + new tokens per
request; set `length` to the lengths you serve). `granularity="kv_head"` (default) gives the query heads of a GQA group
one rule, so that KV head's cache really shrinks; `"head"` gives every query head its own rule and a KV head keeps the
union of its group's keys.

Decode: the layer's cache (`hf_attn_zoo.moa.cache.MoACacheLayer`) groups KV heads of equal retention into buckets,
one tensor each, and keeps per bucket only its sinks and window (MoA's heterogeneous per-head cache); attention then
runs per bucket. Keys keep their original positions, so decoding equals the masked full forward. A latent cache (MLA,
DeepSeek-V3) has no KV heads: it keeps the union of the layer's heads (largest sinks and window). A layer with its own
sliding window (Mistral, Gemma 3's local layers) stays within it.

Training-free; no parameters. Neutral setting: `alpha=0, beta=1, sinks=0` at `length=max_position_embeddings`
(every span covers the whole position range). Departs from the official code: no head permutation of the weights
(buckets gather heads instead), token-exact windows instead of 64-token blocks, no minimum cache of 128 tokens.
Official code: https://github.com/thu-nics/MoA
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PretrainedConfig

from ..errors import InvalidOptionError
from ..families.spec import FamilySpec
from ..kernels.kv_cache import RetainingLayer, SinkWindowLayer, current_kv_layer, use_kv_layer
from ..kernels.masks import left_padding
from ..kernels.pattern_handler import (
    attend_pattern,
    check_length,
    max_positions,
    model_window,
    unsupported_attention_reason,
)
from ..kernels.register import install_handler, remove_handler
from ..kernels.sparse_attention import Backend, PaddingTracker, sparse_attention
from ..moa.cache import LayerRules, MoACacheLayer
from ..moa.plan import DEFAULT_SINKS, MoAPlan, load_plan, plan_model_info, uniform_plan
from ..registry import Capabilities, Patch, PatchConfig, PatchHandle, register_patch

__all__ = ["MoAConfig", "MoAPatch", "moa_attention_handler"]


@dataclass
class MoAConfig(PatchConfig):
    plan: str | dict | None = field(
        default=None,
        metadata={
            "help": "a plan JSON file (from `hf-attn-zoo moa search`) "
            "or its dict; stored inline in the config once patched."
        },
    )
    alpha: float | None = field(
        default=None, metadata={"help": "without a plan: every head's span offset (default 0)."}
    )
    beta: float | None = field(
        default=None,
        metadata={
            "help": "without a plan: every head's share of the reference "
            "length (default 0.5, MoA's StreamingLLM baseline).",
            "ge": 0,
            "le": 1,
        },
    )
    sinks: int | None = field(
        default=None,
        metadata={
            "help": "initial tokens of each span (default: the plan's, else 64, MoA's value); clipped to span - 1.",
            "ge": 0,
        },
    )
    length: int | None = field(
        default=None,
        metadata={
            "help": "reference length N of S(N) = alpha + beta * N "
            "(default: the plan's, else max_position_embeddings).",
            "ge": 1,
        },
    )
    granularity: Literal["kv_head", "head"] | None = field(
        default=None,
        metadata={
            "help": "without a plan: one rule per KV head ('kv_head', default; GQA groups share it "
            "and the cache shrinks) or per query head ('head')."
        },
    )
    bounded_cache: bool = field(
        default=True, metadata={"help": "decode with per-head caches that keep only each head's sinks and window."}
    )
    backend: Literal["auto", "flex", "blocks", "masked"] = field(
        default="auto",
        metadata={
            "help": "auto (one masked SDPA for short inputs; else gathered-block SDPA on CPU, "
            "compiled flex on a GPU), or force one."
        },
    )


def _plan_of(config: MoAConfig, model_config: PretrainedConfig) -> MoAPlan:
    if config.plan is not None:
        return MoAPlan.from_dict(config.plan, "the inline plan")
    return uniform_plan(model_config, config.alpha, config.beta, config.granularity, config.sinks, config.length)


def moa_attention_handler(
    base,
    module,
    query,
    key,
    value,
    attention_mask,
    *,
    rules: LayerRules,
    tracker: PaddingTracker,
    backend: Backend,
    **kwargs,
):
    """Attention of an MoA layer: one sparse call with the layer's per-head pattern, or one per cache bucket."""
    layer = current_kv_layer(module)
    if not isinstance(layer, MoACacheLayer):
        out = attend_pattern(
            module, query, key, value, attention_mask, layer, rules.pattern, tracker, backend, **kwargs
        )
        return out, None
    check_length(module, layer.seen)
    padding = tracker.padding(attention_mask, query.shape[0], layer.seen)
    options = {
        "scaling": kwargs.get("scaling"),
        "padding": padding,
        "dropout": kwargs.get("dropout", 0.0) or 0.0,
        "softcap": kwargs.get("softcap"),
        "backend": backend,
    }
    if layer.pad is None:  # read once (a host sync): calls after the first (the prefill) add no padding in front
        layer.pad = 0 if padding is None else int(left_padding(padding, query.shape[0], query.device).max())
    outs = []
    for i, bucket in enumerate(rules.buckets):
        positions = None if layer.bucket_contiguous(i) else layer.bucket_positions(i)
        outs.append(
            sparse_attention(
                query[:, bucket.heads_on(query.device)[1]],
                layer.bucket_keys[i],
                layer.bucket_values[i],
                bucket.pattern,
                key_positions=positions,
                **options,
            )
        )
    layer.evict()
    return torch.cat(outs, dim=2)[:, :, rules.inverse_on(query.device)], None


def _cache_layer(rules: LayerRules, latent: bool) -> RetainingLayer:
    """Per-head buckets; a latent (MLA) cache has no KV heads, so it keeps the union of the layer's heads."""
    if latent:
        return SinkWindowLayer(max(b.sink for b in rules.buckets), max(b.window for b in rules.buckets))
    return MoACacheLayer(rules)


@register_patch
class MoAPatch(Patch):
    name = "moa"
    summary = "MoA: per-head elastic sink + window spans (alpha + beta * N) from a profiled MILP plan, per-head KV."
    config_class = MoAConfig
    capabilities = Capabilities(training_free=True, new_params=False, kv_cache=True, generate=True, static_cache=False)
    targets = ("attention_fn",)

    def check(self, family: FamilySpec, model_config: PretrainedConfig) -> str | None:
        return unsupported_attention_reason(family)

    def validate(self, config: MoAConfig, family: FamilySpec, model_config: PretrainedConfig) -> MoAConfig:
        limit = max_positions(model_config)
        if config.plan is not None:
            if config.alpha is not None or config.beta is not None:
                raise InvalidOptionError("moa: give either a plan or alpha/beta (a uniform plan), not both.")
            plan, source = load_plan(config.plan)
            plan.check_model(model_config, source)
            if config.granularity is not None and config.granularity != plan.granularity:
                raise InvalidOptionError(
                    f"moa: granularity={config.granularity!r} contradicts {source} "
                    f"({plan.granularity!r}); leave granularity unset with a plan."
                )
            config.plan, config.granularity = plan.to_dict(), plan.granularity
            sinks, length = plan.sinks, plan.length
        else:
            config.alpha = 0.0 if config.alpha is None else float(config.alpha)
            config.beta = 0.5 if config.beta is None else float(config.beta)
            config.granularity = config.granularity or "kv_head"
            sinks, length, source = DEFAULT_SINKS, None, f"alpha={config.alpha}, beta={config.beta}"
        config.sinks = sinks if config.sinks is None else config.sinks
        config.length = config.length or length or limit or None
        if config.length is None:
            raise InvalidOptionError(
                "moa: this model has no max_position_embeddings to default the reference length N to, so pass `length`."
            )
        _plan_of(config, model_config).check_spans(config.length, source)
        return config

    def apply(self, model, config: MoAConfig, family: FamilySpec, layers: list[int], handle: PatchHandle) -> None:
        plan = _plan_of(config, model.config)
        num_kv_heads = plan_model_info(model.config)["num_kv_heads"]
        tracker = PaddingTracker()
        for hook in tracker.install(model):
            handle.on_revert(hook.remove)
        for index in layers:
            rules = LayerRules(
                plan.query_head_rules(index, config.length, config.sinks),
                num_kv_heads,
                model_window(model.config, index),
            )
            attention = family.attention_module(model, index)
            # the rules' tensors on the layer's device now, not copied by each call (nor by a first compiled one)
            rules.prepare(next(attention.parameters()).device)
            handler = functools.partial(moa_attention_handler, rules=rules, tracker=tracker, backend=config.backend)
            install_handler(model, attention, handler)
            handle.on_revert(lambda a=attention: remove_handler(model, a))
            if config.bounded_cache:
                hook = use_kv_layer(attention, functools.partial(_cache_layer, rules, family.attention.kind == "mla"))
                handle.on_revert(hook.remove)

    def neutral_config(self, family: FamilySpec, model_config: PretrainedConfig) -> MoAConfig:
        return MoAConfig(alpha=0.0, beta=1.0, sinks=0, length=max_positions(model_config))
