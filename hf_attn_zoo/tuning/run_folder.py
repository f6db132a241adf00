"""A tuning run's folder (`output_dir`): what it holds and when a rerun may write into it.

A run folder holds `recipe.yaml` (the recipe that wrote it), `checkpoint-N/` folders (complete once their layout is
written), `final/` (the saved model) and `result.json` (a `TuneResult`). `check_run_dir` is the rerun policy of
`run_recipe`: a finished run of the same recipe is returned as it is, an unfinished one resumes, a different recipe
is refused by the keys that changed (unless `train.allow_recipe_change`), and a folder that is not a run is never
written into.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import OutputExistsError, RecipeError, ZooError
from . import distributed
from .recipe import Recipe, validate_recipe

__all__ = ["HARMLESS_RECIPE_KEYS", "TuneResult", "check_run_dir", "last_checkpoint", "write_recipe"]

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TuneResult:
    """What a tuning run produced.

    Args:
        output_dir (`Path`): the run folder (checkpoints, `recipe.yaml`, `result.json`).
        final_dir (`Path`): the saved final model (`output_dir/final`).
        global_step (`int`): optimizer steps done in total (including those before a resume).
        final_loss (`float`, *optional*): the last logged training loss (including the auxiliary losses).
        loss_history (`list[tuple[int, float]]`): `(step, loss)` for every logged step of the whole run.
        aux_loss_history (`list[tuple[int, float]]`): `(step, aux_loss)` when the patches have auxiliary losses or
            the recipe has a `moe` section (router losses).
        eval_loss (`float`, *optional*): loss on the held-out documents (`data.held_out_fraction` > 0).
        train_tokens (`int`): tokens trained on in this invocation.
        train_tokens_per_second (`float`): `train_tokens` over the wall time of the training steps.
        resumed_from (`str`, *optional*): the checkpoint this invocation resumed from.
        eval_results (`dict`, *optional*): what `hf_attn_zoo.eval_harness.evaluate` returned.
        already_finished (`bool`): this call found the run finished (same recipe) and trained nothing; the rest is
            what the finished run stored in `result.json`.
        branches (`dict[int, TuneResult]`): with `train.branch_budgets`: each decay branch's result, by token budget
            (each stores its own `result.json` in its folder, `output_dir/branches/<budget>/`).
    """

    output_dir: Path
    final_dir: Path
    global_step: int
    final_loss: float | None
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    aux_loss_history: list[tuple[int, float]] = field(default_factory=list)
    eval_loss: float | None = None
    train_tokens: int = 0
    train_tokens_per_second: float = 0.0
    resumed_from: str | None = None
    eval_results: dict[str, Any] | None = None
    already_finished: bool = False
    branches: dict[int, TuneResult] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("already_finished")
        data.pop("branches")
        data["output_dir"], data["final_dir"] = str(self.output_dir), str(self.final_dir)
        return json.dumps(data, indent=2, default=str)

    @classmethod
    def from_json(cls, text: str) -> TuneResult:
        data = json.loads(text)
        known = {f for f in cls.__dataclass_fields__ if f not in ("already_finished", "branches")}
        data = {k: v for k, v in data.items() if k in known}
        data["output_dir"], data["final_dir"] = Path(data["output_dir"]), Path(data["final_dir"])
        for key in ("loss_history", "aux_loss_history"):
            data[key] = [tuple(item) for item in data.get(key) or []]
        return cls(**data)


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete `checkpoint-N` folder in `output_dir` (trainer state and layout written), or `None`."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = []
    for child in folder.iterdir():
        match = _CHECKPOINT.match(child.name)
        complete = (child / "trainer_state.json").is_file() and (child / distributed.CHECKPOINT_LAYOUT).is_file()
        if match and child.is_dir() and complete:
            found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


# Keys whose change does not change what a run trains, so a rerun with them changed still counts as the same run:
# where the run folder is (`output_dir`, `name`), how it is described, whether to resume and whether a change is
# allowed, how often it logs and checkpoints and how many checkpoints it keeps, and the evaluation after training
# (`eval`, and `train.eval_steps`, which only measures). `init` is added when resuming an unfinished run from a
# checkpoint: the init hooks do not run then (the checkpoint holds their result).
HARMLESS_RECIPE_KEYS = (
    "name",
    "description",
    "output_dir",
    "train.resume",
    "train.allow_recipe_change",
    "train.logging_steps",
    "train.save_steps",
    "train.save_total_limit",
    "train.eval_steps",
    "eval",
)
_RUN_FILES = ("recipe.yaml", "result.json", "final", "final.partial")


def _is_run_dir(folder: Path) -> bool:
    return any((folder / name).exists() for name in _RUN_FILES) or any(
        _CHECKPOINT.match(child.name) for child in folder.iterdir()
    )


def _normalized(text: str) -> dict[str, Any]:
    """A saved recipe as flat keys, with the defaults of keys added since it was written filled in."""
    import yaml

    data = yaml.safe_load(text) or {}
    try:
        data = yaml.safe_load(validate_recipe(data).to_yaml())
    except (ZooError, TypeError, AttributeError):
        pass  # a recipe of an older schema: compared as written
    return _flatten(data)


def _changed_keys(before_text: str, after_text: str, harmless: Sequence[str]) -> list[str]:
    before, after = _normalized(before_text), _normalized(after_text)

    def counts(key: str) -> bool:
        return not any(key == h or key.startswith(f"{h}.") for h in harmless)

    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k) and counts(k))


def check_run_dir(recipe: Recipe, output_dir: Path, overwrite: bool, clear: bool) -> TuneResult | None:
    """The rerun policy of `run_recipe`: the stored result of a finished run of the same recipe, `None` to train (a
    new run, a resume, or a fresh start after `overwrite`), or an error for a folder this recipe must not write."""
    from ..outputs import OVERWRITE_HINT, clear_folder, holds_something

    if overwrite and not clear:
        return None  # process 0 alone judges and empties the folder (the launcher stops every process if it fails)
    if not holds_something(output_dir):
        return None
    if output_dir.is_file() or not _is_run_dir(output_dir):
        raise OutputExistsError(
            f"output_dir {output_dir} already holds files that are not a tuning run (no recipe.yaml, result.json, "
            "final/ or checkpoint-N); refusing to write into it, even with --overwrite: choose another output_dir, "
            "or empty it yourself."
        )
    if overwrite:
        if clear:
            logger.warning("hf-attn-zoo tune: --overwrite: removing the earlier run in %s", output_dir)
            clear_folder(output_dir)
        return None
    finished = (output_dir / "result.json").is_file() and (output_dir / "final" / "config.json").is_file()
    resume_from = last_checkpoint(output_dir) if recipe.train.resume and not finished else None
    if resume_from is not None:
        distributed.check_resume(resume_from, recipe)
    saved = output_dir / "recipe.yaml"
    harmless = HARMLESS_RECIPE_KEYS + (("init",) if resume_from is not None else ())
    if saved.is_file():
        changed = _changed_keys(saved.read_text(), recipe.to_yaml(), harmless)
    else:
        changed = ["<recipe.yaml is missing: cannot tell which recipe wrote this run>"]
    if changed and not recipe.train.allow_recipe_change:
        state = "finished" if finished else "unfinished"
        raise RecipeError(
            f"output_dir {output_dir} holds an {state} run of a different recipe; changed: {', '.join(changed)}. "
            "Set train.allow_recipe_change=true to continue it with this recipe anyway, use another output_dir, or "
            f"start over: {OVERWRITE_HINT}."
        )
    if changed:
        logger.warning(
            "hf-attn-zoo tune: continuing %s with a changed recipe (train.allow_recipe_change): %s",
            output_dir,
            ", ".join(changed),
        )
        return None
    if finished:
        result = TuneResult.from_json((output_dir / "result.json").read_text())
        result.already_finished = True
        return result
    return None


def write_recipe(recipe: Recipe, output_dir: Path) -> None:
    """`output_dir/recipe.yaml`: the recipe of the run (checked against the folder's earlier one by `check_run_dir`
    before training started)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "recipe.yaml").write_text(recipe.to_yaml())


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): data}
