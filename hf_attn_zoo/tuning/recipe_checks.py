"""The recipe's checks: every problem of a recipe, found before any model loads, reported in one `RecipeError`.

`validate_recipe` runs the schema (`recipe_schema.py`), turns pydantic's errors into `file:line: key.path: message`
lines (an unknown key names the allowed ones and the closest), then checks what a type cannot say: known corpora,
data files that exist, patch methods, their options and bounds (`hf_attn_zoo.options.check_bounds`, without a model),
optimizer names (Muon's keys only with `optim.name: muon`, which needs unsharded matrices), `train.trainer_args` that
are TrainingArguments fields not owned by a recipe key, init hooks, and `train.distributed`
(`distributed.sharding_problems`).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import types
import typing
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ValidationError

from ..errors import InvalidOptionError, RecipeError
from .recipe_schema import SOURCE_TAGS, CorpusSource, FilesSource, Recipe
from .recipe_yaml import Loc, SourceMap, format_loc, many_problems

__all__ = ["validate_recipe"]


def validate_recipe(data: dict | Recipe, source: SourceMap | None = None) -> Recipe:
    """Validate a raw mapping (or re-check a `Recipe`), raising one `RecipeError` that lists every problem."""
    if isinstance(data, Recipe):
        source = source or data._source
        data = data.model_dump(mode="python", exclude_unset=False)
    problems: list[tuple[Loc, str]] = []
    recipe: Recipe | None = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems = [_pydantic_problem(err, data) for err in exc.errors()]
    if recipe is not None:
        recipe._source = source
        problems = _semantic_problems(recipe)
    problems += _empty_section_problems(data, source)
    if problems:
        file = source.file if source is not None else "<recipe>"
        lines = [f"{format_loc(source, loc)}: {message}" for loc, message in _sorted(problems, source)]
        raise RecipeError(lines[0] if len(lines) == 1 else many_problems(file, lines))
    return recipe


def _empty_section_problems(data: Any, source: SourceMap | None) -> list[tuple[Loc, str]]:
    """A bare `moe:` or `distill:` in a file is YAML null, which would mean "off": say how to get the defaults."""
    problems: list[tuple[Loc, str]] = []
    for section in ("moe", "distill"):
        mark = source.marks.get((section,)) if source is not None else None
        if isinstance(data, dict) and section in data and data[section] is None and mark is not None and mark[1] > 0:
            problems.append(
                ((section,), f"the section is empty (null); write `{section}: {{}}` for the defaults, or remove it")
            )
    return problems


def _sorted(problems: list[tuple[Loc, str]], source: SourceMap | None) -> list[tuple[Loc, str]]:
    def line(item: tuple[Loc, str]) -> int:
        mark = source.find(item[0]) if source else None
        return mark[1] if mark else 0

    return sorted(dict.fromkeys(problems), key=line)


_TAGS = set(SOURCE_TAGS.values())


def _pydantic_problem(err: dict, data: Any) -> tuple[Loc, str]:
    raw_loc = tuple(err["loc"])
    loc = tuple(part for part in raw_loc if part not in _TAGS)
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(raw_loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return loc, f"unknown key{hint} (allowed here: {', '.join(allowed)})" if allowed else "unknown key"
    if kind == "missing":
        return loc, "required key is missing"
    message = err["msg"]
    value = err.get("input")
    if kind == "data_source" and isinstance(value, dict):
        message += f" (got keys: {', '.join(map(str, value)) or 'none'})"
    elif not isinstance(value, (dict, list)) and kind != "data_source":
        message += f" (got {value!r})"
    return loc, message


def _unwrap(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for arg in typing.get_args(annotation) for t in _unwrap(arg)]
    return [annotation]


def _allowed_keys(loc: Loc) -> list[str]:
    """Field names of the schema model found at `loc` (tags in `loc` pick the data-source type)."""
    current: list[Any] = [Recipe]
    for part in loc:
        if part in _TAGS:
            kind = {v: k for k, v in SOURCE_TAGS.items()}[part]
            current = [t for t in current if isinstance(t, type) and kind in getattr(t, "model_fields", {})]
            continue
        following: list[Any] = []
        for candidate in current:
            if isinstance(part, int):
                if typing.get_origin(candidate) in (list, tuple):
                    following += _unwrap(typing.get_args(candidate)[0])
            elif isinstance(candidate, type) and issubclass(candidate, BaseModel) and part in candidate.model_fields:
                following += _unwrap(candidate.model_fields[part].annotation)
        current = following
    models = [c for c in current if isinstance(c, type) and issubclass(c, BaseModel)]
    return list(models[0].model_fields) if len(models) == 1 else []


def _semantic_problems(recipe: Recipe) -> list[tuple[Loc, str]]:
    problems: list[tuple[Loc, str]] = []
    problems += _data_problems(recipe)
    problems += _patch_problems(recipe)
    train = recipe.train
    if (train.max_steps is None) == (train.token_budget is None):
        problems.append((("train", "max_steps"), "give exactly one of train.max_steps and train.token_budget"))
    if train.global_batch_size is not None and "grad_accum" in train.model_fields_set and train.grad_accum != 1:
        problems.append((("train", "grad_accum"), "give train.grad_accum or train.global_batch_size, not both"))
    if train.global_batch_size is not None and train.global_batch_size % train.batch_size:
        problems.append((("train", "global_batch_size"), f"must be a multiple of train.batch_size={train.batch_size}"))
    if train.what == "new" and not recipe.patches:
        problems.append((("train", "what"), "'new' trains only the parameters patches create, but `patches` is empty"))
    if train.eval_steps is not None and recipe.data.held_out_fraction == 0:
        problems.append((("train", "eval_steps"), "needs data.held_out_fraction > 0 (nothing to evaluate on)"))
    if recipe.optim.min_lr > recipe.optim.lr:
        problems.append((("optim", "min_lr"), f"min_lr={recipe.optim.min_lr} is above lr={recipe.optim.lr}"))
    problems += _branch_problems(recipe)
    problems += _optimizer_problems(recipe)
    problems += _trainer_args_problems(recipe)
    problems += _named_function_problems(recipe)
    problems += _distill_problems(recipe)
    for key, scale in recipe.optim.lr_scale.items():
        if not key or not scale > 0 or scale == float("inf"):
            problems.append((("optim", "lr_scale", key), "needs a non-empty name and a finite multiplier > 0"))
    from .distributed import sharding_problems

    problems += sharding_problems(recipe)
    return problems


def _branch_problems(recipe: Recipe) -> list[tuple[Loc, str]]:
    """`train.branch_budgets`: smaller budgets of a `wsd` run given by `token_budget`, each with a stable phase of at
    least one step to branch from."""
    budgets, train = recipe.train.branch_budgets, recipe.train
    if not budgets:
        return []
    where = ("train", "branch_budgets")
    if recipe.optim.schedule != "wsd":
        return [(where, f"decay branches need optim.schedule: wsd (it is {recipe.optim.schedule!r})")]
    if train.token_budget is None:
        return [(where, "decay branches are token budgets: give train.token_budget instead of train.max_steps")]
    problems: list[tuple[Loc, str]] = []
    if len(set(budgets)) != len(budgets):
        problems.append((where, f"{budgets} lists a budget twice"))
    for i, budget in enumerate(budgets):
        if not 0 < budget < train.token_budget:
            problems.append(((*where, i), f"{budget} must be > 0 and below train.token_budget={train.token_budget}"))
    return problems


def _data_problems(recipe: Recipe) -> list[tuple[Loc, str]]:
    from ..assets.corpora import corpus_names

    problems: list[tuple[Loc, str]] = []
    for index, source in enumerate(recipe.data.sources):
        loc: Loc = ("data", "sources", index)
        if isinstance(source, CorpusSource) and source.corpus not in corpus_names():
            close = difflib.get_close_matches(source.corpus, corpus_names(), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(
                (loc + ("corpus",), f"unknown corpus {source.corpus!r}; {hint}known: {', '.join(corpus_names())}")
            )
        if isinstance(source, FilesSource):
            for file_index, file in enumerate(source.files):
                resolved = Path(file) if Path(file).is_absolute() else recipe.base_dir / file
                if not resolved.is_file():
                    problems.append((loc + ("files", file_index), f"data file {str(resolved)!r} does not exist"))
    return problems


def _patch_problems(recipe: Recipe) -> list[tuple[Loc, str]]:
    if not recipe.patches:
        return []
    try:
        importlib.import_module("hf_attn_zoo.patches")
        from ..layers import resolve_layers
        from ..options import check_bounds
        from ..registry import PATCHES
    except ImportError:
        return []
    problems: list[tuple[Loc, str]] = []
    for index, spec in enumerate(recipe.patches):
        loc: Loc = ("patches", index)
        try:
            if not resolve_layers(spec.layers, 1024):
                problems.append((loc + ("layers",), f"layers={spec.layers!r} selects no layer"))
        except ValueError as exc:
            problems.append((loc + ("layers",), str(exc)))
        patch_cls = PATCHES.get(spec.method)
        if patch_cls is None:
            close = difflib.get_close_matches(spec.method, list(PATCHES), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            known = ", ".join(sorted(PATCHES))
            problems.append((loc + ("method",), f"unknown method {spec.method!r}; {hint}known: {known}"))
            continue
        known = [f.name for f in dataclasses.fields(patch_cls.config_class)]
        options = spec.options
        for option in options:
            if option not in known:
                close = difflib.get_close_matches(option, known, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                problems.append((loc + (option,), f"unknown {spec.method} option; {hint}known: {', '.join(known)}"))
        try:  # types and the bounds that need no model; the rest is checked when the model is patched
            config = patch_cls.config_class.from_options(spec.method, {k: v for k, v in options.items() if k in known})
            check_bounds(spec.method, config)
        except InvalidOptionError as exc:
            problems.append((loc + ((exc.option,) if exc.option else ()), str(exc)))
    return problems


# `optim` keys only Muon reads: set away from their defaults with another optimizer, they would be ignored
_MUON_KEYS = ("adamw_lr", "momentum", "ns_steps", "muon_adjust_lr")


def _optimizer_problems(recipe: Recipe) -> list[tuple[Loc, str]]:
    from transformers.training_args import OptimizerNames

    optim = recipe.optim
    if optim.name == "muon":
        strategy = recipe.train.distributed.strategy
        if strategy == "ddp":
            return []
        return [
            (
                ("optim", "name"),
                f"muon orthogonalises whole weight matrices, but train.distributed.strategy={strategy} gives each "
                "process a shard of them; use strategy ddp",
            )
        ]
    problems: list[tuple[Loc, str]] = [
        (("optim", key), f"only optim.name: muon uses it, but the optimizer is {optim.name!r}")
        for key in _MUON_KEYS
        if getattr(optim, key) != type(optim).model_fields[key].default
    ]
    names = [o.value for o in OptimizerNames]
    if optim.name in names:
        return problems
    names.append("muon")
    close = difflib.get_close_matches(optim.name, names, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "see transformers.training_args.OptimizerNames"
    return [*problems, (("optim", "name"), f"unknown optimizer {optim.name!r}; {hint}")]


# TrainingArguments fields that recipe keys already set: one place to write each setting.
_OWNED_ARGS = {
    "output_dir": "output_dir",
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum / train.global_batch_size",
    "max_steps": "train.max_steps / train.token_budget",
    "learning_rate": "optim.lr",
    "lr_scheduler_type": "optim.schedule",
    "warmup_steps": "optim.warmup_steps",
    "optim": "optim.name",
    "weight_decay": "optim.weight_decay",
    "adam_beta1": "optim.betas",
    "adam_beta2": "optim.betas",
    "adam_epsilon": "optim.eps",
    "max_grad_norm": "optim.max_grad_norm",
    "bf16": "train.mixed_precision",
    "fp16": "train.mixed_precision",
    "save_steps": "train.save_steps",
    "save_total_limit": "train.save_total_limit",
    "logging_steps": "train.logging_steps",
    "eval_steps": "train.eval_steps",
    "seed": "seed",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "activation_checkpointing": "train.gradient_checkpointing",
    "resume_from_checkpoint": "train.resume",
    "fsdp": "train.distributed.strategy",
    "fsdp_config": "train.distributed",
    "deepspeed": "train.distributed.strategy (and deepspeed_config)",
}


def _trainer_args_problems(recipe: Recipe) -> list[tuple[Loc, str]]:
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    problems: list[tuple[Loc, str]] = []
    for key in recipe.train.trainer_args:
        loc: Loc = ("train", "trainer_args", key)
        if key in _OWNED_ARGS:
            problems.append((loc, f"set it with `{_OWNED_ARGS[key]}` instead"))
        elif key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append((loc, f"not a transformers.TrainingArguments field{hint}"))
    return problems


def _named_function_problems(recipe: Recipe) -> list[tuple[Loc, str]]:
    """`init` hooks and `callbacks` that name no registered or importable function."""
    from .callback_hooks import get_callback_factory
    from .init_hooks import get_init_hook

    problems: list[tuple[Loc, str]] = []
    for section, steps, lookup in (
        ("init", recipe.init, get_init_hook),
        ("callbacks", recipe.callbacks, get_callback_factory),
    ):
        for index, step in enumerate(steps):
            try:
                lookup(step.name)
            except RecipeError as exc:
                problems.append(((section, index, "name"), str(exc)))
    return problems


def _distill_problems(recipe: Recipe) -> list[tuple[Loc, str]]:
    if recipe.distill is None or recipe.train.distributed.strategy == "ddp":
        return []
    return [
        (
            ("distill",),
            f"self-distillation keeps a full teacher copy per process, which train.distributed.strategy="
            f"{recipe.train.distributed.strategy} is meant to avoid; use strategy ddp, or drop the section",
        )
    ]
