"""Router losses for training Mixture-of-Experts models: Switch load balancing and the router z-loss.

`install_router_losses(model, load_balance_weight, z_loss_weight)` hooks every MoE router of a Mixtral, Qwen2-MoE or
Qwen3-MoE model (found through the family spec: `spec.mlp.router` of the layers in `spec.moe_layers(model)`, so a
model upcycled from a dense one is covered too). After every training-mode forward of the causal LM it adds

    load_balance_weight * mean_l L_LB(l) + z_loss_weight * mean_l L_z(l)

to `outputs.loss` and reports it in `outputs.aux_loss` (with the patches' auxiliary losses, through
`hf_attn_zoo.patching.register_aux_loss`: one aux-loss hook for everything). Per MoE layer, over its T tokens:

- Switch load balancing (Fedus et al. 2021, Eq. 4-6; BAM, Zhang et al. 2024, Sec. 4):
  `L_LB = N sum_i f_i P_i`, with `f_i` the fraction of tokens whose top-k includes expert i (the top-k the router
  actually returned) and `P_i` the mean router probability of expert i. This is the definition of transformers'
  `load_balancing_loss_func` for top-k routing: `sum_i f_i = k`, so a perfectly balanced router scores `k` (1 for
  top-1, as in Switch).
- Router z-loss (ST-MoE, Zoph et al. 2022, Eq. 5; BAM Sec. 4): `L_z = (1/T) sum_t (logsumexp_j x_tj)^2`.

Both are averaged over the MoE layers. BAM writes the total as a *sum* over layers; the mean is what transformers'
Mixtral loss does (it pools the layers) and what MoH's balance loss in this project does, so a weight means the same
for a 2-layer and a 32-layer model (to reproduce BAM's sum, multiply the weights by the number of MoE layers). With an
attention mask, masked-out tokens (padding) count in neither `f_i`, `P_i` nor `L_z`; packed training blocks have no
mask and count every token.

transformers' own Mixtral-style loss (`output_router_logits=True`, weighted by `config.router_aux_loss_coef`) is the
same load-balancing loss: while router losses are installed, training forwards run with `output_router_logits=False`,
so it is replaced by this one and never counted twice (a warning is logged when the config turns it on). Eval-mode
forwards are left exactly as they are.

Example:
    >>> handle = hf_attn_zoo.install_router_losses(model, load_balance_weight=0.01, z_loss_weight=0.001)
    >>> model.train(); out = model(input_ids, labels=input_ids)   # out.loss includes them, out.aux_loss holds them
    >>> handle.pop_metrics()   # {"load_balance": ..., "z": ...}: unweighted layer means of the last training forward
    >>> handle.remove()
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import InvalidOptionError, PatchConflictError, UnsupportedArchitectureError
from .families.spec import resolve_family
from .patching import register_aux_loss
from .wrappers import inner_model

__all__ = ["RouterLosses", "install_router_losses", "load_balancing_loss", "moe_layers", "router_z_loss"]

logger = logging.getLogger(__name__)

_INSTALLED = "_zoo_router_losses"


def load_balancing_loss(
    router_logits: torch.Tensor, top_k_index: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch load-balancing loss `N sum_i f_i P_i` of one MoE layer.

    Args:
        router_logits (`torch.Tensor`): `(T, N)` router logits.
        top_k_index (`torch.Tensor`): `(T, k)` experts each token was routed to.
        token_mask (`torch.Tensor`, *optional*): `(T,)`, 1 for tokens that count (e.g. the flattened attention mask).

    Returns:
        `torch.Tensor`: a float32 scalar; `k` when perfectly balanced. Gradients flow through `P_i` only.
    """
    num_experts = router_logits.shape[-1]
    probs = torch.softmax(router_logits.float(), dim=-1)
    chosen = torch.zeros_like(probs).scatter_(-1, top_k_index.long(), 1.0)
    if token_mask is None:
        f, p = chosen.mean(0), probs.mean(0)
    else:
        weights = token_mask.to(probs.dtype).unsqueeze(-1)
        count = weights.sum().clamp_min(1.0)
        f, p = (chosen * weights).sum(0) / count, (probs * weights).sum(0) / count
    return num_experts * (f * p).sum()


def router_z_loss(router_logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss `(1/T) sum_t (logsumexp_j x_tj)^2` of one MoE layer (float32 scalar; `token_mask` as above)."""
    squared = torch.logsumexp(router_logits.float(), dim=-1).square()
    if token_mask is None:
        return squared.mean()
    weights = token_mask.to(squared.dtype)
    return (squared * weights).sum() / weights.sum().clamp_min(1.0)


def moe_layers(model: torch.nn.Module) -> list[int]:
    """Indices of the MoE layers of `model` (a causal LM, or a PEFT/DDP wrapper of one); `[]` for a dense model."""
    inner = inner_model(model)
    return resolve_family(inner.config).moe_layers(inner)


@dataclass
class _Capture:
    """What the hooks collect during one training forward (cleared as soon as the loss is computed)."""

    active: bool = False
    token_mask: torch.Tensor | None = None
    routed: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        self.active, self.token_mask, self.routed = False, None, []


class RouterLosses:
    """The handle `install_router_losses` returns. `remove()` (or leaving a `with` block) takes everything out.

    Attributes:
        load_balance_weight (`float`), z_loss_weight (`float`): the weights.
        layers (`list[int]`): the MoE layers whose routers are hooked.
    """

    def __init__(self, model, load_balance_weight: float, z_loss_weight: float, layers: list[int]):
        self.model = model
        self.load_balance_weight = load_balance_weight
        self.z_loss_weight = z_loss_weight
        self.layers = layers
        self._capture = _Capture()
        self._hook_ids: list[int] = []
        self._handles: list[Any] = []
        self._registration = None
        self._warned_empty = False

    def pop_metrics(self) -> dict[str, torch.Tensor]:
        """`{"load_balance": L_LB, "z": L_z}` (detached unweighted layer means) of the last training forward; clears."""
        metrics, self._capture.metrics = self._capture.metrics, {}
        return metrics

    def remove(self) -> None:
        """Remove every hook (also from copies PEFT made of hooked routers) and the aux-loss provider."""
        for handle in self._handles:
            handle.remove()
        ids = set(self._hook_ids)
        for module in self.model.modules():  # `modules_to_save` deep copies of a router carry the hook too
            for hooks in (
                module._forward_hooks,
                module._forward_hooks_with_kwargs,
                module._forward_hooks_always_called,
                module._forward_pre_hooks,
                module._forward_pre_hooks_with_kwargs,
            ):
                for hook_id in ids & set(hooks):
                    del hooks[hook_id]
        if self._registration is not None:
            self._registration.remove()
        self._handles, self._hook_ids, self._registration = [], [], None
        self._capture.clear()
        self._capture.metrics = {}
        if self.model.__dict__.get(_INSTALLED) is self:
            del self.model.__dict__[_INSTALLED]

    def __enter__(self) -> RouterLosses:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    # called by patching's aux-loss hook after the causal LM's forward, in training mode only
    def _aux_loss(self, model: torch.nn.Module) -> torch.Tensor | None:
        capture = self._capture
        if not capture.active:
            return None
        routed, token_mask = capture.routed, capture.token_mask
        capture.clear()
        if not routed:
            if not self._warned_empty:
                logger.warning(
                    "hf_attn_zoo router losses: no hooked router ran in this training forward; were the routers "
                    "replaced after install_router_losses? Remove the handle and install it again."
                )
                self._warned_empty = True
            return None
        balance, z = [], []
        for logits, index in routed:
            mask = _token_mask(token_mask, logits.shape[0])
            balance.append(load_balancing_loss(logits, index, mask))
            z.append(router_z_loss(logits, mask))
        balance_loss, z_loss = torch.stack(balance).mean(), torch.stack(z).mean()
        capture.metrics = {"load_balance": balance_loss.detach(), "z": z_loss.detach()}
        return self.load_balance_weight * balance_loss + self.z_loss_weight * z_loss


def install_router_losses(
    model: torch.nn.Module, load_balance_weight: float = 0.01, z_loss_weight: float = 0.001
) -> RouterLosses:
    """Add the Switch load-balancing loss and the router z-loss of every MoE layer to `outputs.loss` in training.

    See the module docstring for the definitions (mean over MoE layers; masked tokens excluded). Works on a plain
    transformers causal LM, after `hf_attn_zoo.patch` (install after patches that replace routers), and before or
    after PEFT wrapping (LoRA, `modules_to_save` router copies); safe with gradient checkpointing (recomputed router
    calls in the backward pass are ignored). Nothing is held between steps, and eval-mode forwards are unchanged
    (each hook returns at once).

    Args:
        model (`PreTrainedModel`): a MoE causal LM (Mixtral, Qwen2-MoE, Qwen3-MoE, or a PEFT/DDP wrapper of one).
        load_balance_weight (`float`, *optional*, defaults to 0.01): weight `alpha` of `L_LB` (>= 0).
        z_loss_weight (`float`, *optional*, defaults to 0.001): weight `beta` of `L_z` (>= 0).

    Returns:
        `RouterLosses`: the handle; `handle.remove()` restores the model's original behaviour.

    Raises:
        `UnsupportedArchitectureError`: the model has no MoE layer (or no family adapter).
        `InvalidOptionError`: a negative or non-numeric weight.
        `PatchConflictError`: router losses are already installed on this model.
    """
    for name, value in (("load_balance_weight", load_balance_weight), ("z_loss_weight", z_loss_weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise InvalidOptionError(f"install_router_losses: {name} must be a number >= 0, got {value!r}")
    inner = inner_model(model)
    family = resolve_family(inner.config)
    layers = family.moe_layers(inner)
    if not layers:
        raise UnsupportedArchitectureError(
            f"this {family.name} model has no MoE layer, so there are no router losses to add; start from a MoE "
            "model (Mixtral, Qwen2-MoE, Qwen3-MoE, or a dense model upcycled with hf_attn_zoo.upcycle)"
        )
    if inner.__dict__.get(_INSTALLED) is not None:
        raise PatchConflictError(
            "router losses are already installed on this model; call .remove() on the handle first"
        )
    if getattr(inner.config, "output_router_logits", False):
        logger.warning(
            "config.output_router_logits=True: transformers' own load-balancing loss (router_aux_loss_coef=%s) is "
            "turned off in training forwards while hf_attn_zoo router losses are installed, so the balance loss "
            "counts once (load_balance_weight=%s)",
            getattr(inner.config, "router_aux_loss_coef", None),
            load_balance_weight,
        )

    handle = RouterLosses(inner, float(load_balance_weight), float(z_loss_weight), layers)
    capture = handle._capture
    top_k = getattr(inner.config, "num_experts_per_tok", 1)

    def record(router, args, output):
        # a training forward of the causal LM is running (not a recomputation in the backward pass, not eval)
        if not capture.active or not router.training:
            return
        if isinstance(output, tuple) and len(output) >= 3:
            logits, index = output[0], output[2]
        else:
            logits = output[0] if isinstance(output, tuple) else output
            index = logits.topk(getattr(router, "top_k", top_k), dim=-1).indices
        logits = logits.reshape(-1, logits.shape[-1])
        capture.routed.append((logits, index.reshape(logits.shape[0], -1)))

    mask_position = _argument_position(inner, "attention_mask")

    def begin(module, args, kwargs):
        if not module.training:
            return None
        capture.clear()
        capture.active = True
        mask = kwargs.get("attention_mask")
        if mask is None and mask_position is not None and len(args) > mask_position:
            mask = args[mask_position]
        capture.token_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        if kwargs.get("output_router_logits", getattr(module.config, "output_router_logits", False)):
            return args, {**kwargs, "output_router_logits": False}  # ours replaces transformers' own
        return None

    try:
        for layer in layers:
            router = family.moe_router(inner, layer)
            router_handle = router.register_forward_hook(record)
            handle._handles.append(router_handle)
            handle._hook_ids.append(router_handle.id)
        begin_handle = inner.register_forward_pre_hook(begin, with_kwargs=True)
        handle._handles.append(begin_handle)
        handle._hook_ids.append(begin_handle.id)
        handle._registration = register_aux_loss(inner, handle._aux_loss)
    except BaseException:
        handle.remove()
        raise
    inner.__dict__[_INSTALLED] = handle
    return handle


def _token_mask(mask: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """The `(rows,)` mask of a `(batch, length)` attention mask for `rows = batch * seq` router rows, else None."""
    if mask is None or rows % mask.shape[0]:
        return None
    length = rows // mask.shape[0]
    if mask.shape[1] < length:
        return None
    return mask[:, -length:].reshape(-1)  # with a KV cache the mask also covers the cached positions


def _argument_position(model: torch.nn.Module, name: str) -> int | None:
    try:
        parameters = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return None
    return parameters.index(name) if name in parameters else None
