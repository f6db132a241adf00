"""Reading a recipe's YAML: where each key was written, `_base` includes, and `key=value` overrides.

Nothing here knows the recipe's schema (`recipe_schema.py`) or its checks (`recipe_checks.py`): this module turns text
into a plain mapping plus a `SourceMap` of `file:line:column` marks, one per key (a key from a `_base` include keeps
the include's file and line; an override is marked as such), which every error message uses to name the line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from ..errors import RecipeError

__all__ = [
    "Loc",
    "SourceMap",
    "apply_overrides",
    "display_path",
    "format_key",
    "format_loc",
    "load_tree",
    "many_problems",
]

Loc = tuple[str | int, ...]


class SourceMap:
    """Where each key of a loaded recipe was written: `loc -> (file, line, column)` (1-based), or an override."""

    def __init__(self, file: str, base_dir: Path):
        self.file = file
        self.base_dir = base_dir
        self.marks: dict[Loc, tuple[str, int, int]] = {}

    def find(self, loc: Loc) -> tuple[str, int, int] | None:
        for end in range(len(loc), -1, -1):
            if loc[:end] in self.marks:
                return self.marks[loc[:end]]
        return None


def format_key(loc: Loc) -> str:
    """`train.lora.r` for `("train", "lora", "r")`."""
    return ".".join(str(part) for part in loc) or "<top level>"


def format_loc(source: SourceMap | None, loc: Loc) -> str:
    """`file:line: key.path` of a key (the nearest marked parent's line; just `file: key.path` without one)."""
    mark = source.find(loc) if source is not None else None
    if mark is None:
        return f"{source.file if source else '<recipe>'}: {format_key(loc)}"
    file, line, column = mark
    where = f"{file}:{line}" if line > 0 else file
    return f"{where}: {format_key(loc)}"


class _Loader(yaml.SafeLoader):
    """YAML 1.1 safe loader that also reads `1e-4` (no dot) as a float, as YAML 1.2 and people do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_with_marks(text: str, file: str) -> tuple[Any, dict[Loc, tuple[str, int, int]]]:
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark is not None else file
        problem = getattr(exc, "problem", None) or str(exc)
        context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and context_mark is not None:
            context += f" started at line {context_mark.line + 1}"
        raise RecipeError(f"{where}: invalid YAML: {problem}" + (f" ({context})" if context else "")) from None
    marks: dict[Loc, tuple[str, int, int]] = {}
    duplicates: list[str] = []

    def walk(current: yaml.Node, loc: Loc) -> None:
        if isinstance(current, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in current.value:
                key = key_node.value
                if key in seen:
                    line = key_node.start_mark.line + 1
                    duplicates.append(f"{file}:{line}: {format_key(loc + (key,))}: duplicate key")
                seen.add(key)
                marks[loc + (key,)] = (file, key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                walk(value_node, loc + (key,))
        elif isinstance(current, yaml.SequenceNode):
            for index, item in enumerate(current.value):
                marks[loc + (index,)] = (file, item.start_mark.line + 1, item.start_mark.column + 1)
                walk(item, loc + (index,))

    if node is not None:
        marks[()] = (file, node.start_mark.line + 1, node.start_mark.column + 1)
        walk(node, ())
    if duplicates:
        raise RecipeError("\n".join(duplicates) if len(duplicates) == 1 else many_problems(file, duplicates))
    return data, marks


def many_problems(file: str, problems: list[str]) -> str:
    """One message for several problems of a recipe file, one indented line each."""
    return f"{len(problems)} problems in recipe {file}:\n  " + "\n  ".join(problems)


def _merge(base: dict, base_marks: dict, child: dict, child_marks: dict, loc: Loc = ()) -> tuple[dict, dict]:
    merged = dict(base)
    marks = {k: v for k, v in base_marks.items() if k[: len(loc)] == loc}
    for key, value in child.items():
        key_loc = loc + (key,)
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key], sub = _merge(merged[key], marks, value, child_marks, key_loc)
            marks = {k: v for k, v in marks.items() if k[: len(key_loc)] != key_loc}
            marks.update(sub)
        else:
            merged[key] = value
            marks = {k: v for k, v in marks.items() if k[: len(key_loc)] != key_loc}
            marks.update({k: v for k, v in child_marks.items() if k[: len(key_loc)] == key_loc})
    return merged, marks


def load_tree(path: Path, display: str, chain: tuple[Path, ...] = ()) -> tuple[dict, dict]:
    """A recipe file with its `_base` includes merged in (the file's own keys win), and the marks of every key."""
    if path.resolve() in chain:
        raise RecipeError(f"{display}: `_base` includes form a cycle: {' -> '.join(str(p) for p in chain + (path,))}")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"{display}: cannot read recipe: {exc.strerror or exc}") from None
    data, marks = _yaml_with_marks(text, display)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{display}:1: a recipe must be a mapping of sections, got {type(data).__name__}")
    bases = data.pop("_base", None)
    if bases is None:
        return data, marks
    base_list = [bases] if isinstance(bases, str) else bases
    if not isinstance(base_list, list) or not all(isinstance(b, str) for b in base_list):
        raise RecipeError(f"{format_loc(_map(display, marks), ('_base',))}: must be a path or a list of paths")
    merged: dict = {}
    merged_marks: dict = {}
    for index, base in enumerate(base_list):
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        if not base_path.is_file():
            loc = ("_base",) if isinstance(bases, str) else ("_base", index)
            raise RecipeError(f"{format_loc(_map(display, marks), loc)}: base recipe {str(base_path)!r} not found")
        base_display = display_path(base_path)
        base_data, base_marks = load_tree(base_path, base_display, chain + (path.resolve(),))
        merged, merged_marks = _merge(merged, merged_marks, base_data, base_marks)
    marks = {k: v for k, v in marks.items() if k[:1] != ("_base",)}
    return _merge(merged, merged_marks, data, marks)


def _map(display: str, marks: dict) -> SourceMap:
    source = SourceMap(display, Path.cwd())
    source.marks = marks
    return source


def display_path(path: Path) -> str:
    """`path` relative to the working directory when it lies below it (as error messages show it)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def apply_overrides(data: dict, overrides: Iterable[str], marks: dict | None = None) -> dict:
    """Apply dotted command-line overrides (`train.what=all`, `patches.0.top_k=4`) to a recipe's raw mapping.

    Values are parsed as YAML (`1e-4`, `[q_proj, v_proj]`, `null`); missing intermediate mappings are created.

    Raises:
        `RecipeError`: an override without `=`, or one that indexes past a list or into a scalar.
    """
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"override {override!r} must look like key.path=value (e.g. optim.lr=1e-4)")
        try:
            value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parts: list[str | int] = []
        node: Any = data
        segments = key.strip().split(".")
        for position, segment in enumerate(segments):
            last = position == len(segments) - 1
            if isinstance(node, list):
                if not segment.lstrip("-").isdigit() or not -len(node) <= int(segment) < len(node):
                    raise RecipeError(
                        f"override {override!r}: {format_key(tuple(parts))} is a list of {len(node)} items; "
                        f"{segment!r} is not an index of it"
                    )
                index = int(segment) % len(node)
                parts.append(index)
                if last:
                    node[index] = value
                else:
                    node = node[index]
            elif isinstance(node, dict):
                parts.append(segment)
                if last:
                    node[segment] = value
                else:
                    if not isinstance(node.get(segment), (dict, list)):
                        node[segment] = {}
                    node = node[segment]
            else:
                raise RecipeError(f"override {override!r}: {format_key(tuple(parts))} is not a mapping")
        if marks is not None:
            loc = tuple(parts)
            for k in [k for k in marks if k[: len(loc)] == loc]:
                del marks[k]
            marks[loc] = (f"override {override!r}", 0, 0)
    return data
