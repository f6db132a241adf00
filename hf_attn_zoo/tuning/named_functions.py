"""Tables of functions a recipe names (`init` hooks, `callbacks` factories): registered under a name, or given as
`"package.module:function"`. One lookup, one set of error messages, for every such table."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import RecipeError

__all__ = ["register_in", "resolve_in"]

F = TypeVar("F", bound=Callable[..., Any])


def register_in(table: dict[str, Any], kind: str, name: str) -> Callable[[F], F]:
    """Decorator that registers a function in `table` under `name` (a second, different one is refused)."""

    def decorator(fn: F) -> F:
        if name in table and table[name] is not fn:
            raise ValueError(f"{name!r} is already registered ({kind}: {table[name].__qualname__})")
        table[name] = fn
        return fn

    return decorator


def resolve_in(table: dict[str, Any], kind: str, name: str) -> Any:
    """The function registered under `name`, or the one a `"module:function"` name points at.

    Raises:
        `RecipeError`: unknown name, or a `module:function` that cannot be imported or is not callable.
    """
    if name in table:
        return table[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            fn: Any = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise RecipeError(f"{kind} {name!r} cannot be imported: {exc}") from None
        if not callable(fn):
            raise RecipeError(f"{kind} {name!r} is not callable")
        return fn
    known = ", ".join(sorted(table)) or "none registered"
    raise RecipeError(f"unknown {kind} {name!r}; known: {known} (or give 'package.module:function')")
