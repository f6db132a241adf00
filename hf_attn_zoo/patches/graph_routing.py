"""Graph-of-tokens MoE routing, from "Improving Routing in Sparse Mixture of Experts with Graph of Tokens"
(arXiv:2505.00792): Similarity-Aware and Attention-Aware (S)MoE.

A softmax-gated SMoE routes every token on its own, `g_i = softmax(W_g x_i)`, `experts_i = top-k(g_i)`; the paper
shows this independence makes routing fluctuate and mixes each token's gate distribution with those of related
tokens instead, which provably lowers the entropy of the expert selection:

    ĝ_i = (1 - a) g_i + a sum_{j <= i} S_ij g_j,        experts_i = top-k(ĝ_i), weights from ĝ_i

with `a` = `strength` (the paper: a = 1) and `S` row-stochastic and causal (token `i` mixes only `j <= i` that are
not padding), either

- `mode="similarity"` (Similarity-Aware SMoE): `S = causal-softmax(q_i . k_j / tau)` over the router inputs `x`,
  `k_j = x_j / |x_j|`, `q_i = k_i` (fixed cosine similarity) or, with `learned=True`, `q_i = k_i + U V k_i` (a
  learned rank-`rank` bilinear form `x_i^T W_s x_j`, `W_s = I + U V`, `U` zero-initialised so it starts as the
  fixed one); or
- `mode="attention"` (Attention-Aware SMoE): `S` = the attention probabilities of the same decoder layer's
  self-attention (the block right before the MoE), averaged over the query heads (`heads`: a subset), with the
  layer's own scaling and mask (causal, padding, sliding window); no new parameters. Softcapping and attention
  sinks are left out so that `S` stays row-stochastic.

`S G` is computed as attention whose values are the gate distributions (`hf_attn_zoo.kernels.token_graph`), so the
`L x L` matrix is not materialised where SDPA avoids it. "Gate distribution" follows the family's routing rule
(`hf_attn_zoo.moe.rules`: `RoutingRule.gates` / `logits_of_gates`): the softmax over the experts for softmax-top-k
and top-k-softmax families (the selection and the renormalised weights then come from `ĝ`), the per-expert sigmoid
scores for DeepSeek-V3-style routers (bias, group limit and scaling then act on the mixed scores). The router
returns `log ĝ` (sigmoid families: `logit ĝ`) as its logits, so load-balance losses, routing records and routing
overrides installed afterwards (MoTE, SCMoE) see the mixed routing.

What it replaces: each MoE router instance's `forward` (wrapped; the original is called first), plus hooks that
record the block input's shape, the 2-D padding mask, the KV cache, and (attention mode) the layer's query/key
states through a `zoo` attention handler. KV-cached decoding equals the full forward: the earlier tokens' gate
distributions (and, for the similarity mode, their keys) are kept on the cache object, per layer, and cropped with
it, and reordered with it (beam search). Neutral setting: `strength=0`.

Departures from the paper: `strength` (a = 1 is the paper) so a pretrained MoE can be eased into it; the learned
similarity is a low-rank correction of the identity instead of a full `W_s`, and works on normalised inputs.
Official code: none found.
"""

from __future__ import annotations

import functools
import types
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from ..errors import InvalidInputError, InvalidOptionError, PatchConflictError, UnsupportedArchitectureError
from ..families.spec import FamilySpec
from ..kernels.masks import allowed_keys
from ..kernels.register import install_handler, remove_handler
from ..kernels.sparse_attention import PaddingTracker
from ..kernels.token_graph import token_graph_mix
from ..moe.overrides import routing_target
from ..moe.plan import LayerPlan
from ..moe.rules import RoutingRule, missing_rule_reason, moe_families_with_rules, routing_rule
from ..registry import Capabilities, Patch, PatchConfig, PatchHandle, register_patch

__all__ = ["GraphRoutingConfig", "GraphRoutingPatch", "TokenSimilarity"]

_STATE = "_zoo_graph_routing"
_SHAPE = "_zoo_graph_routing_shape"
_LAYER = "_zoo_graph_routing_layer"
_ATTN = "_zoo_graph_routing_attention"
_MEMORY = "_zoo_graph_routing_memory"
_ROUTING_STATE = "_zoo_routing"  # hf_attn_zoo.moe.routing's router state


@dataclass
class GraphRoutingConfig(PatchConfig):
    mode: Literal["similarity", "attention"] = field(
        default="similarity",
        metadata={
            "help": "similarity: S = causal softmax of the cosine (or learned) similarity of the router inputs / "
            "temperature (Similarity-Aware SMoE); attention: S = the same layer's self-attention probabilities, "
            "head-averaged (Attention-Aware SMoE, no new parameters)."
        },
    )
    strength: float = field(
        default=1.0,
        metadata={
            "help": "a in ĝ = (1 - a) g + a S g: 1 is the paper, 0 the original routing (neutral).",
            "ge": 0.0,
            "le": 1.0,
        },
    )
    temperature: float = field(
        default=0.1,
        metadata={"help": "similarity mode: tau of S = softmax(q.k / tau) (cosine scores in [-1, 1]).", "gt": 0.0},
    )
    learned: bool = field(
        default=False,
        metadata={
            "help": "similarity mode: learn the similarity (x_i^T (I + U V) x_j, U zero-initialised; new "
            "parameters token_similarity on each MoE decoder layer) instead of the fixed cosine."
        },
    )
    rank: int = field(
        default=16, metadata={"help": "rank of the learned similarity's correction U V.", "ge": 1, "le": 4096}
    )
    heads: list[int] | None = field(
        default=None,
        metadata={"help": "attention mode: the query heads whose probabilities are averaged (None: all heads)."},
    )
    chunk: int = field(
        default=1024,
        metadata={"help": "queries per SDPA call of the mixing (bounds memory on the math backend).", "ge": 1},
    )


class TokenSimilarity(nn.Module):
    """The learned similarity's query map `q = k + U (V k)` (`U` zero-initialised: starts as the cosine)."""

    def __init__(self, hidden_size: int, rank: int, dtype: torch.dtype | None, device: torch.device | None):
        super().__init__()
        self.down = nn.Linear(hidden_size, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, hidden_size, bias=False, dtype=dtype, device=device)
        if self.up.weight.device.type != "meta":
            nn.init.normal_(self.down.weight, std=hidden_size**-0.5)
            nn.init.zeros_(self.up.weight)

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        cast = keys.to(self.down.weight.dtype)
        return keys + self.up(self.down(cast)).to(keys.dtype)


@dataclass
class _RouterState:
    layer: int
    rule: RoutingRule
    config: GraphRoutingConfig
    owner: nn.Module  # the decoder layer: it holds `token_similarity`
    padding: PaddingTracker  # the 2-D attention mask of the current forward
    original: Any  # the instance's own `forward` before ours, or None (the class's)

    def call_original(self, router: nn.Module, hidden_states: torch.Tensor) -> Any:
        if self.original is None:
            return type(router).forward(router, hidden_states)
        return self.original(hidden_states)

    def restore(self, router: nn.Module) -> None:
        for name in (_STATE, _SHAPE, _LAYER, _ATTN):
            router.__dict__.pop(name, None)
        if self.original is None:
            router.__dict__.pop("forward", None)
        else:
            router.__dict__["forward"] = self.original


def _remember_shape(router: nn.Module, block: nn.Module, args: tuple, kwargs: dict) -> None:
    hidden = args[0] if args else kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
        router.__dict__[_SHAPE] = tuple(hidden.shape[:2])


def _remember_layer(router: nn.Module, layer: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and not hasattr(cache, "get_seq_length"):
        cache = None
    past = int(cache.get_seq_length(layer)) if cache is not None else 0
    router.__dict__[_LAYER] = (None if cache is None else weakref.ref(cache), past)
    router.__dict__.pop(_ATTN, None)


def _capture_attention(base, module, query, key, value, attention_mask, *, router: nn.Module, **kwargs):
    output = base(module, query, key, value, attention_mask, **kwargs)
    scaling = kwargs.get("scaling")
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    router.__dict__[_ATTN] = (query, key, attention_mask, scale)
    return output


def _memory(
    router: nn.Module, cache: Any, layer: int, past: int, batch: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The earlier tokens' gate distributions and keys kept on `cache` for `layer` (None, None: nothing before)."""
    if cache is None or past == 0:
        return None, None
    kept = cache.__dict__.get(_MEMORY, {}).get(layer)
    if kept is None or kept[0].shape[1] < past:
        have = 0 if kept is None else kept[0].shape[1]
        raise InvalidInputError(
            f"graph_routing: the KV cache holds {past} tokens of layer {layer} but the patch saw {have} of them: "
            "the cache was filled without this patch (or by another model); prefill it with the patched model"
        )
    gates, keys = kept
    if gates.shape[0] != batch:
        raise InvalidInputError(
            f"graph_routing: the cache was filled with a batch of {gates.shape[0]} rows, this forward has {batch}; "
            "continue a cache with the batch that filled it"
        )
    # a cropped cache (assisted decoding): keep the first `past` tokens, as the cache does
    return gates[:, :past], None if keys is None else keys[:, :past]


def _store(cache: Any, layer: int, gates: torch.Tensor, keys: torch.Tensor | None) -> None:
    if _MEMORY not in cache.__dict__:
        cache.__dict__[_MEMORY] = {}
        # the memory is per batch row, like the keys: beam search's reorders (and batch selections) must move it too.
        # Bound to this cache instance, so that a deep copy of the cache reorders its own copy.
        for name in ("reorder_cache", "batch_select_indices"):
            setattr(cache, name, types.MethodType(_select_rows_too(name), cache))
    cache.__dict__[_MEMORY][layer] = (gates.detach(), None if keys is None else keys.detach())


def _select_rows_too(name: str):
    """`Cache.<name>` (rows by index: a beam reorder or a batch selection), then the same rows of the memory."""

    def select(cache: Any, rows: torch.Tensor) -> None:
        getattr(type(cache), name)(cache, rows)
        memory = cache.__dict__[_MEMORY]
        for layer, kept in memory.items():
            memory[layer] = tuple(None if t is None else t.index_select(0, rows.to(t.device)) for t in kept)

    return select


def _similarity_mix(
    state: _RouterState,
    x: torch.Tensor,
    gates: torch.Tensor,
    past_gates: torch.Tensor | None,
    past_keys: torch.Tensor | None,
    past: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, length, _ = gates.shape
    keys = F.normalize(x.float(), dim=-1).view(batch, length, -1)
    # looked up now, not at patch time: under PEFT's modules_to_save the copy in the model is the one trained
    queries = cast(nn.Module, state.owner.token_similarity)(keys) if state.config.learned else keys
    all_keys = keys if past_keys is None else torch.cat([past_keys, keys], dim=1)
    all_gates = gates if past_gates is None else torch.cat([past_gates, gates], dim=1)
    total = all_keys.shape[1]
    device = gates.device
    keep = torch.arange(total, device=device)[None, :] <= (torch.arange(length, device=device) + past)[:, None]
    keep = keep[None, None].expand(batch, 1, length, total)
    padding = state.padding.mask
    if padding is not None and padding.shape[0] == batch:
        valid = torch.ones(batch, total, dtype=torch.bool, device=device)
        width = min(total, padding.shape[1])
        valid[:, total - width :] = padding[:, -width:].bool()
        keep = keep & valid[:, None, None, :]
    mixed = token_graph_mix(
        queries[:, None], all_keys[:, None], all_gates, keep, 1.0 / state.config.temperature, gates, state.config.chunk
    )
    return mixed, all_gates, all_keys


def _attention_mix(
    state: _RouterState, router: nn.Module, gates: torch.Tensor, past_gates: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    captured = router.__dict__.pop(_ATTN, None)
    if captured is None:
        raise InvalidInputError(
            f"graph_routing (attention mode): the router of layer {state.layer} ran without its layer's "
            "self-attention in the same forward, so there are no attention probabilities to route by"
        )
    query, key, mask, scale = captured
    batch, length, _ = gates.shape
    all_gates = gates if past_gates is None else torch.cat([past_gates, gates], dim=1)
    keys = key.shape[2]
    aligned = all_gates
    if keys < all_gates.shape[1]:  # a sliding-window cache keeps the last `keys` tokens
        aligned = all_gates[:, -keys:]
    elif keys > all_gates.shape[1]:  # a static cache: unused slots are masked
        aligned = F.pad(all_gates, (0, 0, 0, keys - all_gates.shape[1]))
    keep = allowed_keys(mask, batch, length, keys, gates.device)
    if state.config.heads is not None:
        group = query.shape[1] // key.shape[1]
        heads = torch.tensor(state.config.heads, device=query.device)
        query, key = query[:, heads], key.repeat_interleave(group, dim=1)[:, heads]
    query, key = query.float().contiguous(), key.float().contiguous()
    mixed = token_graph_mix(query, key, aligned, keep, scale, gates, state.config.chunk)
    return mixed, all_gates


def _graph_forward(self: nn.Module, hidden_states: torch.Tensor) -> Any:
    state: _RouterState = self.__dict__[_STATE]
    shape = self.__dict__.pop(_SHAPE, None)
    if hidden_states.dim() == 3:  # DeepSeek-V3 routes the unflattened block input
        shape = tuple(hidden_states.shape[:2])
    cache_ref, past = self.__dict__.pop(_LAYER, (None, 0))
    output = state.call_original(self, hidden_states)
    if state.config.strength == 0:
        self.__dict__.pop(_ATTN, None)
        return output
    logits, weights, index = output
    num_experts = logits.shape[-1]
    num_tokens = logits.numel() // num_experts
    if shape is None or shape[0] * shape[1] != num_tokens:
        raise InvalidInputError(
            f"graph_routing: layer {state.layer}'s router was called outside its MoE block, so the tokens' "
            "(batch, length) layout is unknown"
        )
    batch, length = int(shape[0]), int(shape[1])
    gates = state.rule.gates(self, logits.reshape(num_tokens, num_experts)).view(batch, length, num_experts)
    cache = None if cache_ref is None else cache_ref()
    past_gates, past_keys = _memory(self, cache, state.layer, past, batch)
    keys = None
    if state.config.mode == "similarity":
        x = hidden_states.reshape(num_tokens, -1)
        mixed, all_gates, keys = _similarity_mix(state, x, gates, past_gates, past_keys, past)
    else:
        mixed, all_gates = _attention_mix(state, self, gates, past_gates)
    if cache is not None:
        _store(cache, state.layer, all_gates, keys)
    strength = state.config.strength
    routed = mixed if strength == 1 else (1 - strength) * gates + strength * mixed
    new_logits = state.rule.logits_of_gates(self, routed.reshape(num_tokens, num_experts)).to(logits.dtype)
    new_weights, new_index, _ = state.rule.apply(self, new_logits, LayerPlan())
    return new_logits.view(logits.shape), new_weights.to(weights.dtype), new_index


def _base_model(model: nn.Module, family: FamilySpec) -> nn.Module:
    """The module that owns the decoder layers (it receives the 2-D attention mask)."""
    path = family.layers.rsplit(".", 1)
    return model.get_submodule(path[0]) if len(path) == 2 else model


@register_patch
class GraphRoutingPatch(Patch):
    name = "graph_routing"
    summary = (
        "Graph-of-tokens MoE routing (Similarity-/Attention-Aware SMoE): each token's gate distribution mixed "
        "with those of similar earlier tokens (cosine / learned similarity, or the layer's attention) before top-k."
    )
    config_class = GraphRoutingConfig
    capabilities = Capabilities(training_free=True, new_params=True, kv_cache=True, generate=True)
    targets = ("router",)
    trainable_modules = ("token_similarity",)

    def check(self, family: FamilySpec, model_config: PretrainedConfig) -> str | None:
        if family.mlp.kind != "moe":
            moe = ", ".join(moe_families_with_rules())
            return f"its MLPs are dense, so there is no expert routing to mix (MoE families: {moe})"
        if routing_rule(family) is None:
            return missing_rule_reason(family)
        return None

    def validate(
        self, config: PatchConfig, family: FamilySpec | None, model_config: PretrainedConfig
    ) -> GraphRoutingConfig:
        assert isinstance(config, GraphRoutingConfig)
        if config.mode == "attention":
            if config.learned:
                raise InvalidOptionError(
                    "graph_routing: learned=True is the similarity mode's learned similarity; the attention mode "
                    "reuses the attention probabilities and learns nothing (use mode='similarity' or learned=False)",
                    option="learned",
                )
            if family is not None and not family.attention.interface:
                raise UnsupportedArchitectureError(
                    f"graph_routing mode='attention': the {family.name} attention computes attention itself instead "
                    "of through transformers' attention interface, so its probabilities cannot be read; use "
                    "mode='similarity'"
                )
            if config.heads is not None:
                heads = family.head_layout(model_config).num_heads if family is not None else None
                bad = [h for h in config.heads if h < 0 or (heads is not None and h >= heads)]
                if not config.heads or bad or len(set(config.heads)) != len(config.heads):
                    raise InvalidOptionError(
                        f"graph_routing: heads={config.heads} must be distinct query-head indices in "
                        f"0..{'H-1' if heads is None else heads - 1} (None: all heads)",
                        option="heads",
                    )
                return replace(config, heads=sorted(config.heads))
        elif config.heads is not None:
            raise InvalidOptionError(
                "graph_routing: heads selects attention heads, which only mode='attention' uses", option="heads"
            )
        return config

    def apply(
        self, model: nn.Module, config: PatchConfig, family: FamilySpec, layers: list[int], handle: PatchHandle
    ) -> None:
        assert isinstance(config, GraphRoutingConfig)
        target = routing_target(model)
        chosen = [i for i in target.layers if i in layers]
        if not chosen:
            raise InvalidOptionError(
                f"graph_routing: none of the selected layers {layers} is a MoE layer (MoE layers: {target.layers})"
            )
        routers = {i: target.routers[i] for i in chosen}
        for i, router in routers.items():
            if _ROUTING_STATE in router.__dict__ or _STATE in router.__dict__:
                raise PatchConflictError(
                    f"graph_routing: layer {i}'s router already carries routing overrides (a mote patch, "
                    "set_routing / switch_experts, or graph_routing): apply graph_routing first, then the overrides"
                )
        attentions = {i: family.attention_module(model, i) for i in chosen} if config.mode == "attention" else {}
        for i, attention in attentions.items():
            if getattr(attention, "_zoo_attention_handler", None) is not None:
                raise PatchConflictError(
                    f"graph_routing mode='attention': layer {i}'s attention already carries another patch's "
                    "attention handler; use mode='similarity' with attention patches"
                )
        decoder = family.decoder_layers(model)
        if config.learned:
            for i in chosen:
                weight = cast(torch.Tensor, target.routers[i].weight)
                dtype = weight.dtype if weight.is_floating_point() else None
                similarity = TokenSimilarity(weight.shape[-1], config.rank, dtype, weight.device)
                # on the decoder layer, not the MLP: some families rename the MLP in their checkpoints
                decoder[i].token_similarity = similarity
                handle.on_revert(functools.partial(delattr, decoder[i], "token_similarity"))
                handle.modules.append(similarity)
        if config.strength == 0:
            return  # neutral: the routers are left as they are
        padding = PaddingTracker()
        for hook in padding.install(_base_model(model, family)):
            handle.on_revert(hook.remove)
        for i, router in routers.items():
            state = _RouterState(i, target.rule, config, decoder[i], padding, router.__dict__.get("forward"))
            router.__dict__[_STATE] = state
            router.__dict__["forward"] = types.MethodType(_graph_forward, router)
            handle.on_revert(functools.partial(state.restore, router))
            for module, fn in (
                (target.blocks[i], functools.partial(_remember_shape, router)),
                (decoder[i], functools.partial(_remember_layer, router, i)),
            ):
                hook = module.register_forward_pre_hook(fn, with_kwargs=True)
                handle.on_revert(hook.remove)
            if i in attentions:
                install_handler(model, attentions[i], functools.partial(_capture_attention, router=router))
                handle.on_revert(functools.partial(remove_handler, model, attentions[i]))

    def neutral_config(self, family: FamilySpec, model_config: PretrainedConfig) -> GraphRoutingConfig:
        return GraphRoutingConfig(strength=0.0)
