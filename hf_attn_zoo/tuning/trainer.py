"""The Trainer side of a tuning run: its `TrainingArguments`, the Trainer subclass and the callbacks.

`ZooTrainer` installs the recipe's learning-rate schedule (`lr_schedule.py`), its optimizer (`optim.name: muon`:
`muon.py`'s Muon + AdamW) and per-parameter learning-rate multipliers (`optim.lr_scale`), adds the
self-distillation loss (`distill:`, `distill.py`) and logs the auxiliary losses apart from the LM loss;
`Throughput` measures train tokens per second; `CheckpointLayout` marks each checkpoint complete, with the
layout (processes, sharding) it was written in.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..errors import RecipeError
from . import distributed, lr_schedule
from .distill import distillation_loss, teacher_logits
from .muon import MuonWithAdamW, muon_param_groups
from .recipe import Recipe

__all__ = [
    "CheckpointLayout",
    "Throughput",
    "ZooTrainer",
    "grad_accum_steps",
    "scale_learning_rates",
    "training_args",
]


def grad_accum_steps(recipe: Recipe, world_size: int) -> int:
    """Micro-steps per optimizer step: `train.grad_accum`, or what `train.global_batch_size` asks of this many
    processes."""
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


def training_args(recipe: Recipe, output_dir: Path, max_steps: int, grad_accum: int) -> dict[str, Any]:
    """The `TrainingArguments` of a run, from the recipe (`train.trainer_args` last, `train.distributed` before)."""
    train, optim = recipe.train, recipe.optim
    has_eval = recipe.data.held_out_fraction > 0
    args: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=grad_accum,
        max_steps=max_steps,
        learning_rate=optim.lr,
        # the schedule (warm-up included) is `lr_schedule.lr_scheduler`, installed by `ZooTrainer.create_scheduler`
        lr_scheduler_type="constant",
        # Muon is not a transformers optimizer: `ZooTrainer.create_optimizer` builds it, the name only has to be valid
        optim="adamw_torch" if optim.name == "muon" else optim.name,
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
        **checkpointing_args(train.gradient_checkpointing),
        # packed blocks all have seq_len tokens; dropping a ragged last batch keeps every step the same size
        dataloader_drop_last=True,
        disable_tqdm=False,
    )
    args.update(distributed.distributed_training_args(recipe))
    args.update(train.trainer_args)
    return args


def checkpointing_args(enabled: bool) -> dict[str, Any]:
    """The `TrainingArguments` of activation checkpointing, by the names this transformers has: it renamed
    `gradient_checkpointing[_kwargs]` to `activation_checkpointing[_kwargs]` after 5.17 (the old names are deprecated
    aliases since)."""
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    # non-reentrant checkpointing needs no input grads, so it works with frozen embeddings (what: new / lora)
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


# logged next to `loss` (means over the micro-steps since the last log, over every process)
_AUX_LOGS = ("aux_loss", "moe_load_balance_loss", "moe_z_loss", "distill_loss")


class ZooTrainer(Trainer):
    """Trainer with the recipe's LR schedule and multipliers, self-distillation, and separate logging of the
    auxiliary losses.

    Logs `aux_loss` (the weighted sum of the patches' losses and the MoE router losses), with router losses their
    unweighted values `moe_load_balance_loss` and `moe_z_loss`, with a teacher `distill_loss` (`T^2 KL`, unweighted),
    and `lm_loss` (`loss` minus the weighted auxiliary and distillation terms).
    """

    def __init__(
        self,
        *args: Any,
        recipe: Recipe,
        router_losses: Any = None,
        teacher: torch.nn.Module | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.recipe = recipe
        self.router_losses = router_losses
        self.teacher = teacher.to(self.args.device) if teacher is not None else None
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
            self.lr_scheduler = lr_schedule.lr_scheduler(
                optimizer or self.optimizer,
                optim.schedule,
                optim.warmup_steps,
                num_training_steps,
                optim.lr,
                optim.min_lr,
                optim.decay_fraction,
            )
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        # the checkpoint's optimizer holds the learning rate its own run scheduled for the next step; this run's
        # schedule may differ there (a `wsd` decay branch), so set this run's rate for that step
        scheduler = self.lr_scheduler
        if checkpoint is not None and isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            rates = [base * rule(scheduler.last_epoch) for base, rule in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
            for group, rate in zip(self.optimizer.param_groups, rates, strict=True):
                group["lr"] = rate
            scheduler._last_lr = rates

    def create_optimizer(self, model=None):
        optim = self.recipe.optim
        if optim.name == "muon" and self.optimizer is None:
            target = self.model if model is None else model
            groups = muon_param_groups(
                target,
                lr=optim.lr,
                adamw_lr=optim.adamw_lr or optim.lr,
                weight_decay=optim.weight_decay,
                decay_names=self.get_decay_parameter_names(target),
            )
            self.optimizer = MuonWithAdamW(
                groups,
                lr=optim.lr,
                weight_decay=optim.weight_decay,
                momentum=optim.momentum,
                ns_steps=optim.ns_steps,
                adjust_lr=optim.muon_adjust_lr,
                betas=optim.betas,
                eps=optim.eps,
            )
        optimizer = super().create_optimizer(model)
        if optim.lr_scale:
            scale_learning_rates(optimizer, self.model if model is None else model, self.recipe)
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.teacher is not None and model.training:
            distill = self.recipe.distill
            kl = distillation_loss(
                outputs.logits, teacher_logits(self.teacher, inputs), distill.temperature, inputs.get("attention_mask")
            )
            loss = loss + distill.weight * kl
            self._accumulate("distill_loss", kl)
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
            sums = [
                torch.as_tensor(self._aux_sums[k], dtype=torch.float64, device=device).reshape(1) for k in _AUX_LOGS
            ]
            counts = torch.tensor([float(self._aux_counts[k]) for k in _AUX_LOGS], dtype=torch.float64, device=device)
            local = torch.cat([*sums, counts])
            total = self.accelerator.reduce(local, reduction="sum") if self.args.world_size > 1 else local
            size = len(_AUX_LOGS)
            for index, key in enumerate(_AUX_LOGS):
                if total[size + index] > 0:
                    logs[key] = float(total[index] / total[size + index])
            if "aux_loss" in logs or "distill_loss" in logs:
                distill = self.recipe.distill
                weighted = distill.weight * logs["distill_loss"] if "distill_loss" in logs and distill else 0.0
                logs["lm_loss"] = logs["loss"] - logs.get("aux_loss", 0.0) - weighted
            self._aux_sums, self._aux_counts = dict.fromkeys(_AUX_LOGS, 0.0), dict.fromkeys(_AUX_LOGS, 0)
        super().log(logs, start_time)


def scale_learning_rates(optimizer: torch.optim.Optimizer, model: torch.nn.Module, recipe: Recipe) -> None:
    """Split the optimizer's parameter groups by `optim.lr_scale` (name substring -> multiplier; the first key that
    matches a parameter's name counts), each new group at its multiple of the group's learning rate. Runs before the
    first step and before the schedule is built, so the schedule scales each group's peak."""
    scales = recipe.optim.lr_scale
    names = {id(p): name for name, p in model.named_parameters()}
    matched: set[str] = set()
    groups = []
    for group in optimizer.param_groups:
        buckets: dict[float, list[torch.nn.Parameter]] = {}
        for param in group["params"]:
            key = next((k for k in scales if k in names.get(id(param), "")), None)
            if key is not None:
                matched.add(key)
            buckets.setdefault(scales[key] if key is not None else 1.0, []).append(param)
        groups += [{**group, "params": params, "lr": group["lr"] * scale} for scale, params in buckets.items()]
    missing = [k for k in scales if k not in matched]
    if missing:
        raise RecipeError(
            f"{recipe.location(('optim', 'lr_scale', missing[0]))}: no trainable parameter's name contains "
            f"{missing[0]!r} (look the names up with `model.named_parameters()`)"
        )
    optimizer.param_groups = groups


class Throughput(TrainerCallback):
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


class CheckpointLayout(TrainerCallback):
    """Marks each checkpoint complete once every process has written its part, with the layout it was written in."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            distributed.write_checkpoint_layout(checkpoint, self.recipe)
