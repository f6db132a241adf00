"""Routing overrides for every MoE family: mask, drop, force or re-weight experts, change top-k, route by rank.

This is the mechanism under SCMoE (Self-Contrast MoE, arXiv:2405.14507: a strong and a weak routing of the same
model) and MoTE (Mixture of Tunable Experts, arXiv:2502.11096: switch experts off or force them on). It changes
how the router of each MoE layer turns its logits into `(top_k_weights, top_k_index)`; the experts, the logits and
every parameter stay as they are.

How it works: `set_routing` replaces the `forward` of each router *instance* (no new modules, parameters or
buffers, so the state dict is unchanged) with a wrapper that calls the router's own forward, and then, for the
tokens an override applies to, recomputes the selection from the router logits with the family's **routing
rule** (`rules.py`: one rule per kind, the family spec names its kind), which reproduces the transformers router
exactly when nothing is overridden. `overrides.py` resolves an override into validated per-layer plans (`plan.py`);
this module installs them on the routers.

A forward pre-hook on each MoE block records the `(batch, length)` shape of its input, so overrides can be limited
to some rows of the batch (`RoutingOverride.rows`): the router sees the tokens flattened row-major, token `n` is
row `n // length`. Rows that no override claims are routed normally, by the router's own output. When overrides
with different numbers of selected experts meet in one batch, shorter selections are padded with zero-weight
slots (the token's first expert, weight 0, `active=False`), so every expert implementation works unchanged.

Override semantics (per MoE layer):

- `disabled`: its router logit counts as -inf before the top-k, so the next-ranked expert takes the place (the
  top-k count is unchanged); for the softmax families it also leaves the softmax, as if the model did not have it
  (this changes the weights only where they are not renormalised, i.e. `norm_topk_prob=False`).
- `dropped`: removed after the top-k; the remaining weights are renormalised if the family renormalises (for
  GPT-OSS: softmax over the remaining picked logits), otherwise just left out. No replacement, fewer experts run.
- `forced`: always in the top-k, taking the place of the lowest-ranked ones; their weights come from the family's
  own scores (DeepSeek-V3: a forced expert's group is always among the selected groups).
- `gain`: multiplies an expert's final routing weight (after renormalisation and scaling); nothing else changes.
- `top_k`: the number of experts selected (the router's `top_k` otherwise).
- `rank`: only the expert ranked `rank` (1-based) by the family's selection order, with weight 1 (for DeepSeek-V3
  too: no `routed_scaling_factor`): SCMoE's "rank-k" weak routing (Eq. 4). The order is the one the family's top-k
  uses (DeepSeek-V3: biased scores within the selected groups). Disabled experts are skipped; `gain` still applies.

Example:
    >>> from hf_attn_zoo.moe import RoutingOverride, routing_override, set_routing
    >>> with routing_override(model, RoutingOverride(disabled={"all": [3]}, top_k=1)):
    ...     logits = model(ids).logits
    >>> # SCMoE in one batched forward: rows 0..B-1 normal, rows B..2B-1 rank-2
    >>> handle = set_routing(model, RoutingOverride(rank=2, rows=range(B, 2 * B)), record=True)
    >>> out = model(torch.cat([ids, ids]))
    >>> handle.decisions[layer].index   # (2B*T, k) experts of the last forward (and .weight, .active)
    >>> handle.remove()

Overrides on top of installed ones: `with_row_override(model, override, rows)` routes some batch rows by `override`
for a `with` block. With nothing installed it is `set_routing` limited to `rows`; on a model that already carries
overrides applying to every row (a MoTE patch, `switch_experts`, a `set_routing` without `rows`) it swaps the
installed overrides, for the block, for two: the other rows keep them, `rows` get them merged with `override` per
layer (`merge_plans`). SCMoE's weak pass uses it, so SCMoE runs on a MoTE-patched model.

Limits: a GPT-OSS MLP whose forward was replaced by a hub kernel (`use_kernels=True`, MegaBlocks) never calls its
router, so overrides do not reach it; random jitter noise (Mixtral training) is applied before the router and is
unaffected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidOptionError, PatchConflictError
from .overrides import (
    Entry,
    RoutingOverride,
    Target,
    check_plan,
    is_int,
    resolve_entries,
    resolve_override,
    routing_target,
)
from .plan import LayerPlan, describe_plan, describe_rows, merge_plans
from .rules import (
    ROUTING_RULES,
    GroupedSigmoidRule,
    RoutingRule,
    SoftmaxTopKRule,
    TopKSoftmaxRule,
    moe_families_with_rules,
    register_routing_rule,
    routing_rule,
)

__all__ = [
    "ROUTING_RULES",
    "GroupedSigmoidRule",
    "RoutingDecision",
    "RoutingHandle",
    "RoutingOverride",
    "RoutingRule",
    "SoftmaxTopKRule",
    "TopKSoftmaxRule",
    "moe_families_with_rules",
    "observe_routing",
    "register_routing_rule",
    "routing_rule",
    "route",
    "routing_override",
    "set_routing",
    "with_row_override",
]

_STATE = "_zoo_routing"
_SHAPE = "_zoo_routing_shape"
_HANDLE = "_zoo_routing_handle"


@dataclass
class RoutingDecision:
    """What one router selected in one call (detached).

    Attributes:
        logits (`torch.Tensor`): `(N, E)` router logits (N = batch * length tokens, row-major).
        index (`torch.Tensor`): `(N, k)` selected experts.
        weight (`torch.Tensor`): `(N, k)` their routing weights (0 in inactive slots).
        active (`torch.Tensor`): `(N, k)` bool; False for dropped experts and padding slots.
        shape (`tuple[int, int] | None`): `(batch, length)` of the MoE block input, when known.
    """

    logits: torch.Tensor
    index: torch.Tensor
    weight: torch.Tensor
    active: torch.Tensor
    shape: tuple[int, int] | None = None

    def counts(self, num_experts: int | None = None) -> torch.Tensor:
        """`(E,)` number of active (token, expert) selections per expert."""
        num_experts = num_experts or self.logits.shape[-1]
        return torch.bincount(self.index[self.active].reshape(-1), minlength=num_experts)


class RoutingHandle:
    """What `set_routing` returns: `remove()` restores the routers exactly, `update()` swaps the overrides.

    Attributes:
        layers (`list[int]`): the MoE layers whose routers are wrapped.
        decisions (`dict[int, RoutingDecision]`): with `record=True`, each layer's routing in the last forward.
    """

    def __init__(
        self,
        target: Target,
        entries: list[Entry],
        record: bool,
        on_route: Callable[[int, RoutingDecision], None] | None,
    ):
        self._target = target
        self._entries = entries
        self._record = record
        self._on_route = on_route
        self._undo: list[Callable[[], None]] = []
        self._rows_cache: dict[tuple, list[torch.Tensor]] = {}
        self.layers = list(target.layers)
        self.decisions: dict[int, RoutingDecision] = {}
        self.removed = False

    def update(self, overrides: RoutingOverride | Sequence[RoutingOverride] | None) -> None:
        """Replace the installed overrides (validated first; on error the old ones stay)."""
        if self.removed:
            raise InvalidOptionError("this routing handle was removed; call set_routing again")
        self._entries = resolve_entries(self._target, overrides)
        self._rows_cache = {}

    def remove(self) -> None:
        """Restore every router's forward and remove the hooks (idempotent)."""
        if self.removed:
            return
        while self._undo:
            self._undo.pop()()
        if self._target.model.__dict__.get(_HANDLE) is self:
            del self._target.model.__dict__[_HANDLE]
        self.removed = True

    def __enter__(self) -> RoutingHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def _token_groups(
        self, layer: int, num_tokens: int, shape: tuple[int, int] | None, device: torch.device
    ) -> list[tuple[LayerPlan, torch.Tensor | None]]:
        """`[(plan, token indices or None = all tokens)]` of the overrides with a plan in this layer."""
        entries = self._entries
        active = [(e, e.plans[layer]) for e in entries if layer in e.plans]
        if not active:
            return []
        if len(entries) == 1 and entries[0].rows is None:
            return [(active[0][1], None)]
        if shape is None or shape[0] * shape[1] != num_tokens:
            raise InvalidOptionError(
                f"layer {layer}: row-limited routing overrides need the (batch, length) shape of the MoE block input, "
                "but the router was called outside its MoE block"
            )
        key = (tuple(shape), device)
        tokens = self._rows_cache.get(key)
        if tokens is None:
            batch, length = shape
            row_of_token = torch.arange(num_tokens, device=device) // length
            tokens, claimed = [], set()
            for entry in entries:
                if entry.rows is None:
                    tokens.append(None)
                    continue
                if max(entry.rows) >= batch:
                    raise InvalidOptionError(
                        f"routing override rows {sorted(r for r in entry.rows if r >= batch)} are out of range for a "
                        f"batch of {batch} rows"
                    )
                claimed |= entry.rows
                rows = torch.tensor(sorted(entry.rows), device=device)
                tokens.append(torch.isin(row_of_token, rows).nonzero().squeeze(-1))
            rest = torch.tensor(sorted(set(range(batch)) - claimed), device=device, dtype=torch.long)
            tokens = [torch.isin(row_of_token, rest).nonzero().squeeze(-1) if t is None else t for t in tokens]
            if len(self._rows_cache) > 16:
                self._rows_cache.clear()
            self._rows_cache[key] = tokens
        return [(entry.plans[layer], tokens[i]) for i, entry in enumerate(entries) if layer in entry.plans]


@dataclass
class _RouterState:
    handle: RoutingHandle
    layer: int
    rule: RoutingRule
    original: Any  # the instance's own `forward` attribute before ours, or None (the class's)

    def call_original(self, router: torch.nn.Module, hidden_states: torch.Tensor) -> Any:
        if self.original is None:
            return type(router).forward(router, hidden_states)
        return self.original(hidden_states)

    def restore(self, router: torch.nn.Module) -> None:
        router.__dict__.pop(_STATE, None)
        router.__dict__.pop(_SHAPE, None)
        if self.original is None:
            router.__dict__.pop("forward", None)
        else:
            router.__dict__["forward"] = self.original


def _pad(tensor: torch.Tensor, width: int, fill: torch.Tensor | float | bool) -> torch.Tensor:
    if tensor.shape[1] == width:
        return tensor
    if isinstance(fill, torch.Tensor):
        extra = fill.expand(-1, width - tensor.shape[1])
    else:
        extra = tensor.new_full((tensor.shape[0], width - tensor.shape[1]), fill)
    return torch.cat([tensor, extra], dim=1)


def _routed_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> Any:
    state: _RouterState = self.__dict__[_STATE]
    shape = self.__dict__.pop(_SHAPE, None)
    if hidden_states.dim() == 3:  # DeepSeek-V3 routes the unflattened block input
        shape = tuple(hidden_states.shape[:2])
    output = state.call_original(self, hidden_states)
    handle = state.handle
    logits, weights, index = output
    groups = handle._token_groups(state.layer, logits.shape[0], shape, logits.device)
    active = None
    if groups:
        if len(groups) == 1 and groups[0][1] is None:
            new_weights, index, active = state.rule.apply(self, logits, groups[0][0])
            weights = new_weights.to(weights.dtype)
        else:
            results = [(tokens, state.rule.apply(self, logits[tokens], plan)) for plan, tokens in groups]
            width = max([index.shape[1]] + [r[1].shape[1] for _, r in results])
            active = _pad(torch.ones_like(index, dtype=torch.bool), width, False)
            index, weights = _pad(index, width, index[:, :1]), _pad(weights, width, 0.0)
            for tokens, (w, i, a) in results:
                a = torch.ones_like(i, dtype=torch.bool) if a is None else a
                index = index.index_copy(0, tokens, _pad(i, width, i[:, :1]))
                weights = weights.index_copy(0, tokens, _pad(w.to(weights.dtype), width, 0.0))
                active = active.index_copy(0, tokens, _pad(a, width, False))
        output = (logits, weights, index)
    if handle._record or handle._on_route is not None:
        decision = RoutingDecision(
            logits.detach(),
            index.detach(),
            weights.detach(),
            torch.ones_like(index, dtype=torch.bool) if active is None else active.detach(),
            None if shape is None else (int(shape[0]), int(shape[1])),
        )
        if handle._record:
            handle.decisions[state.layer] = decision
        if handle._on_route is not None:
            handle._on_route(state.layer, decision)
    return output


def _remember_shape(router: torch.nn.Module, block: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    hidden = args[0] if args else kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
        router.__dict__[_SHAPE] = tuple(hidden.shape[:2])


def set_routing(
    model: torch.nn.Module,
    overrides: RoutingOverride | Sequence[RoutingOverride] | None = None,
    *,
    record: bool = False,
    on_route: Callable[[int, RoutingDecision], None] | None = None,
) -> RoutingHandle:
    """Install routing overrides on every MoE router of `model` until `handle.remove()`.

    Args:
        model (`PreTrainedModel`): a MoE causal LM of a family with a routing rule (or a PEFT/DDP wrapper of one).
        overrides (`RoutingOverride | list[RoutingOverride]`, *optional*): one override, or several for disjoint
            `rows`; `None` or an empty override routes normally (useful with `record`).
        record (`bool`, *optional*, defaults to `False`): keep each layer's `RoutingDecision` of the last forward
            in `handle.decisions`.
        on_route (`Callable[[int, RoutingDecision], None]`, *optional*): called after every router call with the
            layer index and its decision (e.g. to accumulate expert counts over a generation).

    Returns:
        `RoutingHandle`: `remove()` restores the routers (also a context manager); `update()` changes overrides.

    Raises:
        `UnsupportedArchitectureError`: a dense model, or a family without a routing rule.
        `InvalidOptionError`: a bad override (layer, expert, top_k, rank, forced count, rows); nothing is changed.
        `PatchConflictError`: routing overrides are already installed on this model.
    """
    target = routing_target(model)
    if target.model.__dict__.get(_HANDLE) is not None or any(_STATE in r.__dict__ for r in target.routers.values()):
        raise PatchConflictError(
            "routing overrides are already installed on this model; use handle.update(...) or handle.remove() first"
        )
    entries = resolve_entries(target, overrides)
    handle = RoutingHandle(target, entries, bool(record), on_route)
    try:
        for layer in target.layers:
            router, block = target.routers[layer], target.blocks[layer]
            state = _RouterState(handle, layer, target.rule, router.__dict__.get("forward"))
            router.__dict__[_STATE] = state
            router.__dict__["forward"] = types.MethodType(_routed_forward, router)
            handle._undo.append(functools.partial(state.restore, router))
            hook = block.register_forward_pre_hook(functools.partial(_remember_shape, router), with_kwargs=True)
            handle._undo.append(hook.remove)
    except BaseException:
        handle.remove()
        raise
    target.model.__dict__[_HANDLE] = handle
    return handle


@contextlib.contextmanager
def routing_override(
    model: torch.nn.Module,
    overrides: RoutingOverride | Sequence[RoutingOverride] | None = None,
    *,
    record: bool = False,
    on_route: Callable[[int, RoutingDecision], None] | None = None,
) -> Iterator[RoutingHandle]:
    """`set_routing` for the duration of a `with` block (see there for the arguments)."""
    handle = set_routing(model, overrides, record=record, on_route=on_route)
    try:
        yield handle
    finally:
        handle.remove()


_MERGE_FIX = "choose an override that fits the installed ones, or change or remove the installed overrides"


def _merged_plans(target: Target, base: dict[int, LayerPlan], added: Entry, fix: str) -> dict[int, LayerPlan]:
    """Per layer, the installed plan `base` merged with the added entry's plan; each merge validated."""
    plans = {}
    for layer in target.layers:
        old, new = base.get(layer), added.plans.get(layer)
        if old is None or new is None:
            plan = new if old is None else old
            if plan is not None:
                plans[layer] = plan
            continue
        plan = merge_plans(old, new)
        try:
            check_plan(target, layer, plan)
        except InvalidOptionError as err:
            raise InvalidOptionError(
                f"{err}. In layer {layer} the routing overrides installed on this model (e.g. a MoTE patch) have "
                f"{describe_plan(old)}, and the override added for rows {describe_rows(added.rows)} has "
                f"{describe_plan(new)}; {fix}"
            ) from None
        plans[layer] = plan
    return plans


def _layered_entries(handle: RoutingHandle, override: RoutingOverride, fix: str) -> list[Entry]:
    """The entries that route `override.rows` by `override` on top of `handle`'s (every-row) overrides, and the
    other rows by those overrides unchanged. Validates everything; changes nothing."""
    limited = sorted({r for entry in handle._entries if entry.rows is not None for r in entry.rows})
    (added,) = resolve_entries(handle._target, override)
    if limited:
        raise PatchConflictError(
            f"routing overrides limited to rows {limited} are installed on this model; an override for rows "
            f"{describe_rows(added.rows)} can only be added on top of installed overrides that apply to every row "
            "(rows=None): remove them (handle.remove()) or install them without rows"
        )
    if not handle._entries:
        return [added]
    (base,) = handle._entries  # at most one entry has rows=None
    return [Entry(added.rows, _merged_plans(handle._target, base.plans, added, fix)), base]


@contextlib.contextmanager
def with_row_override(
    model: torch.nn.Module,
    override: RoutingOverride,
    rows: Iterable[int],
    *,
    conflict_fix: str | None = None,
) -> Iterator[RoutingHandle]:
    """Route batch `rows` by `override`, on top of any routing overrides installed on `model`, in a `with` block.

    With nothing installed this is `routing_override(model, override limited to rows)`. On a model whose installed
    overrides apply to every row (a MoTE patch, `switch_experts`, `set_routing` without `rows`), their handle's
    overrides are swapped for the block: the other rows keep them unchanged, `rows` get per MoE layer the installed
    plan merged with `override` (union of disabled / dropped / forced experts, both gains with `override`'s winning
    per expert, `override`'s `top_k` or `rank` replacing the installed one). On exit, also on error, the installed
    overrides are restored exactly (so a `handle.update()` inside the block does not outlive it). The installed
    handle's `record` / `on_route` keep working and see every row.

    Args:
        model (`PreTrainedModel`): a MoE causal LM of a family with a routing rule (or a PEFT/DDP wrapper of one).
        override (`RoutingOverride`): the routing of `rows`; its own `rows` must be `None`.
        rows (`Iterable[int]`): batch rows it applies to (e.g. `range(B, 2 * B)`).
        conflict_fix (`str`, *optional*): the fix a merge error suggests (a generic one otherwise).

    Yields:
        `RoutingHandle`: the handle in force (the installed one, or a fresh one removed on exit).

    Raises:
        `InvalidOptionError`: a bad override or rows, or a layer where the merged routing cannot work (named, with
            both plans); nothing is changed.
        `PatchConflictError`: the installed overrides are limited to some rows.
        `UnsupportedArchitectureError`: a dense model, or a family without a routing rule.
    """
    if not isinstance(override, RoutingOverride):
        raise InvalidOptionError(f"with_row_override: expected a RoutingOverride, got {type(override).__name__}")
    if override.rows is not None:
        raise InvalidOptionError(
            f"with_row_override: pass the rows as rows=..., not as RoutingOverride.rows (got {override.rows!r})"
        )
    limited = dataclasses.replace(override, rows=rows)
    target = routing_target(model)
    handle = target.model.__dict__.get(_HANDLE)
    if handle is None:
        with routing_override(model, limited) as fresh:
            yield fresh
        return
    entries = _layered_entries(handle, limited, conflict_fix or _MERGE_FIX)
    saved = handle._entries, handle._rows_cache
    handle._entries, handle._rows_cache = entries, {}
    try:
        yield handle
    finally:
        handle._entries, handle._rows_cache = saved


@contextlib.contextmanager
def observe_routing(model: torch.nn.Module, on_route: Callable[[int, RoutingDecision], None]) -> Iterator[None]:
    """Call `on_route(layer, decision)` after every router call inside the block, whatever routing is installed.

    On a model without routing overrides this installs an empty one (the family rule itself); on a model that already
    carries overrides (a `mote` patch, `set_routing`), it observes them as they are, and restores their own callback.
    """
    target = routing_target(model)
    handle = target.model.__dict__.get(_HANDLE)
    if handle is None:
        with set_routing(model, None, on_route=on_route):
            yield
        return
    own = handle._on_route

    def both(layer: int, decision: RoutingDecision) -> None:
        if own is not None:
            own(layer, decision)
        on_route(layer, decision)

    handle._on_route = both
    try:
        yield
    finally:
        handle._on_route = own


def route(
    model: torch.nn.Module, layer: int, router_logits: torch.Tensor, override: RoutingOverride | None = None
) -> RoutingDecision:
    """The routing `layer`'s router would produce for `router_logits` `(N, E)` under `override` (rows ignored).

    With no override this is the family rule itself, equal to the router's own `(weights, index)`.
    """
    target = routing_target(model)
    if not is_int(layer) or layer not in target.routers:
        raise InvalidOptionError(f"layer {layer!r} is not a MoE layer; the MoE layers are {target.layers}")
    plan = resolve_override(target, override).get(layer, LayerPlan()) if override is not None else LayerPlan()
    router = target.routers[layer]
    weights, index, active = target.rule.apply(router, router_logits.reshape(-1, router_logits.shape[-1]), plan)
    active = torch.ones_like(index, dtype=torch.bool) if active is None else active
    return RoutingDecision(router_logits, index, weights, active)
