"""Muon for the hidden matrices of a model, AdamW for everything else, as one optimizer (`optim.name: muon`).

Muon (Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024; "Muon is Scalable for LLM
Training", arXiv:2502.16982) replaces each matrix's momentum update by its orthogonalisation (5 Newton-Schulz
steps), which only makes sense for a matrix that maps one hidden space to another. `classify_parameters` decides,
by this rule, in this order:

1. `embedding`: the input embeddings and the LM head (`get_input_embeddings()` / `get_output_embeddings()`, tied or
   not) -> AdamW: their rows are looked up one token at a time, not multiplied as a whole.
2. `router`: parameters of a router -> AdamW: a router's few outputs are scores, not a hidden space. A router is the
   family's MoE router (`mlp.router` of the family spec, e.g. `mlp.gate`) or any module whose name ends in `router`
   (what the patches name the routers they add: MoH's `head_router`, BAM's `attention_router`).
3. `vector`: anything 1-D (norms, biases, sinks), a parameter whose name ends in `bias` (per-expert biases
   `[E, out]`) and a matrix with at most one row or column (Qwen2-MoE's `shared_expert_gate`; an empty shared
   expert of an upcycled model) -> AdamW.
4. `matrix`: every other 2-D parameter -> Muon.
5. `experts`: a 3-D parameter under a module whose name ends in `experts` (the fused experts of a MoE block
   `[E, out, in]`, or `[E, in, out]` where the module says `is_transposed`; BAM's `q_proj_experts`) -> Muon on each
   expert's matrix (`zeropower_via_newtonschulz` is batched over the leading dimension).
6. `other`: any other shape (a convolution kernel, > 3-D) -> AdamW, named in a warning.

The learning rate of a Muon matrix `[A, B]` is adjusted (`adjust_lr`) so that settings tuned for AdamW carry over:
`match_rms_adamw` (Moonshot: `0.2 * sqrt(max(A, B))`, the default) or `original` (Keller Jordan: `sqrt(max(1, A/B))`
with A the output dimension). Weight decay on Muon matrices is decoupled (`W <- W (1 - lr wd)`), as in AdamW.

A model converted to latent attention (`mla`) should need no rule of its own: its latent down/up projections are
`nn.Linear` matrices (`matrix`) and its norms vectors; for these non-square shapes the adjusted learning rate matters
most. Not yet tested here: tests/tuning/test_muon.py has no MLA case.

Sharded parameters (FSDP, DeepSpeed) hold slices of matrices, so recipes refuse Muon with them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any, Literal, cast

import torch
from torch.optim.adamw import adamw
from transformers import PreTrainedModel

from ..errors import ZooError
from ..families.spec import resolve_family
from ..wrappers import inner_model

__all__ = [
    "NS_COEFFICIENTS",
    "MuonWithAdamW",
    "ParameterKind",
    "classify_parameters",
    "muon_param_groups",
    "naive_zeropower_via_newtonschulz",
    "zeropower_via_newtonschulz",
]

# (a, b, c) of the quintic iteration, chosen for the steepest slope at zero (Keller Jordan's Muon)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7

ParameterKind = Literal["matrix", "experts", "embedding", "router", "vector", "other"]
AdjustLR = Literal["match_rms_adamw", "original"]
MUON_KINDS = ("matrix", "experts")


def naive_zeropower_via_newtonschulz(
    matrix: torch.Tensor, steps: int = 5, coefficients: tuple[float, float, float] = NS_COEFFICIENTS
) -> torch.Tensor:
    """The reference: one 2-D matrix `X`, orthogonalised as `torch.optim.Muon` does: in bf16, made wide, scaled to
    `X / |X|_F`, then `steps` times `X <- a X + (b A + c A^2) X` with `A = X X^T`."""
    a, b, c = coefficients
    x = matrix.bfloat16()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=NS_EPS)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def zeropower_via_newtonschulz(
    update: torch.Tensor, steps: int = 5, coefficients: tuple[float, float, float] = NS_COEFFICIENTS
) -> torch.Tensor:
    """Orthogonalise each matrix of `update` (`[A, B]` or a stack `[E, A, B]`) with `steps` Newton-Schulz steps.

    Returns approximately `U V^T` of each matrix's SVD `U S V^T` (singular values land near 0.7-1.2 rather than at 1,
    which Muon's authors found to train as well), in bfloat16.
    """
    a, b, c = coefficients
    x = update.bfloat16()
    stack = x.reshape(-1, *x.shape[-2:])  # [E, A, B]
    tall = stack.size(-2) > stack.size(-1)
    if tall:
        stack = stack.mT
    # scaled so the spectral norm is at most 1, where the iteration converges
    stack = stack / torch.linalg.matrix_norm(stack).clamp(min=NS_EPS)[:, None, None]
    for _ in range(steps):
        gram = stack @ stack.mT  # [E, A, A]
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        stack = torch.baddbmm(stack, poly, stack, beta=a)
    return (stack.mT if tall else stack).reshape(x.shape)


def classify_parameters(model: torch.nn.Module) -> dict[str, ParameterKind]:
    """The kind of each trainable parameter of `model` (see the module docstring for the rule), by name."""
    inner = cast(PreTrainedModel, inner_model(model))
    embeddings = {
        id(module.weight)
        for module in (inner.get_input_embeddings(), inner.get_output_embeddings())
        if module is not None and getattr(module, "weight", None) is not None
    }
    router_paths, experts_paths = _family_paths(inner)
    kinds: dict[str, ParameterKind] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            kinds[name] = _kind(name, param, embeddings, router_paths, experts_paths)
    return kinds


def _family_paths(model: PreTrainedModel) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`mlp.router` and `mlp.experts` paths of the model's MoE family, or none for a dense or unknown model."""
    try:
        family = resolve_family(model.config)
    except (ZooError, AttributeError):
        return (), ()
    mlp = family.mlp
    if mlp.kind != "moe":
        return (), ()
    return (f"{mlp.module}.{mlp.router}",), (f"{mlp.module}.{mlp.experts}",)


def _kind(
    name: str,
    param: torch.Tensor,
    embeddings: set[int],
    router_paths: tuple[str, ...],
    experts_paths: tuple[str, ...],
) -> ParameterKind:
    modules = name.split(".")[:-1]
    dotted = f".{name}"

    def under(suffix: str, paths: tuple[str, ...]) -> bool:
        return any(m.endswith(suffix) for m in modules) or any(f".{p}." in dotted for p in paths)

    if id(param) in embeddings:
        return "embedding"
    if under("router", router_paths):
        return "router"
    if param.ndim < 2 or name.endswith("bias") or min(param.shape[-2:]) <= 1:
        return "vector"
    if param.ndim == 2:
        return "matrix"
    if param.ndim == 3 and under("experts", experts_paths):
        return "experts"
    return "other"


def muon_param_groups(
    model: torch.nn.Module,
    *,
    lr: float,
    adamw_lr: float,
    weight_decay: float,
    decay_names: Iterable[str] | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups of `MuonWithAdamW` for the trainable parameters of `model`.

    Args:
        model (`torch.nn.Module`): the model (PEFT / DDP wrappers are looked through for its family and embeddings).
        lr (`float`): Muon's learning rate, before the shape adjustment.
        adamw_lr (`float`): the learning rate of the AdamW parameters.
        weight_decay (`float`): decoupled weight decay of the Muon matrices and of the AdamW parameters in
            `decay_names`.
        decay_names (`Iterable[str]`, *optional*): names of the AdamW parameters that decay (the Trainer's
            `get_decay_parameter_names`: not biases or norms); `None`: all of them.

    Returns:
        `list[dict]`: non-empty groups, each with `use_muon`, and for stacked experts `transposed` (`[E, in, out]`).
    """
    kinds = classify_parameters(model)
    params = dict(model.named_parameters())
    decay = set(decay_names) if decay_names is not None else set(kinds)
    odd = [f"{n} {tuple(params[n].shape)}" for n, kind in kinds.items() if kind == "other"]
    if odd:
        warnings.warn(
            f"muon: {', '.join(odd)}: not a matrix or a stack of expert matrices; trained with AdamW instead",
            stacklevel=2,
        )
    groups: dict[tuple[bool, bool, float], list[torch.nn.Parameter]] = {}
    for name, kind in kinds.items():
        if kind in MUON_KINDS:
            transposed = kind == "experts" and bool(getattr(_owner(model, name), "is_transposed", False))
            key = (True, transposed, weight_decay)
        else:
            key = (False, False, weight_decay if name in decay else 0.0)
        groups.setdefault(key, []).append(params[name])
    return [
        {
            "params": group,
            "use_muon": use_muon,
            "transposed": transposed,
            "lr": lr if use_muon else adamw_lr,
            "weight_decay": decay_rate,
        }
        for (use_muon, transposed, decay_rate), group in groups.items()
    ]


def _owner(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return model.get_submodule(name.rpartition(".")[0])


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon on the groups with `use_muon`, AdamW on the others: one optimizer, so a learning-rate scheduler scales
    every group, gradient clipping sees every parameter, and one `state_dict` restores both halves exactly.

    Args:
        params (`list[dict]`): parameter groups (`muon_param_groups`); each may set any of the keyword arguments.
        lr (`float`): default learning rate (Muon: before the shape adjustment).
        weight_decay (`float`, *optional*, defaults to 0.0): decoupled weight decay (both halves).
        momentum (`float`, *optional*, defaults to 0.95): Muon's momentum.
        nesterov (`bool`, *optional*, defaults to `True`): Muon's Nesterov momentum.
        ns_steps (`int`, *optional*, defaults to 5): Newton-Schulz steps.
        adjust_lr (`str`, *optional*, defaults to `"match_rms_adamw"`): `match_rms_adamw` or `original`.
        betas (`tuple[float, float]`, *optional*, defaults to `(0.9, 0.999)`): AdamW's betas.
        eps (`float`, *optional*, defaults to 1e-8): AdamW's epsilon.
    """

    def __init__(
        self,
        params: list[dict[str, Any]],
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr: AdjustLR = "match_rms_adamw",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        if adjust_lr not in ("match_rms_adamw", "original"):
            raise ValueError(f"adjust_lr must be 'match_rms_adamw' or 'original', got {adjust_lr!r}")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            use_muon=False,
            transposed=False,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            adjust_lr=adjust_lr,
            betas=betas,
            eps=eps,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for param in group["params"]:
                if group["use_muon"] and param.ndim not in (2, 3):
                    raise ValueError(f"Muon takes matrices or stacks of matrices, got a parameter {tuple(param.shape)}")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        lr, momentum = group["lr"], group["momentum"]
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(param.grad)
            buffer = state["momentum_buffer"]
            # torch.optim.Muon's form: (1 - momentum) times the textbook buffer, which the normalisation removes
            buffer.lerp_(param.grad, 1 - momentum)
            update = param.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
            update = zeropower_via_newtonschulz(update, group["ns_steps"])
            param.mul_(1 - lr * group["weight_decay"])
            param.add_(update.to(param.dtype), alpha=-lr * _lr_ratio(group["adjust_lr"], param, group["transposed"]))

    def _adamw_step(self, group: dict[str, Any]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            params.append(param)
            grads.append(param.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if params:
            beta1, beta2 = group["betas"]
            adamw(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                [],
                steps,
                amsgrad=False,
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=False,
            )


def _lr_ratio(adjust_lr: AdjustLR, param: torch.Tensor, transposed: bool) -> float:
    """The multiplier of Muon's learning rate for one matrix (of a stack: each expert's `[out, in]`)."""
    out_dim, in_dim = param.shape[-2:]
    if transposed:
        out_dim, in_dim = in_dim, out_dim
    if adjust_lr == "original":
        return math.sqrt(max(1.0, out_dim / in_dim))
    return 0.2 * math.sqrt(max(out_dim, in_dim))
