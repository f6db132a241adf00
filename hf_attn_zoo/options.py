"""Option bounds: declared once, beside each option of a method, and checked for every method in one place.

A method's config declares what values an option takes in the field's metadata, beside its help:

    window: int = field(default=1024, metadata={"help": "keys per query in the window.", "ge": 1, "le": POSITIONS})

`ge` / `gt` / `le` / `lt` take a number or a `Limit`: a quantity of the model (`POSITIONS`, `QUERY_HEADS`), another
option (`other("block_size")`), or the blocks of an option's size in the position range (`blocks_of("block_size")`).
`check_bounds` (run by `Patch.configure` for `patch`, loading, the planner and upcycling, and by the recipe check
without a model) raises one `InvalidOptionError` that names the option, the bound, what the bound is, and the option's
help. Float options must be finite. `None` ("the method's default") is not checked, and a limit the model does not
define (no `max_position_embeddings`, or no model yet) is not checked. What ties several options together in ways a
bound cannot say stays in the method's `validate`.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import InvalidOptionError
from .kernels.pattern_handler import max_positions

if typing.TYPE_CHECKING:
    from transformers import PretrainedConfig

    from .families.spec import FamilySpec

__all__ = ["Limit", "POSITIONS", "QUERY_HEADS", "blocks_of", "bounds_text", "check_bounds", "other"]

Bound = float | int | None


@dataclass(frozen=True)
class Limit:
    """A bound that depends on the model or on another option: `value(config, family, model_config)` or None."""

    label: str
    value: Callable[[Any, FamilySpec | None, PretrainedConfig | None], Bound]

    def __call__(self, config: Any, family: FamilySpec | None, model_config: PretrainedConfig | None) -> Bound:
        return self.value(config, family, model_config)


def _max_positions(model_config: PretrainedConfig | None) -> int | None:
    """The model's position range, or None where there is no model yet or it defines none."""
    if model_config is None:
        return None
    return max_positions(model_config) or None


def _query_heads(family: FamilySpec | None, model_config: PretrainedConfig | None) -> int | None:
    if family is None or model_config is None:
        return None
    return family.head_layout(model_config).num_heads


POSITIONS = Limit("the model's max_position_embeddings", lambda c, f, m: _max_positions(m))
QUERY_HEADS = Limit("the model's query heads", lambda c, f, m: _query_heads(f, m))


def other(name: str) -> Limit:
    """The value of another option of the same config."""
    return Limit(name, lambda c, f, m: getattr(c, name))


def blocks_of(name: str) -> Limit:
    """How many blocks of `name` tokens cover the model's position range."""

    def blocks(config: Any, family: FamilySpec | None, model_config: PretrainedConfig | None) -> int | None:
        limit, size = _max_positions(model_config), getattr(config, name)
        return -(-limit // size) if limit and isinstance(size, int) and size >= 1 else None

    return Limit(f"the blocks of {name} tokens in the model's position range", blocks)


_SYMBOLS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_HOLDS = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b, "lt": lambda v, b: v < b}


def _bounds(field: dataclasses.Field) -> dict[str, Bound | Limit]:
    return {kind: field.metadata[kind] for kind in _SYMBOLS if field.metadata.get(kind) is not None}


def bounds_text(field: dataclasses.Field) -> str:
    """The declared bounds of a field, as `hf-attn-zoo methods` shows them (e.g. `>= 1, <= the model's ...`)."""
    return ", ".join(f"{_SYMBOLS[k]} {b.label if isinstance(b, Limit) else b}" for k, b in _bounds(field).items())


def check_bounds(
    method: str, config: Any, family: FamilySpec | None = None, model_config: PretrainedConfig | None = None
) -> None:
    """Raise `InvalidOptionError` for the first option of `config` outside its declared bounds, or not finite."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        help_text = field.metadata.get("help", "")
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidOptionError(
                f"{method}: {field.name}={value} must be a finite number ({help_text})", option=field.name
            )
        bounds = _bounds(field)
        limits = {
            kind: bound(config, family, model_config) if isinstance(bound, Limit) else bound
            for kind, bound in bounds.items()
        }
        if all(limit is None or _HOLDS[kind](value, limit) for kind, limit in limits.items()):
            continue
        allowed = " and ".join(
            f"{_SYMBOLS[kind]} {bound.label} ({limits[kind]})"
            if isinstance(bound, Limit)
            else f"{_SYMBOLS[kind]} {bound}"
            for kind, bound in bounds.items()
            if limits[kind] is not None
        )
        raise InvalidOptionError(
            f"{method}: {field.name}={value} is out of range: it must be {allowed}. {field.name}: {help_text}",
            option=field.name,
        )
