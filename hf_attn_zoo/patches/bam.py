"""BAM: Mixture-of-Attention experts, from "BAM! Just Like That: Simple and Efficient Parameter Upcycling for
Mixture of Experts" (arXiv:2408.08274, NeurIPS 2024).

BAM upcycles dense models into an MoE whose attention layers are mixtures of attention experts too (Sec. 3). Each
patched layer's attention becomes N experts, each with its own full W_q, W_k, W_v, W_o (the paper's "KV experts"),
mixed by a router on the attention input x (the `input_layernorm` output):

    soft (the paper's default):  g(x) = softmax(W_router x),   MoA(x) = sum_j g_j(x) MHA_j(x)
    top_k (the paper's ablation): the softmax restricted to the k largest router logits (others 0), renormalised.

`kv="shared"` is the paper's KV-sharing variant: only W_q and W_o are per expert, K/V (and the KV cache) are shared.
`parallel_block=True` turns the patched decoder layers into the parallel attention + FFN blocks BAM's seed models use
(Sec. 3-4): `y = x + Attn(input_layernorm(x)) + MLP(post_attention_layernorm(x))`. The pretrained model was trained
with sequential blocks, so this changes its outputs and needs tuning.

How it works: the experts are stacked as extra heads, so the family's own attention forward (projections, per-head
q/k norms, RoPE, KV cache, attention function) runs unchanged on N x the heads:

- q/k/v projections become `ExpertLinear`s: `weight`/`bias` are the original parameters (expert 0, not copied);
  experts 1..N-1 live in an `ExpertWeights` module next to the projection (`q_proj_experts`: `weight [N-1, out, in]`,
  `bias [N-1, out]`; `q_proj.experts_weight[j - 1]` is expert j's weight). The output is `[expert 0 | expert 1 | ...]`
  (expert-major), so the attention sees N x heads query heads and N x KV heads and GQA groups stay right. With
  `kv="shared"` the query heads are reordered KV-head-major and the module's `num_key_value_groups` is multiplied by
  N, so every expert's query heads read the one shared K/V.
- o_proj becomes an `ExpertOutputLinear` (same parameter convention) that multiplies each expert's slice of the
  attention output by its gate and returns `sum_j W_o^j (g_j a_j)` (+ `sum_j g_j b_o^j` with a bias).
- a router `attention_router` (`weight [N, hidden]`, random normal init with std `config.initializer_range`, as in the
  paper) computes the gates in a forward pre-hook of the attention module, in float32.

State dict: the vanilla keys hold expert 0 (`self_attn.q_proj.weight`), the new ones are
`self_attn.{q,k,v,o}_proj_experts.{weight,bias}` and `self_attn.attention_router.weight` (`hf_attn_zoo.new_parameters`;
their modules are what `hf_attn_zoo.new_module_names` lists for PEFT's `modules_to_save`, so a LoRA can still wrap
`q_proj`). Experts 1..N-1 start as copies of the layer's attention (plus `expert_noise`); the upcycler
(`hf_attn_zoo.upcycle(mode="bam")`) overwrites `experts_weight[j - 1]` with expert j's weights.

Costs and limits: the attention and the KV cache are N x those of the dense layer (`kv="experts"`); with
`routing="top_k"` every expert is still computed (only the mixing is sparse). Per-head q/k norms (Qwen3, Gemma 3) are
shared by all experts; families whose q/k norm spans the whole projection (OLMo 2) are not supported. A pre-allocated
`StaticCache` sizes its buffers from the first keys it stores, so it holds `kv="experts"`'s N x KV heads too (the
common grid decodes the default `kv="experts"` over one on every family).
LoRA on `o_proj` adapts the concatenated, ungated expert outputs. The attention router has no auxiliary loss (the
paper relies on soft routing for balance).

Official code: none published (Cohere internal).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig

from ..errors import InvalidOptionError, UnsupportedArchitectureError
from ..families.spec import FamilySpec
from ..options import other
from ..registry import Capabilities, Patch, PatchConfig, PatchHandle, register_patch

__all__ = ["BAMConfig", "BAMPatch", "BAMRouter", "ExpertLinear", "ExpertOutputLinear", "ExpertWeights", "experts_of"]

# `parallel_block` rewires the sequential pre-norm block x + attn(input_layernorm(x)), then
# h + mlp(post_attention_layernorm(h)); what the other block layouts (FamilySpec.block) are
_NOT_PRE_NORM = {
    "post_norm": "post-norm blocks (norms after attention and MLP)",
    "sandwich": "sandwich norms (post_attention_layernorm normalises the attention output, plus pre/post feed-forward "
    "norms)",
    "parallel": "parallel blocks (one input norm feeds attention and MLP)",
    "other": "decoder layers not known to be sequential pre-norm blocks",
}
_SANDWICH_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")
_GATES = "_zoo_bam_gates"
_EXPERTS = "_zoo_bam_experts"
_BLOCK_INPUT = "_zoo_bam_block_input"


@dataclass
class BAMConfig(PatchConfig):
    num_experts: int = field(
        default=2,
        metadata={
            "help": "attention experts N per patched layer. Expert 0 is the layer's own attention; "
            "experts 1..N-1 start as copies of it (plus expert_noise) unless the upcycler fills them.",
            "ge": 2,
        },
    )
    routing: Literal["soft", "top_k"] = field(
        default="soft",
        metadata={
            "help": "soft: every token mixes all experts with softmax gates (the paper's choice); top_k: the "
            "softmax over the top_k router logits only (the paper's ablation; all experts are still computed)."
        },
    )
    top_k: int | None = field(
        default=None,
        metadata={
            "help": "experts mixed per token with routing='top_k'. Default 1. Only for routing='top_k'.",
            "ge": 1,
            "le": other("num_experts"),
        },
    )
    kv: Literal["experts", "shared"] = field(
        default="experts",
        metadata={
            "help": "experts: each expert has its own Q/K/V/O (N x KV cache); shared: only Q and O are per "
            "expert, K/V and the KV cache are shared (the paper's KV-sharing variant)."
        },
    )
    parallel_block: bool = field(
        default=False,
        metadata={
            "help": "rewire the patched decoder layers as parallel blocks, y = x + Attn(LN1(x)) + "
            "MLP(LN2(x)), as BAM's seed models. Changes a sequential model's outputs: needs tuning. Only for "
            "pre-norm families (not olmo2, gemma3)."
        },
    )
    expert_noise: float = field(
        default=0.0,
        metadata={
            "help": "std of the Gaussian noise added to the copied experts' weights, relative to each weight "
            "matrix's std (breaks the symmetry of identical copies; 0 = exact copies). Biases are copied.",
            "ge": 0,
        },
    )
    router_init_std: float | None = field(
        default=None,
        metadata={
            "help": "std of the attention router's normal initialisation (0 = uniform gates). Default: "
            "the model's initializer_range, as the paper's randomly initialised routers.",
            "ge": 0,
        },
    )


class ExpertWeights(nn.Module):
    """The weights of attention experts 1..N-1 of one projection.

    Args:
        weight (`torch.Tensor`): `[N - 1, out_features, in_features]`, expert j's weight at `weight[j - 1]`.
        bias (`torch.Tensor`, *optional*): `[N - 1, out_features]`.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.register_parameter("bias", nn.Parameter(bias) if bias is not None else None)

    def extra_repr(self) -> str:
        experts, out_features, in_features = self.weight.shape
        bias = self.bias is not None
        return f"experts={experts}, in_features={in_features}, out_features={out_features}, bias={bias}"

    def forward(self, x: torch.Tensor, gates: torch.Tensor | None = None) -> torch.Tensor:
        """Input side (`gates=None`): `x [..., in]` -> every expert's projection `[..., (N-1) * out]`, expert-major.

        Output side: `x [..., N-1, in]`, `gates [..., N-1]` -> `sum_j W_j (g_j x_j) + sum_j g_j b_j` `[..., out]`.
        """
        experts, out_features, in_features = self.weight.shape
        if gates is None:
            bias = self.bias.reshape(-1) if self.bias is not None else None
            return F.linear(x, self.weight.reshape(experts * out_features, in_features), bias)
        lead = x.shape[:-2]
        # one batched matmul over the expert dim: the weights are read in place, not re-laid out every call
        gated = (x * gates.unsqueeze(-1)).reshape(-1, experts, in_features).transpose(0, 1)  # [N-1, M, in]
        out = torch.bmm(gated, self.weight.transpose(1, 2)).sum(0)  # [M, out]
        if self.bias is not None:
            out = out + gates.reshape(-1, experts) @ self.bias
        return out.reshape(*lead, out_features)


class _Experts:
    """Access to the experts of a stacked projection; expert 0 is the original `weight`/`bias`.

    Experts 1..N-1 live in a sibling module of the attention (`q_proj_experts` next to `q_proj`), not in a child: a
    LoRA on `q_proj` and a `modules_to_save` on the experts could not both wrap them otherwise. The attention
    module's pre-hook hands the sibling over for every call (under PEFT, the active `modules_to_save` copy).
    """

    num_experts: int
    weight: nn.Parameter
    bias: nn.Parameter | None

    @property
    def extra_experts(self) -> ExpertWeights:
        """The module holding experts 1..N-1 (the one handed over by the last call, else the one built)."""
        return self.__dict__[_EXPERTS]

    @property
    def experts_weight(self) -> nn.Parameter:
        """Experts 1..N-1's weights `[N - 1, out, in]` (expert j at index j - 1)."""
        return self.extra_experts.weight

    @property
    def experts_bias(self) -> nn.Parameter | None:
        """Experts 1..N-1's biases `[N - 1, out]`, or `None` when the projection has no bias."""
        return self.extra_experts.bias

    def expert_weight(self, j: int) -> torch.Tensor:
        """Expert j's weight, in the vanilla projection's layout."""
        return self.weight if j == 0 else self.experts_weight[j - 1]

    def expert_bias(self, j: int) -> torch.Tensor | None:
        if self.bias is None:
            return None
        return self.bias if j == 0 else self.experts_bias[j - 1]


def _copies(tensor: torch.Tensor, n: int, noise: float) -> torch.Tensor:
    """`n` copies of `tensor` stacked on a new first dim, plus Gaussian noise of std `noise * tensor.std()`."""
    copies = tensor.detach().unsqueeze(0).repeat(n, *([1] * tensor.dim()))
    # a meta tensor has no values to measure or perturb: its copies stay meta
    if noise > 0 and not tensor.is_meta:
        # fp32 std (a bf16 reduction over a whole matrix loses precision) and noise, cast to the weights' dtype
        std = tensor.detach().float().std().item() * noise
        copies += torch.randn(copies.shape, device=copies.device, dtype=torch.float32).mul_(std).to(copies.dtype)
    return copies


class ExpertLinear(nn.Linear, _Experts):
    """A q/k/v projection of N experts; returns `[..., N * out]` (expert-major, or KV-head-major with `kv_layout`).

    `weight` and `bias` are the original projection's parameters (expert 0); `experts` holds experts 1..N-1.
    `out_features` is `N * out`: what the attention forward (and a LoRA on top) sees.

    Args:
        base (`nn.Linear`): the vanilla projection.
        experts (`ExpertWeights`): experts 1..N-1 (`[N - 1, out, in]`), registered on the attention module.
        kv_layout (`tuple[int, int]`, *optional*): `(num_kv_heads, group_size * head_dim)` to reorder the output
            heads as `[kv head][expert][query head of the group]` (queries of `kv="shared"`).
    """

    def __init__(self, base: nn.Linear, experts: ExpertWeights, kv_layout: tuple[int, int] | None = None):
        nn.Module.__init__(self)
        self.num_experts = experts.weight.shape[0] + 1
        self.in_features = base.in_features
        self.expert_out_features = base.out_features
        self.out_features = self.num_experts * base.out_features
        self.kv_layout = kv_layout
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.__dict__[_EXPERTS] = experts  # not a child module: see `_Experts`

    def extra_repr(self) -> str:
        order = "kv-head-major" if self.kv_layout else "expert-major"
        return (
            f"in_features={self.in_features}, out_features={self.out_features} ({self.num_experts} experts x "
            f"{self.expert_out_features}, {order}), bias={self.bias is not None}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([F.linear(x, self.weight, self.bias), self.extra_experts(x)], dim=-1)  # [..., N * out]
        if self.kv_layout is not None:
            kv_heads, width = self.kv_layout
            out = out.unflatten(-1, (self.num_experts, kv_heads, width)).transpose(-3, -2).flatten(-3)
        return out


class ExpertOutputLinear(nn.Linear, _Experts):
    """The output projection of N attention experts: `[..., N * in]` -> `sum_j W_o^j (g_j a_j)` `[..., out]`.

    `weight`/`bias` are the original o_proj's (expert 0), `experts` holds experts 1..N-1 (`[N - 1, out, in]`).
    The gates `g [..., N]` are handed over by the attention module's pre-hook for each call.

    Args:
        base (`nn.Linear`): the vanilla o_proj.
        experts (`ExpertWeights`): experts 1..N-1, registered on the attention module.
        kv_layout (`tuple[int, int]`, *optional*): the query projection's `kv_layout`, undone before gating.
    """

    def __init__(self, base: nn.Linear, experts: ExpertWeights, kv_layout: tuple[int, int] | None = None):
        nn.Module.__init__(self)
        self.num_experts = experts.weight.shape[0] + 1
        self.in_features = self.num_experts * base.in_features
        self.expert_in_features = base.in_features
        self.out_features = base.out_features
        self.kv_layout = kv_layout
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.__dict__[_EXPERTS] = experts

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features} ({self.num_experts} experts x {self.expert_in_features}), "
            f"out_features={self.out_features}, bias={self.bias is not None}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.__dict__.pop(_GATES, None)
        if gates is None:
            raise RuntimeError(
                "bam: this o_proj mixes attention experts with the gates its attention module computes; call the "
                "attention module, not o_proj alone."
            )
        if gates.shape[:-1] != x.shape[:-1]:
            raise RuntimeError(f"bam: gates {tuple(gates.shape)} do not match the attention output {tuple(x.shape)}")
        n = self.num_experts
        if self.kv_layout is not None:
            kv_heads, width = self.kv_layout
            parts = x.unflatten(-1, (kv_heads, n, width)).transpose(-3, -2).reshape(*x.shape[:-1], n, -1)
        else:
            parts = x.unflatten(-1, (n, self.expert_in_features))  # [..., N, in]
        # the router's fp32 gates meet the activations in their dtype
        gates = gates.to(x.dtype)
        out = F.linear(parts[..., 0, :] * gates[..., :1], self.weight)
        if self.bias is not None:
            out = out + gates[..., :1] * self.bias
        return out + self.extra_experts(parts[..., 1:, :], gates[..., 1:])


def experts_of(base: nn.Linear, num_experts: int, noise: float) -> ExpertWeights:
    """Experts 1..N-1 of a projection, initialised as copies of `base` (weights plus relative noise `noise`)."""
    with torch.no_grad():
        bias = _copies(base.bias, num_experts - 1, 0.0) if base.bias is not None else None
        return ExpertWeights(_copies(base.weight, num_experts - 1, noise), bias)


class BAMRouter(nn.Module):
    """The attention router of one layer: `gates = softmax(W x)` over the N experts, in float32 (`[..., N]`).

    A plain module with a `weight [N, hidden]` rather than an `nn.Linear`, so a LoRA on "all-linear" layers does not
    add its output to the gates.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        routing: str,
        top_k: int | None,
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype, device=device))
        self.num_experts = num_experts
        self.routing = routing
        self.top_k = top_k

    def extra_repr(self) -> str:
        top_k = f", top_k={self.top_k}" if self.routing == "top_k" else ""
        return f"hidden_size={self.weight.shape[1]}, num_experts={self.num_experts}, routing={self.routing}{top_k}"

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Router logits `W x` `[..., N]` in float32."""
        # fp32: the softmax and top-k over the experts run in fp32 whatever the model's dtype
        return F.linear(hidden.to(self.weight.dtype), self.weight).float()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.logits(hidden)
        if self.routing == "top_k" and self.top_k < self.num_experts:
            keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(self.top_k, -1).indices, True)
            logits = logits.masked_fill(~keep, -math.inf)
        return torch.softmax(logits, dim=-1)


def _base_layer(module: nn.Module) -> nn.Module:
    """The module under a PEFT wrapper (LoRA keeps it as `base_layer`)."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def _route(module: nn.Module, args, kwargs, *, projections: tuple[str, ...], o_proj_name: str) -> None:
    """Attention pre-hook: hand each stacked projection its experts, and o_proj the gates of this call.

    The modules are looked up now, not at patch time: PEFT may have wrapped them since (LoRA keeps the projection
    as `base_layer`; `modules_to_save` swaps in trainable copies of the experts and the router). The hook runs inside
    the decoder layer's forward, so gradient checkpointing recomputes the gates with the layer.
    """
    hidden = args[0] if args else kwargs["hidden_states"]
    for name in projections:
        _base_layer(getattr(module, name)).__dict__[_EXPERTS] = getattr(module, _experts_name(name))
    _base_layer(getattr(module, o_proj_name)).__dict__[_GATES] = module.attention_router(hidden)


def _experts_name(projection: str) -> str:
    return f"{projection}_experts"


def _stash_block_input(norm: nn.Module, args, kwargs, *, post_norm: nn.Module) -> None:
    """input_layernorm pre-hook of a parallel block: its input is the block input x, which the MLP branch reads."""
    post_norm.__dict__[_BLOCK_INPUT] = args[0] if args else kwargs["hidden_states"]


def _feed_block_input(norm: nn.Module, args, kwargs):
    """post_attention_layernorm pre-hook of a parallel block: normalise the block input x, not x + Attn(x).

    A call outside the layer's forward (no block input stashed) normalises its own input.
    """
    block_input = norm.__dict__.pop(_BLOCK_INPUT, None)
    if block_input is None:
        return None
    return (block_input,), {}


def _linear(module: nn.Module, what: str) -> nn.Linear:
    if isinstance(module, (ExpertLinear, ExpertOutputLinear)) or not isinstance(module, nn.Linear):
        raise UnsupportedArchitectureError(
            f"bam needs plain nn.Linear attention projections; {what} is a {type(module).__name__}. Patch the model "
            "before wrapping it (PEFT) or quantising it."
        )
    if not module.weight.is_floating_point():
        raise UnsupportedArchitectureError(f"bam: {what} has {module.weight.dtype} weights; patch before quantising.")
    return module


@register_patch
class BAMPatch(Patch):
    name = "bam"
    summary = (
        "BAM Mixture-of-Attention: N attention experts (own Q/K/V/O or shared K/V) mixed by a soft (or top-k) "
        "router on the attention input."
    )
    config_class = BAMConfig
    capabilities = Capabilities(training_free=False, new_params=True, kv_cache=True, generate=True)
    # the stacked heads change what the attention function sees: a patch of the attention function (MoH's head
    # gates) cannot share a layer with it
    targets = ("attention", "attention_fn")

    def check(self, family: FamilySpec, model_config: PretrainedConfig) -> str | None:
        if family.attention.kind != "standard":
            return f"its {family.attention.kind} attention has no per-head q/k/v/o projections to turn into experts"
        if family.attention.qk_norm_scope == "projection":
            q_norm, k_norm = family.attention.qk_norm
            return (
                f"its {q_norm}/{k_norm} normalise the whole projection (num_heads * head_dim), so extra attention "
                "experts cannot share it"
            )
        if family.attention.sinks:
            return (
                f"its attention sinks (`{family.attention.sinks}`) are one learned logit per head, which extra "
                "attention experts do not have"
            )
        return None

    def validate(self, config: BAMConfig, family: FamilySpec, model_config: PretrainedConfig) -> BAMConfig:
        top_k = config.top_k
        if config.routing == "top_k":
            top_k = 1 if top_k is None else top_k
        elif top_k is not None:
            raise InvalidOptionError(
                f"bam: top_k={top_k} is only used with routing='top_k' (routing='soft' mixes all experts)."
            )
        std = config.router_init_std
        if std is None:
            std = float(getattr(model_config, "initializer_range", None) or 0.02)
        if config.parallel_block and family.block != "pre_norm":
            reason = _NOT_PRE_NORM[family.block]
            raise InvalidOptionError(
                f"bam: parallel_block needs pre-norm decoder layers (x + Attn(input_layernorm(x)), then "
                f"post_attention_layernorm -> MLP); {family.name} has {reason}. Use parallel_block=False."
            )
        return replace(config, top_k=top_k, router_init_std=std)

    def apply(self, model, config: BAMConfig, family: FamilySpec, layers: list[int], handle: PatchHandle) -> None:
        names = family.attention
        layout = family.head_layout(model.config)
        n = config.num_experts
        shared = config.kv == "shared"
        kv_layout = (layout.num_kv_heads, layout.group_size * layout.head_dim) if shared else None
        decoder_layers = family.decoder_layers(model)
        # every check first: the model is changed only once all layers are known to fit
        for i in layers:
            attention = family.attention_module(model, i)
            for proj in (names.q, names.k, names.v, names.o):
                _linear(getattr(attention, proj), f"layer {i} {names.module}.{proj}")
            for norm_name in names.qk_norm or ():
                weight = getattr(getattr(attention, norm_name, None), "weight", None)
                if weight is not None and weight.numel() != layout.head_dim:
                    raise UnsupportedArchitectureError(
                        f"bam: layer {i} {norm_name} normalises {weight.numel()} features, not one head "
                        f"({layout.head_dim}); extra attention experts cannot share it."
                    )
            if config.parallel_block:
                layer = decoder_layers[i]
                if not all(hasattr(layer, a) for a in ("input_layernorm", "post_attention_layernorm")) or any(
                    hasattr(layer, a) for a in _SANDWICH_NORMS
                ):
                    raise UnsupportedArchitectureError(
                        f"bam parallel_block: layer {i} is not a pre-norm block (input_layernorm, "
                        "post_attention_layernorm and no pre/post feed-forward norms)."
                    )

        for i in layers:
            attention = family.attention_module(model, i)
            projections = (names.q, names.o) if shared else (names.q, names.k, names.v, names.o)
            originals = {proj: getattr(attention, proj) for proj in projections}
            weight = originals[names.q].weight
            for proj, base in originals.items():
                experts = experts_of(base, n, config.expert_noise)
                if proj == names.o:
                    module = ExpertOutputLinear(base, experts, kv_layout)
                else:
                    module = ExpertLinear(base, experts, kv_layout if proj == names.q else None)
                setattr(attention, _experts_name(proj), experts)
                handle.on_revert(lambda a=attention, p=proj: delattr(a, _experts_name(p)))
                setattr(attention, proj, module)
                handle.on_revert(lambda a=attention, p=proj, m=base: setattr(a, p, m))
                handle.modules.append(experts)
            router = BAMRouter(model.config.hidden_size, n, config.routing, config.top_k, weight.dtype, weight.device)
            with torch.no_grad():
                # explicitly: the model's post_init has run long before, nothing else initialises it
                nn.init.normal_(router.weight, mean=0.0, std=config.router_init_std)
            attention.attention_router = router
            handle.on_revert(lambda a=attention: delattr(a, "attention_router"))
            handle.modules.append(router)
            if shared:
                groups = attention.num_key_value_groups
                attention.num_key_value_groups = groups * n
                handle.on_revert(lambda a=attention, g=groups: setattr(a, "num_key_value_groups", g))
            hook = attention.register_forward_pre_hook(
                functools.partial(_route, projections=projections, o_proj_name=names.o), with_kwargs=True
            )
            handle.on_revert(hook.remove)
            if config.parallel_block:
                layer = decoder_layers[i]
                post_norm = layer.post_attention_layernorm
                stash = layer.input_layernorm.register_forward_pre_hook(
                    functools.partial(_stash_block_input, post_norm=post_norm), with_kwargs=True
                )
                feed = post_norm.register_forward_pre_hook(_feed_block_input, with_kwargs=True)
                handle.on_revert(stash.remove)
                handle.on_revert(feed.remove)
                handle.on_revert(lambda m=post_norm: m.__dict__.pop(_BLOCK_INPUT, None))

    def neutral_config(self, family: FamilySpec, model_config: PretrainedConfig) -> BAMConfig:
        # identical experts and gates that sum to one: sum_j g_j MHA(x) = MHA(x)
        return BAMConfig(num_experts=3, routing="soft", kv="experts", parallel_block=False, expert_noise=0.0)
