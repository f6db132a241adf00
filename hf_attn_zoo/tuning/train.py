"""Run a continue-tuning recipe with `transformers.Trainer` (so `torchrun` / `accelerate launch` scale it).

`run_recipe` loads the model and tokenizer, applies the recipe's patches, runs its `init` hooks, packs the text into
`seq_len` blocks, picks the trainable parameters (`train.what`), adds the MoE router losses (`moe`), trains with
checkpoints every `train.save_steps`, resumes from the last checkpoint of an interrupted run, and saves the final
(LoRA-merged) model into `output_dir/final`, loadable with `hf_attn_zoo.from_pretrained`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator, set_seed

from ..errors import MissingAssetError, OutputExistsError, RecipeError, ZooError
from . import distributed
from .init_hooks import get_init_hook
from .recipe import CorpusSource, FilesSource, HFDatasetSource, LoraSection, Recipe, load_recipe, validate_recipe

__all__ = [
    "TuneResult", "apply_patches", "build_datasets", "last_checkpoint", "load_model_and_tokenizer", "run_init_hooks",
    "run_recipe",
]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
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

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("already_finished")
        data["output_dir"], data["final_dir"] = str(self.output_dir), str(self.final_dir)
        return json.dumps(data, indent=2, default=str)

    @classmethod
    def from_json(cls, text: str) -> TuneResult:
        data = json.loads(text)
        known = {f for f in cls.__dataclass_fields__ if f != "already_finished"}
        data = {k: v for k, v in data.items() if k in known}
        data["output_dir"], data["final_dir"] = Path(data["output_dir"]), Path(data["final_dir"])
        for key in ("loss_history", "aux_loss_history"):
            data[key] = [tuple(item) for item in data.get(key) or []]
        return cls(**data)


def run_recipe(
    recipe_or_path: Recipe | str | Path,
    overrides: Iterable[str] = (),
    callbacks: Sequence[Any] = (),
    overwrite: bool = False,
) -> TuneResult:
    """Continue-tune a model as a recipe says.

    A rerun never redoes or overwrites finished work: a finished run (`result.json` and `final/` in `output_dir`)
    of the same recipe trains nothing and returns the stored result (`already_finished=True`); an interrupted one
    resumes from its last checkpoint. A run folder written by another recipe is refused with a `RecipeError` naming
    the keys that changed (unless `train.allow_recipe_change`), and a non-empty folder that is not a run folder with
    an `OutputExistsError`. Every process of a multi-process run decides from the same files, before any is written.

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
    grad_accum = _grad_accum(recipe, world_size)
    tokens_per_step = train.batch_size * grad_accum * world_size * recipe.data.seq_len
    max_steps = train.max_steps or math.ceil(train.token_budget / tokens_per_step)

    # decided before anything is written, so every process sees the same files (process 0 alone empties the folder
    # for `overwrite`, before the first barrier; the others wait there before they look for checkpoints)
    finished = _check_run_dir(recipe, output_dir, overwrite, clear=_rank() == 0)
    if finished is not None:
        logger.info("hf-attn-zoo tune: %s is already finished (same recipe): %d steps, model in %s; nothing to do",
                    output_dir, finished.global_step, finished.final_dir)
        return finished

    set_seed(recipe.seed)
    model, tokenizer = load_model_and_tokenizer(recipe)
    use_cache = model.config.use_cache
    apply_patches(model, recipe)
    _check_moe(model, recipe)

    args = TrainingArguments(**_training_args(recipe, output_dir, max_steps, grad_accum))
    with args.main_process_first(desc="tokenize and pack"):
        train_dataset, eval_dataset = build_datasets(recipe, tokenizer)

    # its layout was checked against this run by `_check_run_dir`, before the model was loaded
    resume_from = last_checkpoint(output_dir) if train.resume else None
    if resume_from is None:
        run_init_hooks(model, train_dataset, recipe)
    elif recipe.init:
        logger.info("resuming from %s: skipping the init hooks (the checkpoint holds their result)", resume_from)
    model = _select_trainable(model, recipe)
    router_losses = _install_router_losses(model, recipe)
    if args.process_index == 0:
        _write_recipe(recipe, output_dir)

    throughput = _Throughput(tokens_per_step)
    trainer = _ZooTrainer(
        recipe=recipe,
        router_losses=router_losses,
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=default_data_collator,
        processing_class=tokenizer,
        callbacks=[throughput, _CheckpointLayout(recipe), *callbacks],
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
    final_model = _save_final(trainer, tokenizer, final_dir, recipe, use_cache)
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
        logger.info(
            "hf-attn-zoo tune: %d steps, final loss %s, %.0f train tokens/s, model in %s",
            result.global_step, result.final_loss, result.train_tokens_per_second, final_dir,
        )
    trainer.accelerator.wait_for_everyone()
    return result


def _resolve(recipe_or_path: Recipe | str | Path, overrides: Iterable[str]) -> Recipe:
    overrides = list(overrides)
    if not isinstance(recipe_or_path, Recipe):
        return load_recipe(recipe_or_path, overrides)
    if not overrides:
        return validate_recipe(recipe_or_path)
    from .recipe import apply_overrides

    data = apply_overrides(recipe_or_path.model_dump(mode="python"), overrides)
    return validate_recipe(data, recipe_or_path._source)


def load_model_and_tokenizer(recipe: Recipe) -> tuple[torch.nn.Module, Any]:
    """Load the recipe's model (re-applying patches recorded in its config) and its tokenizer."""
    from transformers import AutoTokenizer

    import hf_attn_zoo as zoo

    spec = recipe.model
    path = zoo.assets.resolve_model(spec.path)
    kwargs: dict[str, Any] = {"dtype": _DTYPES[spec.dtype]}
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    if spec.revision:
        kwargs["revision"] = spec.revision
    try:
        model = zoo.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **({"revision": spec.revision} if spec.revision else {}))
    except OSError as exc:
        raise MissingAssetError(
            f"{recipe.location(('model', 'path'))}: cannot load {str(path)!r} ({exc}). Use a local folder, or "
            "download the model once with network access (`huggingface-cli download ...`)."
        ) from None
    return model, tokenizer


def apply_patches(model: torch.nn.Module, recipe: Recipe) -> None:
    import hf_attn_zoo as zoo

    for index, spec in enumerate(recipe.patches):
        try:
            zoo.patch(model, spec.method, layers=spec.layers, **spec.options)
        except ZooError as exc:
            raise RecipeError(f"{recipe.location(('patches', index))}: {exc}") from None


def run_init_hooks(model: torch.nn.Module, train_dataset: Any, recipe: Recipe) -> None:
    for index, step in enumerate(recipe.init):
        hook = get_init_hook(step.name)
        try:
            hook(model, train_dataset, **step.options)
        except (ZooError, TypeError) as exc:
            raise RecipeError(f"{recipe.location(('init', index))}: init hook {step.name!r} failed: {exc}") from None


def _check_moe(model: torch.nn.Module, recipe: Recipe) -> None:
    """A `moe` section (or `train.what: moe`) needs MoE layers: say so before the data is tokenized."""
    from ..moe_losses import moe_layers

    wanted = [loc for loc, on in ((("moe",), recipe.moe is not None), (("train", "what"), recipe.train.what == "moe"))
              if on]
    if not wanted:
        return
    try:
        layers = moe_layers(model)
    except ZooError as exc:
        raise RecipeError(f"{recipe.location(wanted[0])}: {exc}") from None
    if not layers:
        raise RecipeError(
            f"{recipe.location(wanted[0])}: the model ({model.config.model_type}, after the patches) has no MoE layer, "
            "so it has no routers to train or to add router losses to. Start from a MoE model (Mixtral, Qwen2-MoE, "
            "Qwen3-MoE, or a dense model upcycled with `hf-attn-zoo upcycle`), or, for a dense baseline, drop the "
            "`moe:` section (on the command line: `moe=null`) and use `train.what: all`, `lora` or `new`."
        )


def _install_router_losses(model: torch.nn.Module, recipe: Recipe) -> Any:
    if recipe.moe is None:
        return None
    from ..families.spec import resolve_family
    from ..moe_losses import install_router_losses
    from ..wrappers import inner_model

    try:
        handle = install_router_losses(model, recipe.moe.load_balance_weight, recipe.moe.z_loss_weight)
    except ZooError as exc:
        raise RecipeError(f"{recipe.location(('moe',))}: {exc}") from None
    inner = inner_model(model)
    family = resolve_family(inner.config)
    routers = [family.moe_router(inner, i) for i in handle.layers]
    if not any(p.requires_grad for router in routers for p in router.parameters()):
        logger.warning(
            "%s: the routers are frozen under train.what=%s, so the router losses train nothing of theirs; use "
            "`what: moe`, `all` or `lora` to train the routers", recipe.location(("moe",)), recipe.train.what,
        )
    return handle


def _select_trainable(model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    """`train.what`: `all`, `new` (patch-created parameters), `moe` (the MoE blocks + new) or `lora` (peft)."""
    import hf_attn_zoo as zoo

    from ..families.spec import resolve_family

    what = recipe.train.what
    if what == "all":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    try:
        family = resolve_family(model.config)
    except ZooError:
        family = None  # a model without a family adapter (no patches): plain LoRA / `new` still apply
    moe_layers = family.moe_layers(model) if family is not None else []
    if what == "moe":
        # every parameter of the sparse MoE blocks (router, experts, shared expert), and those the patches created
        chosen = {id(p) for i in moe_layers for p in family.mlp_module(model, i).parameters()}
        chosen |= {id(p) for p in zoo.new_parameters(model).values()}
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) in chosen)
        return model
    if what == "new":
        new = zoo.new_parameters(model)
        if not new:
            raise RecipeError(
                f"{recipe.location(('train', 'what'))}: the patches created no parameters (training-free settings, "
                "e.g. moh with router qnorm/onorm), so `what: new` has nothing to train; use `all` or `lora`"
            )
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for parameter in new.values():
            parameter.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lora = recipe.train.lora or LoraSection()
    # the patches' new modules, and a MoE model's routers, are trained fully (and saved) next to the adapters; the
    # router goes by `mlp.gate` (peft matches name suffixes: a bare `gate` would also take `shared_expert_gate`)
    to_save = zoo.new_module_names(model)
    if moe_layers:
        to_save.append(f"{family.mlp.module}.{family.mlp.router}")
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        target_parameters=list(lora.target_parameters) or None,
        modules_to_save=sorted(set(to_save)) or None,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise RecipeError(f"{recipe.location(('train', 'lora'))}: {exc}") from None


def _grad_accum(recipe: Recipe, world_size: int) -> int:
    train = recipe.train
    if train.global_batch_size is None:
        return train.grad_accum
    per_step = train.batch_size * world_size
    if train.global_batch_size % per_step:
        raise RecipeError(
            f"{recipe.location(('train', 'global_batch_size'))}: {train.global_batch_size} blocks is not a multiple "
            f"of batch_size {train.batch_size} x {world_size} process(es)"
        )
    return train.global_batch_size // per_step


def _training_args(recipe: Recipe, output_dir: Path, max_steps: int, grad_accum: int) -> dict[str, Any]:
    train, optim = recipe.train, recipe.optim
    has_eval = recipe.data.held_out_fraction > 0
    args: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=grad_accum,
        max_steps=max_steps,
        learning_rate=optim.lr,
        # the schedule (warm-up included) is `_LRSchedule`, installed by `_ZooTrainer.create_scheduler`
        lr_scheduler_type="constant",
        optim=optim.name,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.betas[0],
        adam_beta2=optim.betas[1],
        adam_epsilon=optim.eps,
        max_grad_norm=optim.max_grad_norm or 0.0,
        bf16=train.mixed_precision == "bf16",
        fp16=train.mixed_precision == "fp16",
        logging_steps=train.logging_steps,
        save_strategy="steps" if train.save_steps else "no",
        save_steps=train.save_steps or 500,
        save_total_limit=train.save_total_limit,
        eval_strategy="steps" if has_eval and train.eval_steps else "no",
        eval_steps=train.eval_steps,
        seed=recipe.seed,
        data_seed=recipe.seed,
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        activation_checkpointing=train.gradient_checkpointing,
        # non-reentrant checkpointing needs no input grads, so it works with frozen embeddings (what: new / lora)
        activation_checkpointing_kwargs={"use_reentrant": False} if train.gradient_checkpointing else None,
        # packed blocks all have seq_len tokens; dropping a ragged last batch keeps every step the same size
        dataloader_drop_last=True,
        disable_tqdm=False,
    )
    args.update(distributed.distributed_training_args(recipe))
    args.update(train.trainer_args)
    return args


class _LRSchedule:
    """Linear warm-up to the peak, then cosine / linear decay to `min_lr`, or constant (a picklable LambdaLR rule)."""

    def __init__(self, kind: str, warmup_steps: int, total_steps: int, lr: float, min_lr: float):
        self.kind, self.warmup_steps, self.total_steps = kind, warmup_steps, total_steps
        self.floor = min_lr / lr

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1.0 - progress
        return self.floor + (1.0 - self.floor) * decay


# logged next to `loss` (means over the micro-steps since the last log, over every process)
_AUX_LOGS = ("aux_loss", "moe_load_balance_loss", "moe_z_loss")


class _ZooTrainer(Trainer):
    """Trainer with the recipe's LR schedule and separate logging of the auxiliary losses.

    Logs `aux_loss` (the weighted sum of the patches' losses and the MoE router losses) and `lm_loss` (`loss` minus
    it), and with router losses their unweighted values `moe_load_balance_loss` and `moe_z_loss`.
    """

    def __init__(self, *args: Any, recipe: Recipe, router_losses: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.recipe = recipe
        self.router_losses = router_losses
        # `outputs.loss` is a per-block mean that already includes the patches' auxiliary losses (core
        # contract). With loss kwargs the Trainer would normalise by token counts and multiply by the number of
        # processes, which also scales the aux loss by that factor; every packed block has the same number of
        # tokens, so a plain per-batch mean gives the same LM loss and the intended aux weight.
        self.model_accepts_loss_kwargs = False
        self._aux_sums: dict[str, torch.Tensor | float] = dict.fromkeys(_AUX_LOGS, 0.0)
        self._aux_counts: dict[str, int] = dict.fromkeys(_AUX_LOGS, 0)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        distributed.enable_fsdp_without_gpus(self)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is None:
            optim = self.recipe.optim
            rule = _LRSchedule(optim.schedule, optim.warmup_steps, num_training_steps, optim.lr, optim.min_lr)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, rule)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            aux = outputs.get("aux_loss") if hasattr(outputs, "get") else None
            self._accumulate("aux_loss", aux)
            metrics = self.router_losses.pop_metrics() if self.router_losses is not None else {}
            self._accumulate("moe_load_balance_loss", metrics.get("load_balance"))
            self._accumulate("moe_z_loss", metrics.get("z"))
        return (loss, outputs) if return_outputs else loss

    def _accumulate(self, key: str, value: torch.Tensor | None) -> None:
        if value is not None:
            # kept as a tensor: converting to float here would synchronise the device every micro-step
            self._aux_sums[key] = self._aux_sums[key] + value.detach().double()
            self._aux_counts[key] += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # training logs are written on every process at the same step, so the reduction below is collective
        if "loss" in logs and "eval_loss" not in logs:
            device = self.args.device
            sums = [torch.as_tensor(self._aux_sums[k], dtype=torch.float64, device=device).reshape(1)
                    for k in _AUX_LOGS]
            counts = torch.tensor([float(self._aux_counts[k]) for k in _AUX_LOGS], dtype=torch.float64, device=device)
            local = torch.cat([*sums, counts])
            total = self.accelerator.reduce(local, reduction="sum") if self.args.world_size > 1 else local
            size = len(_AUX_LOGS)
            for index, key in enumerate(_AUX_LOGS):
                if total[size + index] > 0:
                    logs[key] = float(total[index] / total[size + index])
            if "aux_loss" in logs:
                logs["lm_loss"] = logs["loss"] - logs["aux_loss"]
            self._aux_sums, self._aux_counts = dict.fromkeys(_AUX_LOGS, 0.0), dict.fromkeys(_AUX_LOGS, 0)
        super().log(logs, start_time)


class _Throughput(TrainerCallback):
    """Train tokens per second over the optimizer steps of this invocation (set-up and final save excluded)."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.start: float | None = None
        self.first_step = 0
        self.steps = 0
        self.seconds = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if self.start is None:
            self.start, self.first_step = time.perf_counter(), state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.start is not None:
            self.steps = state.global_step - self.first_step
            self.seconds = time.perf_counter() - self.start

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class _CheckpointLayout(TrainerCallback):
    """Marks each checkpoint complete once every process has written its part, with the layout it was written in."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            distributed.write_checkpoint_layout(checkpoint, self.recipe)


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


def _rank() -> int:
    """This process's global rank (`RANK`, set by torchrun / accelerate; 0 in a single process)."""
    return int(os.environ.get("RANK", "0"))


# Keys whose change does not change what a run trains, so a rerun with them changed still counts as the same run:
# where the run folder is (`output_dir`, `name`), how it is described, whether to resume and whether a change is
# allowed, how often it logs and checkpoints and how many checkpoints it keeps, and the evaluation after training
# (`eval`, and `train.eval_steps`, which only measures). `init` is added when resuming an unfinished run from a
# checkpoint: the init hooks do not run then (the checkpoint holds their result).
HARMLESS_RECIPE_KEYS = ("name", "description", "output_dir", "train.resume", "train.allow_recipe_change",
                        "train.logging_steps", "train.save_steps", "train.save_total_limit", "train.eval_steps",
                        "eval")
_RUN_FILES = ("recipe.yaml", "result.json", "final", "final.partial")


def _is_run_dir(folder: Path) -> bool:
    return any((folder / name).exists() for name in _RUN_FILES) or any(
        _CHECKPOINT.match(child.name) for child in folder.iterdir())


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


def _check_run_dir(recipe: Recipe, output_dir: Path, overwrite: bool, clear: bool) -> TuneResult | None:
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
            "or empty it yourself.")
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
            f"start over: {OVERWRITE_HINT}.")
    if changed:
        logger.warning("hf-attn-zoo tune: continuing %s with a changed recipe (train.allow_recipe_change): %s",
                       output_dir, ", ".join(changed))
        return None
    if finished:
        result = TuneResult.from_json((output_dir / "result.json").read_text())
        result.already_finished = True
        return result
    return None


def _write_recipe(recipe: Recipe, output_dir: Path) -> None:
    """`output_dir/recipe.yaml`: the recipe of the run (checked against the folder's earlier one by `_check_run_dir`
    before training started)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "recipe.yaml").write_text(recipe.to_yaml())


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): data}


def _save_final(
    trainer: Any, tokenizer: Any, final_dir: Path, recipe: Recipe, use_cache: bool
) -> torch.nn.Module | None:
    trainer.accelerator.wait_for_everyone()
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    state_dict = distributed.full_state_dict(trainer) if sharded else None  # a collective: every process
    if not trainer.is_world_process_zero():
        return None
    model = _unsharded(recipe, state_dict) if sharded else trainer.accelerator.unwrap_model(trainer.model)
    model.config.use_cache = use_cache  # the Trainer turns the cache off for training
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    # written beside, then moved into place: a crash mid-save never leaves a `final/` that looks finished
    partial = final_dir.with_name(f"{final_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    partial.rename(final_dir)
    return model


def _unsharded(recipe: Recipe, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The trained model in one process: the recipe's model rebuilt as it was trained (patches, PEFT wrappers),
    then the gathered state dict loaded into it, every key accounted for."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # training is over: without this, a ZeRO-3 run's `from_pretrained` partitions the copy, a collective that
    # process 0 would enter alone
    unset_hf_deepspeed_config()
    model, _ = load_model_and_tokenizer(recipe)
    apply_patches(model, recipe)
    model = _select_trainable(model, recipe)
    model.load_state_dict(state_dict, strict=True)
    return model


def _run_eval(model: torch.nn.Module, recipe: Recipe, output_dir: Path) -> dict[str, Any] | None:
    try:
        from ..eval_harness import evaluate
    except ImportError:
        logger.warning("%s: hf_attn_zoo.eval_harness.evaluate is not available; skipping the eval section",
                       recipe.location(("eval",)))
        return None
    results = evaluate(model, recipe.eval.tasks, recipe.eval.limit)
    with contextlib.suppress(TypeError):
        (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2, default=str))
    return results


def build_datasets(recipe: Recipe, tokenizer: Any) -> tuple[Any, Any | None]:
    """Tokenize the recipe's documents and pack them into `seq_len` blocks (`input_ids` and `labels` columns).

    Documents are split into train / held-out at the document level (`data.held_out_fraction`, chosen by a hash of
    each document's text, so the split does not depend on the seed or the source order), each document ends with
    the EOS token, and the token stream is cut into full blocks (per chunk of 1,000 documents: the tail of each
    chunk that does not fill a block is dropped). Hub datasets stay on disk (Arrow) throughout.

    Returns:
        `tuple[datasets.Dataset, datasets.Dataset | None]`: the training blocks, and the held-out blocks.
    """
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        documents = _documents(recipe)
        fraction = recipe.data.held_out_fraction
        held_out = None
        if fraction > 0:
            if len(documents) < 2:
                raise RecipeError(
                    f"{recipe.location(('data', 'held_out_fraction'))}: the data has {len(documents)} document(s); "
                    "a document-level held-out split needs at least 2"
                )
            keys = documents.map(lambda b: {"_key": [_doc_key(t) for t in b["text"]]}, batched=True)["_key"]
            order = sorted(range(len(keys)), key=keys.__getitem__)
            chosen = set(order[: max(1, round(fraction * len(keys)))])
            held_out = documents.select(sorted(chosen))
            documents = documents.select([i for i in range(len(keys)) if i not in chosen])
        train = _pack(documents, tokenizer, recipe.data.seq_len, recipe.data.num_proc)
        if len(train) == 0:
            raise RecipeError(
                f"{recipe.location(('data', 'seq_len'))}: the training text is shorter than one block of "
                f"{recipe.data.seq_len} tokens"
            )
        evaluation = (
            _pack(held_out, tokenizer, recipe.data.seq_len, recipe.data.num_proc) if held_out is not None else None
        )
    finally:
        if bars:
            datasets.enable_progress_bars()
    return train, (evaluation if evaluation is not None and len(evaluation) > 0 else None)


def _doc_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="replace")).hexdigest()


_PACK_CHUNK = 1000


def _pack(documents: Any, tokenizer: Any, seq_len: int, num_proc: int | None):
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [row + eos for row in ids]}

    def pack(batch: dict[str, list]) -> dict[str, list]:
        stream = [token for row in batch["input_ids"] for token in row]
        blocks = [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    dataset = documents.map(tokenize, batched=True, remove_columns=documents.column_names, num_proc=num_proc)
    dataset = dataset.map(pack, batched=True, batch_size=_PACK_CHUNK, num_proc=num_proc)
    return dataset.with_format("torch")


def _documents(recipe: Recipe):
    """Every source as one `datasets.Dataset` with a single `text` column (empty documents dropped)."""
    import datasets

    from ..assets.corpora import corpus_texts

    parts = []
    for index, source in enumerate(recipe.data.sources):
        loc = ("data", "sources", index)
        if isinstance(source, CorpusSource):
            try:
                texts = corpus_texts(source.corpus)
            except MissingAssetError as exc:
                raise MissingAssetError(f"{recipe.location(loc + ('corpus',))}: {exc}") from None
            parts.append(datasets.Dataset.from_dict({"text": texts[: source.max_docs]}))
        elif isinstance(source, FilesSource):
            parts.append(datasets.Dataset.from_dict({"text": _read_files(source, recipe, loc)}))
        elif isinstance(source, HFDatasetSource):
            parts.append(_read_hf_dataset(source, recipe, loc))
    documents = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return documents.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)


def _read_files(source: FilesSource, recipe: Recipe, loc: tuple) -> list[str]:
    documents = []
    for file_index, name in enumerate(source.files):
        path = Path(name) if Path(name).is_absolute() else recipe.base_dir / name
        if not path.is_file():
            raise RecipeError(f"{recipe.location(loc + ('files', file_index))}: data file {str(path)!r} does not exist")
        text = path.read_text(encoding="utf-8", errors="replace")
        if source.format == "text":
            documents.append(text)
            continue
        for line_number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecipeError(f"{path}:{line_number}: invalid JSON line ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(source.text_field), str):
                raise RecipeError(
                    f"{path}:{line_number}: no string field {source.text_field!r} "
                    f"(set it with {'.'.join(map(str, loc))}.text_field)"
                )
            documents.append(row[source.text_field])
    return documents


def _read_hf_dataset(source: HFDatasetSource, recipe: Recipe, loc: tuple) -> list[str]:
    import datasets

    try:
        dataset = datasets.load_dataset(source.hf_dataset, source.config, split=source.split)
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as exc:
        raise MissingAssetError(
            f"{recipe.location(loc + ('hf_dataset',))}: cannot load dataset {source.hf_dataset!r} "
            f"(config {source.config!r}, split {source.split!r}) offline: {exc}. Load it once with network access "
            "so that it is cached."
        ) from None
    if source.text_field not in dataset.column_names:
        raise RecipeError(
            f"{recipe.location(loc + ('text_field',))}: dataset {source.hf_dataset!r} has no column "
            f"{source.text_field!r}; columns: {', '.join(dataset.column_names)}"
        )
    if source.max_docs is not None:
        dataset = dataset.select(range(min(source.max_docs, len(dataset))))
    dataset = dataset.select_columns([source.text_field])
    return dataset.rename_column(source.text_field, "text") if source.text_field != "text" else dataset
