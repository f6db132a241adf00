"""Layer selectors: which decoder layers a patch touches."""

from __future__ import annotations

import re
from collections.abc import Sequence

from .errors import InvalidOptionError

__all__ = ["LayerSelector", "resolve_layers"]

LayerSelector = str | int | Sequence[int]

_EVERY_NTH = re.compile(r"^every_(\d+)(?:st|nd|rd|th)?$")
_NAMED = ("all", "first_half", "second_half")
_EXCEPT = "except_"


def resolve_layers(selector: LayerSelector, num_layers: int) -> list[int]:
    """Turn a selector into a sorted list of layer indices (possibly empty: `patch` refuses a selection of no layer).

    Args:
        selector (`str | int | list[int]`):
            `"all"`, `"first_half"`, `"second_half"`, `"every_2nd"` / `"every_3rd"` / `"every_N"` (layers
            N-1, 2N-1, ...), `"except_<one of these>"` (the other layers: a hybrid model patches
            `"except_every_4th"` with one method and keeps, or patches differently, `"every_4th"`), a single index,
            or a list of indices (negative indices count from the end).
        num_layers (`int`): number of decoder layers of the model.
    """
    if isinstance(selector, str) and selector.startswith(_EXCEPT):
        inner = selector[len(_EXCEPT) :]
        if inner.startswith(_EXCEPT) or inner == "all":
            raise InvalidOptionError(
                f"layers={selector!r}: 'except_' takes one of {list(_NAMED[1:])} or 'every_N' (e.g. "
                f"'except_every_4th'), not {inner!r}."
            )
        excluded = set(resolve_layers(inner, num_layers))
        return [index for index in range(num_layers) if index not in excluded]
    if isinstance(selector, str):
        if selector == "all":
            return list(range(num_layers))
        if selector == "first_half":
            return list(range(num_layers // 2))
        if selector == "second_half":
            return list(range(num_layers // 2, num_layers))
        match = _EVERY_NTH.match(selector)
        if match and int(match.group(1)) >= 1:
            step = int(match.group(1))
            return list(range(step - 1, num_layers, step))
        raise InvalidOptionError(
            f"layers={selector!r} is not a layer selector; use one of {list(_NAMED)}, 'every_N' (e.g. 'every_3rd'), "
            "'except_every_N' / 'except_first_half' ..., an index or a list of indices."
        )
    if isinstance(selector, bool):
        raise InvalidOptionError(f"layers={selector!r} is not a layer selector; use 'all' or a list of indices.")
    indices = [selector] if isinstance(selector, int) else list(selector)
    resolved = []
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int):
            raise InvalidOptionError(f"layers contains {index!r}; layer indices must be integers.")
        if not -num_layers <= index < num_layers:
            raise InvalidOptionError(
                f"layers contains {index}, but the model has {num_layers} layers (valid: 0..{num_layers - 1})."
            )
        resolved.append(index % num_layers)
    if len(set(resolved)) != len(resolved):
        raise InvalidOptionError(f"layers={list(indices)} names a layer twice.")
    return sorted(resolved)
