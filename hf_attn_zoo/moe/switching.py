"""Expert switching, the intervention of MoTE, "Mixture of Tunable Experts - Behavior Modification of DeepSeek-R1 at
Inference Time" (arXiv:2502.11096): switch chosen experts of chosen MoE layers off or on, temporarily or for good.

Switches are given per MoE layer, as `{layer: [experts]}` (`gain`: `{layer: {expert: factor}}`); a layer key is the
decoder-layer index (an `int`, or the same number as a string, which is what JSON makes of it) or `"all"` (every MoE
layer; a specific layer adds to it, and wins over it for a `gain` entry). The four kinds, on top of the routing
overrides of `hf_attn_zoo.moe.routing`:

- `off`: masked before the top-k, so the next-ranked expert takes the place (MoTE's "switch off" as this library
  implements it; the same number of experts still runs). Routing override `disabled`.
- `drop`: removed after the top-k, the remaining weights renormalised where the family renormalises; no
  replacement, fewer experts run (the other reading of the paper). Routing override `dropped`.
- `on`: always selected, taking the place of the lowest-ranked experts (at most top-k per layer). `forced`.
- `gain`: a factor on the expert's routing weight (0 keeps it selected but silences it). `gain`.

An expert can be in at most one of `off`, `drop` and `on` per layer.

Permanent switches are the `mote` patch (`hf_attn_zoo.patch(model, "mote", off={...})`: recorded in the config,
re-applied by `hf_attn_zoo.from_pretrained`). Temporary ones are `switch_experts`, which works on a plain MoE model
and on a `mote`-patched one: there it *combines* with the patch's switches by default (the temporary setting of an
expert wins over the patch's setting of that expert: switching on an expert the patch switched off moves it from
`off` to `on`), or *replaces* them with `mode="replace"`; the patch's switches are restored exactly on exit.
`switch_experts` blocks nest the same way (each combines with the one around it).

Turning an fTRI profile (`hf_attn_zoo.analysis.profile_experts`) into switches: `experts_to_switch(profile, 10)`;
the random control of the paper: `random_experts(profile, 10, seed=0)`.

Example:
    >>> profile = profile_experts(model, tokenizer, {"code": code, "prose": prose}, target="code")
    >>> with switch_experts(model, off=experts_to_switch(profile, 10)):
    ...     logits = model(ids).logits
    >>> hf_attn_zoo.patch(model, "mote", off={"all": [3], 12: [0, 5]}, gain={4: {1: 0.5}})
"""

from __future__ import annotations

import contextlib
import math
import numbers
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..errors import InvalidOptionError, PatchConflictError
from ..wrappers import inner_model
from .overrides import RoutingOverride, routing_target
from .routing import RoutingHandle, set_routing

__all__ = ["KINDS", "experts_to_switch", "random_experts", "switch_experts"]

# switch kind -> the routing override field implementing it
KINDS = {"off": "disabled", "drop": "dropped", "on": "forced"}
_STATE = "_zoo_switches"

# the routing module's words for the switch kinds, in its error messages
_WORDS = (
    ("RoutingOverride.disabled", "off"),
    ("RoutingOverride.dropped", "drop"),
    ("RoutingOverride.forced", "on"),
    ("RoutingOverride.gain", "gain"),
    ("both forced and disabled", "both switched on (on) and off (off)"),
    ("both forced and dropped", "both switched on (on) and dropped (drop)"),
    ("forced experts", "experts switched on"),
    ("cannot force experts", "cannot switch on experts"),
    ("once the disabled ones are masked", "once the ones switched off are masked"),
    ("every expert is disabled", "every expert is switched off"),
)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _layer_key(where: str, key: Any) -> str:
    """`"all"` or the layer index as a string (JSON turns int keys into strings: both are accepted)."""
    if key == "all":
        return "all"
    if _is_int(key) and key >= 0:
        return str(int(key))
    if isinstance(key, str) and key.strip().isdigit():
        return str(int(key))
    raise InvalidOptionError(f"{where}: layer keys are layer indices (>= 0) or 'all', got {key!r}")


def _expert(where: str, value: Any) -> int:
    if _is_int(value) and value >= 0:
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise InvalidOptionError(f"{where}: experts are indices >= 0, got {value!r}")


def _sort_keys(keys: Iterable[str]) -> list[str]:
    return sorted(keys, key=lambda k: -1 if k == "all" else int(k))


def canonical_switches(
    where: str, off: Any = None, drop: Any = None, on: Any = None, gain: Any = None
) -> dict[str, dict | None]:
    """The switches in their JSON-stable form: string layer keys (`"all"` first), sorted unique expert lists,
    `gain` as `{layer: {expert (str): float}}`; `None` for a kind with nothing in it.

    Checks the structure (not the ranges, which need the model) and that no expert is in two of off/drop/on of a
    layer (counting `"all"`). Raises `InvalidOptionError` naming the option.
    """
    result: dict[str, dict | None] = {}
    for kind, value in (("off", off), ("drop", drop), ("on", on)):
        result[kind] = _canonical_lists(f"{where}: {kind}", value)
    result["gain"] = _canonical_gain(f"{where}: gain", gain)
    _check_kinds(where, result)
    return result


def _canonical_lists(where: str, value: Any) -> dict[str, list[int]] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidOptionError(f"{where} must be a dict {{layer: [experts]}} (layer: index or 'all'), got {value!r}")
    out: dict[str, list[int]] = {}
    for key, experts in value.items():
        layer = _layer_key(where, key)
        if layer in out:
            raise InvalidOptionError(f"{where}: layer {layer} is given twice ({key!r} and another spelling)")
        if isinstance(experts, (str, bytes, Mapping)) or not isinstance(experts, Iterable):
            raise InvalidOptionError(f"{where}[{layer}] must be a list of expert indices, got {experts!r}")
        out[layer] = sorted({_expert(f"{where}[{layer}]", e) for e in experts})
    out = {k: out[k] for k in _sort_keys(out) if out[k]}
    return out or None


def _canonical_gain(where: str, value: Any) -> dict[str, dict[str, float]] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidOptionError(f"{where} must be a dict {{layer: {{expert: factor}}}}, got {value!r}")
    out: dict[str, dict[str, float]] = {}
    for key, factors in value.items():
        layer = _layer_key(where, key)
        if layer in out:
            raise InvalidOptionError(f"{where}: layer {layer} is given twice ({key!r} and another spelling)")
        if not isinstance(factors, Mapping):
            raise InvalidOptionError(f"{where}[{layer}] must be a dict {{expert: factor}}, got {factors!r}")
        entry: dict[int, float] = {}
        for expert, factor in factors.items():
            index = _expert(f"{where}[{layer}]", expert)
            if index in entry:
                raise InvalidOptionError(f"{where}[{layer}]: expert {index} is given twice")
            if (
                isinstance(factor, bool)
                or not isinstance(factor, numbers.Real)
                or not math.isfinite(factor)
                or factor < 0
            ):
                raise InvalidOptionError(f"{where}[{layer}][{index}] must be a finite number >= 0, got {factor!r}")
            entry[index] = float(factor)
        if entry:
            out[layer] = {str(e): entry[e] for e in sorted(entry)}
    out = {k: out[k] for k in _sort_keys(out)}
    return out or None


def _check_kinds(where: str, switches: Mapping[str, Mapping | None]) -> None:
    """No expert in two of off/drop/on of one layer (a layer's set is its own entry plus the `"all"` entry)."""
    keys = {k for kind in KINDS for k in (switches.get(kind) or {})}
    for key in _sort_keys(keys - {"all"}) + (["all"] if "all" in keys else []):
        sets = {}
        for kind in KINDS:
            lists = switches.get(kind) or {}
            sets[kind] = set(lists.get(key, ())) | set(lists.get("all", ()))
        kinds = list(KINDS)
        for i, a in enumerate(kinds):
            for b in kinds[i + 1 :]:
                both = sorted(sets[a] & sets[b])
                if both:
                    layer = "every MoE layer ('all')" if key == "all" else f"layer {key}"
                    raise InvalidOptionError(f"{where}: experts {both} of {layer} are both in {a} and in {b}")


@dataclass
class _Plan:
    """Switches resolved to MoE layers: `status[layer][expert]` in off/drop/on, `gain[layer][expert]`."""

    status: dict[int, dict[int, str]] = field(default_factory=dict)
    gain: dict[int, dict[int, float]] = field(default_factory=dict)

    def override(self) -> RoutingOverride:
        lists: dict[str, dict[int, list[int]]] = {name: {} for name in KINDS.values()}
        for layer, experts in self.status.items():
            for expert, kind in sorted(experts.items()):
                lists[KINDS[kind]].setdefault(layer, []).append(expert)
        gain = {layer: dict(g) for layer, g in self.gain.items() if g}
        return RoutingOverride(**lists, gain=gain)

    def combine(self, other: _Plan) -> _Plan:
        """This plan with `other` on top: other's setting of an expert (kind or gain) replaces this one's."""
        status = {layer: dict(experts) for layer, experts in self.status.items()}
        gain = {layer: dict(g) for layer, g in self.gain.items()}
        for layer, experts in other.status.items():
            status.setdefault(layer, {}).update(experts)
        for layer, g in other.gain.items():
            gain.setdefault(layer, {}).update(g)
        return _Plan(status, gain)

    def is_empty(self) -> bool:
        return not any(self.status.values()) and not any(self.gain.values())


def resolve_switches(
    model: torch.nn.Module, switches: Mapping[str, Mapping | None], where: str, layers: Iterable[int] | None = None
) -> _Plan:
    """Canonical switches -> a `_Plan` on `model`'s MoE layers (`"all"`: the MoE layers among `layers`).

    A specific layer outside `layers` is an error; range and MoE-ness of the others are checked by the routing
    module when the plan is installed (`_install` / `_update`).
    """
    target = routing_target(model)
    selected = list(target.layers) if layers is None else [i for i in target.layers if i in set(layers)]
    if layers is not None and not selected and any(switches.get(kind) for kind in (*KINDS, "gain")):
        raise InvalidOptionError(
            f"{where}: the selected layers {sorted(layers)} hold no MoE layer; the MoE layers of this "
            f"{target.family.name} model are {target.layers}"
        )
    plan = _Plan()

    def layers_of(key: str) -> list[int]:
        if key == "all":
            return selected
        layer = int(key)
        if layers is not None and layer in target.layers and layer not in selected:
            raise InvalidOptionError(
                f"{where}: layer {layer} has switches but is not among the patched layers {sorted(layers)}"
            )
        return [layer]

    for kind in KINDS:
        for key in _sort_keys(switches.get(kind) or {}):
            for layer in layers_of(key):
                for expert in switches[kind][key]:
                    plan.status.setdefault(layer, {})[expert] = kind
    # "all" first, so a specific layer's factor wins
    for key in _sort_keys(switches.get("gain") or {}):
        for layer in layers_of(key):
            for expert, factor in switches["gain"][key].items():
                plan.gain.setdefault(layer, {})[int(expert)] = float(factor)
    return plan


def _translate(where: str, exc: InvalidOptionError) -> InvalidOptionError:
    message = str(exc)
    for old, new in _WORDS:
        message = message.replace(old, new)
    return InvalidOptionError(f"{where}: {message}")


@dataclass
class _Installed:
    """The switches installed on a model: its routing handle, the base plan and the one in force now."""

    routing: RoutingHandle
    base: _Plan
    current: _Plan
    owner: str  # "mote" (the patch) or "switch_experts" (a temporary installation)


def installed_switches(model: torch.nn.Module) -> _Installed | None:
    """The switch state of `model` (or of the model inside a PEFT/DDP wrapper), if any is installed."""
    state = inner_model(model).__dict__.get(_STATE)
    if state is not None and state.routing.removed:
        inner_model(model).__dict__.pop(_STATE, None)
        return None
    return state


def install(model: torch.nn.Module, plan: _Plan, where: str, owner: str, record: bool = False) -> _Installed:
    """Install `plan` with `set_routing` (validated first: on error nothing changes) and remember it on the model."""
    inner = inner_model(model)
    try:
        routing = set_routing(inner, plan.override(), record=record)
    except InvalidOptionError as exc:
        raise _translate(where, exc) from None
    except PatchConflictError:
        raise PatchConflictError(
            f"{where}: the routers of this model already carry routing overrides (another mote patch, or a "
            "set_routing / routing_override still active); put every switch in one mote patch, use "
            "hf_attn_zoo.moe.switch_experts for temporary changes, or remove the other overrides first"
        ) from None
    state = _Installed(routing, plan, plan, owner)
    inner.__dict__[_STATE] = state
    return state


def uninstall(model: torch.nn.Module, state: _Installed) -> None:
    state.routing.remove()
    inner = inner_model(model)
    if inner.__dict__.get(_STATE) is state:
        del inner.__dict__[_STATE]


def _update(state: _Installed, plan: _Plan, where: str) -> None:
    try:
        state.routing.update(plan.override())
    except InvalidOptionError as exc:
        raise _translate(where, exc) from None
    state.current = plan


@contextlib.contextmanager
def switch_experts(
    model: torch.nn.Module,
    off: Mapping | None = None,
    drop: Mapping | None = None,
    on: Mapping | None = None,
    gain: Mapping | None = None,
    *,
    mode: Literal["combine", "replace"] = "combine",
    record: bool = False,
) -> Iterator[RoutingHandle]:
    """Switch experts off / on for the duration of a `with` block (see the module docstring for the semantics).

    On a model without switches, installs routing overrides and removes them on exit (the routers are restored
    exactly). On a `mote`-patched model (or inside another `switch_experts` block), changes the installed overrides
    and restores the previous ones exactly on exit.

    Args:
        model (`PreTrainedModel`): a MoE causal LM of a family with a routing rule (or a PEFT/DDP wrapper of one).
        off (`dict[int | str, list[int]]`, *optional*): experts masked before the top-k (the next one takes the
            place).
        drop (`dict[int | str, list[int]]`, *optional*): experts removed after the top-k (not replaced).
        on (`dict[int | str, list[int]]`, *optional*): experts always selected (at most top-k per layer).
        gain (`dict[int | str, dict[int, float]]`, *optional*): factor (>= 0) on an expert's routing weight.
        mode (`str`, *optional*, defaults to `"combine"`): with switches already installed (a `mote` patch, an
            outer block), `"combine"` adds these on top (this block's setting of an expert wins over the installed
            one's), `"replace"` uses only these for the duration of the block.
        record (`bool`, *optional*, defaults to `False`): keep each MoE layer's routing of the last forward in
            `handle.decisions` (`RoutingDecision`: `index`, `weight`, `active`).

    Yields:
        `RoutingHandle`: the routing handle in force (read `decisions` with `record=True`).

    Raises:
        `InvalidOptionError`: a bad switch (layer, expert, too many experts on, ...); nothing is changed.
        `UnsupportedArchitectureError`: a dense model, or a family without a routing rule.
        `PatchConflictError`: routing overrides that are not switches (e.g. `set_routing`) are installed.

    Example:
        >>> with switch_experts(model, off={"all": [0]}, gain={3: {1: 2.0}}):
        ...     out = model.generate(ids, max_new_tokens=20)
    """
    where = "switch_experts"
    if mode not in ("combine", "replace"):
        raise InvalidOptionError(f"{where}: mode must be 'combine' or 'replace', got {mode!r}")
    switches = canonical_switches(where, off, drop, on, gain)
    plan = resolve_switches(model, switches, where)
    state = installed_switches(model)
    if state is None:
        state = install(model, plan, where, owner="switch_experts", record=record)
        try:
            yield state.routing
        finally:
            uninstall(model, state)
        return
    previous, was_recording = state.current, state.routing._record
    _update(state, plan if mode == "replace" else previous.combine(plan), where)
    state.routing._record = was_recording or bool(record)
    try:
        yield state.routing
    finally:
        if not state.routing.removed:
            state.routing._record = was_recording
            _update(state, previous, where)


def experts_to_switch(
    profile: Any,
    n: int = 10,
    *,
    min_score: float | None = None,
    max_per_layer: int | None = None,
) -> dict[int, list[int]]:
    """The `n` best experts of an fTRI profile as switches `{layer: [experts]}` (ready for `off=` / `on=`).

    Args:
        profile (`ExpertProfile | list[tuple]`): a profile (`hf_attn_zoo.analysis.profile_experts`; ranked across
            the whole model, as the paper does) or an already ranked list of `(layer, expert[, score])`.
        n (`int`, *optional*, defaults to 10): experts to take (the paper's headline setting is 10).
        min_score (`float`, *optional*): skip experts scoring below this (e.g. 0: only those the target class
            prefers); fewer than `n` may come back.
        max_per_layer (`int`, *optional*): take at most this many experts of one layer (e.g. `num_experts -
            top_k`, so that switching them all off leaves every token enough experts); later ones are skipped.

    Returns:
        `dict[int, list[int]]`: decoder-layer index -> sorted expert indices, layers in increasing order.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InvalidOptionError(f"experts_to_switch: n must be an integer >= 0, got {n!r}")
    if max_per_layer is not None and (
        isinstance(max_per_layer, bool) or not isinstance(max_per_layer, int) or max_per_layer < 1
    ):
        raise InvalidOptionError(f"experts_to_switch: max_per_layer must be an integer >= 1, got {max_per_layer!r}")
    if hasattr(profile, "top") and hasattr(profile, "num_experts"):
        ranked = profile.top(sum(profile.num_experts))
    elif isinstance(profile, Iterable) and not isinstance(profile, (str, bytes, Mapping)):
        ranked = list(profile)
    else:
        raise InvalidOptionError(
            f"experts_to_switch: expected an ExpertProfile or a ranked list of (layer, expert, score), got "
            f"{type(profile).__name__}"
        )
    chosen: dict[int, list[int]] = {}
    taken = 0
    for item in ranked:
        if taken >= n:
            break
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3) or not all(map(_is_int, item[:2])):
            raise InvalidOptionError(f"experts_to_switch: ranked items are (layer, expert[, score]), got {item!r}")
        layer, expert = int(item[0]), int(item[1])
        if min_score is not None and len(item) == 3 and item[2] < min_score:
            continue
        experts = chosen.setdefault(layer, [])
        if expert in experts or (max_per_layer is not None and len(experts) >= max_per_layer):
            continue
        experts.append(expert)
        taken += 1
    return {layer: sorted(chosen[layer]) for layer in sorted(chosen) if chosen[layer]}


def random_experts(
    source: Any,
    n: int = 10,
    seed: int = 0,
    *,
    max_per_layer: int | None = None,
    exclude: Mapping | None = None,
) -> dict[int, list[int]]:
    """`n` (layer, expert) pairs drawn uniformly without replacement: the random-expert control of MoTE.

    Args:
        source (`ExpertProfile | PreTrainedModel`): where the MoE layers and their expert counts come from.
        n (`int`, *optional*, defaults to 10): experts to draw.
        seed (`int`, *optional*, defaults to 0): the draw is a function of the seed alone.
        max_per_layer (`int`, *optional*): at most this many experts of one layer.
        exclude (`dict[int | str, list[int]]`, *optional*): switches whose experts are never drawn.

    Returns:
        `dict[int, list[int]]`: decoder-layer index -> sorted expert indices.
    """
    if hasattr(source, "layers") and hasattr(source, "num_experts") and not isinstance(source, torch.nn.Module):
        layers = list(zip(source.layers, source.num_experts))
    else:
        target = routing_target(source)
        layers = [(layer, target.rule.num_experts(target.routers[layer])) for layer in target.layers]
    excluded = set()
    for key, experts in (_canonical_lists("random_experts: exclude", exclude) or {}).items():
        keys = [layer for layer, _ in layers] if key == "all" else [int(key)]
        excluded |= {(layer, e) for layer in keys for e in experts}
    pool = [(layer, e) for layer, count in layers for e in range(count) if (layer, e) not in excluded]
    rng = random.Random(seed)
    rng.shuffle(pool)
    return experts_to_switch(pool, n, max_per_layer=max_per_layer)
