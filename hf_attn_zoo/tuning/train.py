"""Run a continue-tuning recipe with `transformers.Trainer` (so `torchrun` / `accelerate launch` scale it).

`run_recipe` loads the model and tokenizer, applies the recipe's patches, runs its `init` hooks, packs the text into
`seq_len` blocks, picks the trainable parameters (`train.what`), adds the MoE router losses (`moe`), the teacher
(`distill`) and the schedules (`callbacks`), trains with
checkpoints every `train.save_steps`, resumes from the last checkpoint of an interrupted run, and saves the final
(LoRA-merged) model into `output_dir/final`, loadable with `hf_attn_zoo.from_pretrained`, with a model card
(`final/README.md`: the patches, the recipe, steps and tokens, the eval results; `hf_attn_zoo.sharing.model_card`).

This module is the run itself; its pieces live beside it: `model.py` (load, patch, init hooks, trainable parameters,
router losses, the final save), `data.py` (documents, held-out split, packing), `trainer.py` (TrainingArguments, the
Trainer subclass, callbacks), `lr_schedule.py` (the learning-rate schedule) and `run_folder.py` (`TuneResult`,
checkpoints, the rerun policy).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments, default_data_collator, set_seed

from ..sharing.model_card import write_card_or_warn
from . import distributed
from .branches import DecayBranches, run_branches
from .data import build_datasets
from .distill import load_teacher
from .model import (
    apply_patches,
    check_moe,
    install_moe_losses,
    load_model_and_tokenizer,
    recipe_callbacks,
    run_init_hooks,
    save_final,
    select_trainable,
)
from .recipe import Recipe, apply_overrides, load_recipe, validate_recipe
from .run_folder import TuneResult, check_run_dir, last_checkpoint, write_recipe
from .trainer import CheckpointLayout, Throughput, ZooTrainer, grad_accum_steps, training_args

__all__ = [
    "TuneResult",
    "apply_patches",
    "build_datasets",
    "last_checkpoint",
    "load_model_and_tokenizer",
    "prepared_model",
    "run_init_hooks",
    "run_recipe",
]

logger = logging.getLogger(__name__)


def run_recipe(
    recipe_or_path: Recipe | str | Path,
    overrides: Iterable[str] = (),
    callbacks: Sequence[Any] = (),
    overwrite: bool = False,
) -> TuneResult:
    """Continue-tune a model as a recipe says.

    A rerun never redoes or overwrites finished work: a finished run (`result.json` and `final/` in `output_dir`)
    of the same recipe trains nothing and returns the stored result (`already_finished=True`); an interrupted one
    resumes from its last checkpoint. With `train.branch_budgets` (a `wsd` schedule) the decay branches run after
    the run, each a run folder of its own under `output_dir/branches/` (`tuning/branches.py`), in `result.branches`.
    A run folder written by another recipe is refused with a `RecipeError` naming the keys that changed (unless
    `train.allow_recipe_change`), and a non-empty folder that is not a run folder with an `OutputExistsError`. Every
    process of a multi-process run decides from the same files, before any is written.

    Args:
        recipe_or_path (`Recipe | str | Path`):
            A validated `Recipe`, a YAML file, or the name of a shipped recipe (`moh/smollm2_quick`).
        overrides (`Iterable[str]`, *optional*):
            Dotted overrides, e.g. `["train.what=all", "optim.lr=1e-4"]`.
        callbacks (`Sequence[transformers.TrainerCallback]`, *optional*):
            Extra Trainer callbacks.
        overwrite (`bool`, *optional*, defaults to `False`):
            Start over: empty `output_dir` first (only a run folder: one with `recipe.yaml`, `result.json`,
            `final/` or checkpoints; any other non-empty folder is refused even then).

    Returns:
        `TuneResult`: output folder, final loss, loss history and training throughput.

    Raises:
        `RecipeError`: invalid recipe or patch options (with the recipe's file and line), or a run folder written by
            a different recipe.
        `OutputExistsError`: `output_dir` holds something that is not a tuning run.
        `MissingAssetError`: a corpus, dataset or model that is not available offline.
    """
    recipe = _resolve(recipe_or_path, overrides)
    output_dir = recipe.resolved_output_dir()
    world_size = distributed.world_size()
    train = recipe.train
    grad_accum = grad_accum_steps(recipe, world_size)
    tokens_per_step = train.batch_size * grad_accum * world_size * recipe.data.seq_len
    max_steps = train.max_steps or math.ceil(train.token_budget / tokens_per_step)

    # decided before anything is written, so every process sees the same files (process 0 alone empties the folder
    # for `overwrite`, before the first barrier; the others wait there before they look for checkpoints)
    result = check_run_dir(recipe, output_dir, overwrite, clear=_rank() == 0)
    if result is not None:
        logger.info(
            "hf-attn-zoo tune: %s is already finished (same recipe): %d steps, model in %s; nothing to do",
            output_dir,
            result.global_step,
            result.final_dir,
        )
    else:
        result = _train(recipe, output_dir, max_steps, grad_accum, tokens_per_step, callbacks)
    if train.branch_budgets:
        gc.collect()  # the run's model and optimizer are gone before a branch loads its own
        result.branches = run_branches(recipe, lambda branch: run_recipe(branch, callbacks=callbacks))
    return result


def _train(
    recipe: Recipe,
    output_dir: Path,
    max_steps: int,
    grad_accum: int,
    tokens_per_step: int,
    callbacks: Sequence[Any],
) -> TuneResult:
    train = recipe.train
    set_seed(recipe.seed)
    model, tokenizer = load_model_and_tokenizer(recipe)
    use_cache = model.config.use_cache
    apply_patches(model, recipe)
    check_moe(model, recipe)

    args = TrainingArguments(**training_args(recipe, output_dir, max_steps, grad_accum))
    with args.main_process_first(desc="tokenize and pack"):
        train_dataset, eval_dataset = build_datasets(recipe, tokenizer)

    # its layout was checked against this run by `check_run_dir`, before the model was loaded
    resume_from = last_checkpoint(output_dir) if train.resume else None
    if resume_from is None:
        run_init_hooks(model, train_dataset, recipe)
    elif recipe.init:
        logger.info("resuming from %s: skipping the init hooks (the checkpoint holds their result)", resume_from)
    model = select_trainable(model, recipe)
    router_losses = install_moe_losses(model, recipe)
    schedules = recipe_callbacks(model, recipe)
    teacher = load_teacher(recipe) if recipe.distill is not None else None
    if args.process_index == 0:
        write_recipe(recipe, output_dir)

    throughput = Throughput(tokens_per_step)
    branches = [DecayBranches(recipe, tokens_per_step)] if train.branch_budgets else []
    trainer = ZooTrainer(
        recipe=recipe,
        router_losses=router_losses,
        teacher=teacher,
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=default_data_collator,
        processing_class=tokenizer,
        callbacks=[throughput, CheckpointLayout(recipe), *branches, *schedules, *callbacks],
    )
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        eval_loss = None
        if eval_dataset is not None:
            eval_loss = trainer.evaluate()["eval_loss"]
    finally:
        if router_losses is not None:
            router_losses.remove()  # the final model is saved (and evaluated) as a plain model

    final_dir = output_dir / "final"
    final_model = save_final(trainer, tokenizer, final_dir, recipe, use_cache)
    eval_results = None
    if recipe.eval is not None and trainer.is_world_process_zero():
        eval_results = _run_eval(final_model, recipe, output_dir)

    history = trainer.state.log_history
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    result = TuneResult(
        output_dir=output_dir,
        final_dir=final_dir,
        global_step=trainer.state.global_step,
        final_loss=losses[-1][1] if losses else None,
        loss_history=losses,
        aux_loss_history=[(h["step"], h["aux_loss"]) for h in history if "aux_loss" in h],
        eval_loss=eval_loss,
        train_tokens=throughput.tokens,
        train_tokens_per_second=throughput.tokens_per_second,
        resumed_from=str(resume_from) if resume_from else None,
        eval_results=eval_results,
    )
    if trainer.is_world_process_zero():
        (output_dir / "result.json").write_text(result.to_json())
        # the card of final/ (written by save_pretrained of a patched model) now also gets the run: recipe, steps,
        # tokens, eval; a dense run's final/ gets one here
        write_card_or_warn(final_dir, final_model, run_dir=output_dir)
        logger.info(
            "hf-attn-zoo tune: %d steps, final loss %s, %.0f train tokens/s, model in %s",
            result.global_step,
            result.final_loss,
            result.train_tokens_per_second,
            final_dir,
        )
    trainer.accelerator.wait_for_everyone()
    return result


def prepared_model(recipe: Recipe) -> tuple[torch.nn.Module, Any]:
    """The recipe's model as its training would start (seeded as `run_recipe` seeds): loaded, patched, its `init`
    steps run on the training text; with the tokenizer. For evaluating the patched model before any tuning."""
    set_seed(recipe.seed)
    model, tokenizer = load_model_and_tokenizer(recipe)
    apply_patches(model, recipe)
    if recipe.init:
        train_dataset, _ = build_datasets(recipe, tokenizer)
        run_init_hooks(model, train_dataset, recipe)
    return model, tokenizer


def _resolve(recipe_or_path: Recipe | str | Path, overrides: Iterable[str]) -> Recipe:
    overrides = list(overrides)
    if not isinstance(recipe_or_path, Recipe):
        return load_recipe(recipe_or_path, overrides)
    if not overrides:
        return validate_recipe(recipe_or_path)
    data = apply_overrides(recipe_or_path.model_dump(mode="python"), overrides)
    return validate_recipe(data, recipe_or_path._source)


def _rank() -> int:
    """This process's global rank (`RANK`, set by torchrun / accelerate; 0 in a single process)."""
    return int(os.environ.get("RANK", "0"))


def _run_eval(model: torch.nn.Module, recipe: Recipe, output_dir: Path) -> dict[str, Any] | None:
    try:
        from ..eval_harness import evaluate
    except ImportError:
        logger.warning(
            "%s: hf_attn_zoo.eval_harness.evaluate is not available; skipping the eval section",
            recipe.location(("eval",)),
        )
        return None
    results = evaluate(model, recipe.eval.tasks, recipe.eval.limit)
    with contextlib.suppress(TypeError):
        (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2, default=str))
    return results
