"""The continue-tuning recipe: find, load and validate one; errors name the file, key and line.

A recipe is one YAML file (see `hf_attn_zoo/recipes/`). Every section rejects unknown keys. `load_recipe` turns any
problem (invalid YAML, an unknown key, a wrong type, an unknown corpus or method option, a missing data file) into a
single `RecipeError` whose message lists `file:line: key.path: what is wrong` for each problem found.

This is the public module; the pieces live beside it: `recipe_schema.py` (the pydantic sections, documented on their
classes), `recipe_yaml.py` (the YAML reader that keeps each key's line, `_base` includes, `key=value` overrides) and
`recipe_checks.py` (`validate_recipe`: every problem in one error). Everything they export is importable from here.

Example:

```python
>>> from hf_attn_zoo.tuning.recipe import load_recipe
>>> recipe = load_recipe("moh/smollm2_quick", overrides=["optim.lr=1e-4", "train.what=all"])
>>> recipe.train.max_steps
40
```
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path

from ..errors import RecipeError
from .recipe_checks import validate_recipe
from .recipe_schema import (
    CorpusSource,
    DataSection,
    DistributedSection,
    EvalSection,
    FilesSource,
    HFDatasetSource,
    InitStep,
    LoraSection,
    ModelSection,
    MoESection,
    OptimSection,
    PatchSpec,
    Recipe,
    TrainSection,
)
from .recipe_yaml import SourceMap, apply_overrides, display_path, load_tree

__all__ = [
    "CorpusSource",
    "DataSection",
    "DistributedSection",
    "EvalSection",
    "FilesSource",
    "HFDatasetSource",
    "InitStep",
    "LoraSection",
    "MoESection",
    "ModelSection",
    "OptimSection",
    "PatchSpec",
    "Recipe",
    "TrainSection",
    "apply_overrides",
    "find_recipe",
    "load_recipe",
    "recipes_dir",
    "shipped_recipes",
    "validate_recipe",
]


def recipes_dir() -> Path:
    """The folder of the recipes shipped with the package (`hf_attn_zoo/recipes`)."""
    return Path(__file__).resolve().parent.parent / "recipes"


def shipped_recipes() -> list[Path]:
    """Every shipped recipe (recursive; files under `_base/` folders are fragments and are left out)."""
    root = recipes_dir()
    return sorted(p for p in root.rglob("*.yaml") if "_base" not in p.relative_to(root).parts)


def find_recipe(name_or_path: str | Path) -> Path:
    """Resolve a recipe argument: an existing path, else a shipped recipe by name (`moh/smollm2_quick`).

    Raises:
        `RecipeError`: nothing matches, or a bare name matches several shipped recipes.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    root = recipes_dir()
    stem = str(name_or_path).removesuffix(".yaml").removesuffix(".yml")
    names = {str(p.relative_to(root).with_suffix("")): p for p in shipped_recipes()}
    if stem in names:
        return names[stem]
    matches = [p for n, p in names.items() if n.endswith("/" + stem) or n == stem]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        options = ", ".join(str(p.relative_to(root).with_suffix("")) for p in matches)
        raise RecipeError(f"recipe name {str(name_or_path)!r} is ambiguous: {options}")
    close = difflib.get_close_matches(stem, list(names), n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else f" Shipped recipes: {', '.join(sorted(names))}."
    raise RecipeError(f"recipe {str(name_or_path)!r} is neither a file nor a shipped recipe.{hint}")


def load_recipe(path_or_name: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Read, merge (`_base` includes), override and validate a recipe.

    Args:
        path_or_name (`str | Path`):
            A YAML file, or the name of a shipped recipe (`moh/smollm2_quick`).
        overrides (`Iterable[str]`, *optional*):
            Dotted `key=value` overrides applied after loading, e.g. `["train.what=all", "optim.lr=1e-4"]`.

    Returns:
        `Recipe`: the validated recipe; `recipe.location(loc)` gives `file:line` of a key.

    Raises:
        `RecipeError`: every problem found, in one error, each as `file:line: key.path: message`.
    """
    path = find_recipe(path_or_name)
    display = display_path(path)
    data, marks = load_tree(path, display)
    apply_overrides(data, overrides, marks)
    source = SourceMap(display, path.resolve().parent)
    source.marks = marks
    if "name" not in data:
        try:
            data["name"] = str(path.resolve().relative_to(recipes_dir()).with_suffix(""))
        except ValueError:
            data["name"] = path.stem
    return validate_recipe(data, source)
