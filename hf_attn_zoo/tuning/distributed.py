"""Multi-process training through the engines that exist: DDP, FSDP2 and DeepSpeed, via the Trainer and accelerate.

The recipe's `train.distributed` section picks the strategy; this module turns it into `TrainingArguments`, lets
FSDP2 run on CPU (gloo) where accelerate would silently fall back to DDP, stamps every checkpoint with the layout
it was written in (so a resume with another process count is refused by name, not mis-loaded), gathers the sharded
model for the final save, and starts the processes (`hf-attn-zoo tune --nproc N`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import RecipeError
from .recipe import DistributedSection, Recipe

__all__ = [
    "CHECKPOINT_LAYOUT",
    "SHIPPED_CONFIGS",
    "check_resume",
    "deepspeed_config_path",
    "deepspeed_config_problems",
    "distributed_training_args",
    "enable_fsdp_without_gpus",
    "finish",
    "full_state_dict",
    "launch",
    "sharding_problems",
    "world_size",
]

logger = logging.getLogger(__name__)

SHIPPED_CONFIGS = Path(__file__).parent / "configs"
# written into every checkpoint once all of it is on disk: how it was sharded, and by how many processes
CHECKPOINT_LAYOUT = "zoo_checkpoint.json"


def world_size() -> int:
    """Processes of this run (torchrun / accelerate set `WORLD_SIZE`; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def deepspeed_config_path(section: DistributedSection, base_dir: Path) -> Path:
    if section.deepspeed_config is None:
        return SHIPPED_CONFIGS / f"deepspeed_zero{section.zero_stage}.json"
    path = Path(section.deepspeed_config)
    return path if path.is_absolute() else base_dir / path


# keys the Trainer fills from its own arguments when they say "auto" (transformers.integrations.deepspeed)
_DEEPSPEED_AUTO = {
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "train_batch_size",
}


def deepspeed_config_problems(path: Path, zero_stage: int) -> list[str]:
    """What is wrong with a DeepSpeed JSON for a recipe run (empty when it is usable).

    The recipe owns the batch sizes, gradient accumulation, clipping, optimizer and precision, so the config must
    leave them to the Trainer (`"auto"`) instead of fixing values the recipe would silently not control.
    """
    if not path.is_file():
        return [f"DeepSpeed config {str(path)!r} does not exist"]
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        return [f"{path}: invalid JSON ({exc.msg}, line {exc.lineno})"]
    if not isinstance(config, dict):
        return [f"{path}: a DeepSpeed config is a JSON object"]
    problems = []
    stage = config.get("zero_optimization", {}).get("stage")
    if stage != zero_stage:
        problems.append(
            f"{path}: zero_optimization.stage is {stage!r} but train.distributed.zero_stage is {zero_stage}"
        )
    for key in sorted(_DEEPSPEED_AUTO):
        if key in config and config[key] != "auto":
            problems.append(f'{path}: {key} is {config[key]!r}; set it to "auto" (the recipe\'s train section sets it)')
    for section, owner in (("optimizer", "optim"), ("scheduler", "optim.schedule")):
        if section in config:
            problems.append(f"{path}: drop the {section!r} section; the recipe's `{owner}` sets it")
    for precision in ("bf16", "fp16"):
        enabled = config.get(precision, {}).get("enabled")
        if enabled not in (None, "auto"):
            problems.append(f'{path}: {precision}.enabled is {enabled!r}; set it to "auto" (train.mixed_precision)')
    return problems


def sharding_problems(recipe: Recipe) -> list[tuple[tuple[str | int, ...], str]]:
    """Recipe problems of `train.distributed`, found before any process starts.

    Every method trains under each strategy (the new modules shard with their decoder layer, and stateful buffers
    such as routing_attention's centroids are reduced over the processes), so what is checked is the engine: the
    DeepSpeed package and a config the recipe can drive.
    """
    section = recipe.train.distributed
    if section.strategy != "deepspeed":
        if section.deepspeed_config is not None:
            return [(("train", "distributed", "deepspeed_config"), "only used with strategy: deepspeed")]
        return []
    problems: list[tuple[tuple[str | int, ...], str]] = []
    if importlib.util.find_spec("deepspeed") is None:
        problems.append(
            (
                ("train", "distributed", "strategy"),
                "deepspeed is not installed (pip install deepspeed); or use strategy: fsdp, which needs "
                "nothing beyond torch",
            )
        )
    path = deepspeed_config_path(section, recipe.base_dir)
    where = ("train", "distributed", "deepspeed_config" if section.deepspeed_config else "zero_stage")
    problems += [(where, problem) for problem in deepspeed_config_problems(path, section.zero_stage)]
    return problems


def distributed_training_args(recipe: Recipe) -> dict[str, Any]:
    """`TrainingArguments` of the recipe's strategy (none for DDP: the Trainer's default with several processes)."""
    from .trainer import checkpointing_args

    section, train = recipe.train.distributed, recipe.train
    if world_size() == 1:
        return {}  # one process holds the whole model whatever the strategy (the Trainer refuses FSDP there)
    if section.strategy == "fsdp":
        return {
            "fsdp": True,
            "fsdp_config": {
                "version": 2,
                # one FSDP unit per decoder layer: the model's `_no_split_modules`, found by accelerate
                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "reshard_after_forward": section.reshard_after_forward,
                "cpu_offload": section.cpu_offload,
                "state_dict_type": "SHARDED_STATE_DICT",  # torch.distributed.checkpoint: each process its shard
                # FSDP's own checkpointing wrapper (the Trainer refuses it next to `activation_checkpointing`)
                "activation_checkpointing": train.gradient_checkpointing,
            },
            **checkpointing_args(False),
        }
    if section.strategy == "deepspeed":
        config = json.loads(deepspeed_config_path(section, recipe.base_dir).read_text())
        if section.cpu_offload:
            zero = config.setdefault("zero_optimization", {})
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
            if section.zero_stage == 3:
                zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        return {"deepspeed": config}
    return {}


def enable_fsdp_without_gpus(trainer: Any) -> None:
    """Let the Trainer's FSDP2 plugin run on CPU processes (gloo).

    accelerate only switches to FSDP on accelerator devices; on CPU it keeps `MULTI_CPU` and wraps the model in
    DDP without a word. `fully_shard` itself works over a CPU device mesh, so the plugin the Trainer built is
    installed on the (shared) accelerator state before the model is prepared.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    args = trainer.args
    state = trainer.accelerator.state
    if args.fsdp_plugin_args is None or getattr(state, "fsdp_plugin", None) is not None:
        return
    if state.distributed_type != DistributedType.MULTI_CPU:
        return  # one process: nothing to shard
    # every later `AcceleratorState()` copies the process state's type back over its own: set both
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    trainer.is_fsdp_enabled = True


def _layout(recipe: Recipe) -> dict[str, Any]:
    """How this run writes checkpoints: FSDP and DeepSpeed shards belong to one process count, the rest are whole."""
    strategy = recipe.train.distributed.strategy if world_size() > 1 else "none"
    return {"strategy": strategy, "world_size": world_size(), "sharded": strategy in ("fsdp", "deepspeed")}


def write_checkpoint_layout(checkpoint: Path, recipe: Recipe) -> None:
    (checkpoint / CHECKPOINT_LAYOUT).write_text(json.dumps(_layout(recipe), indent=2) + "\n")


def check_resume(checkpoint: Path, recipe: Recipe) -> None:
    """Refuse, naming both layouts, a checkpoint this run cannot read: sharded states written by another strategy
    or process count, or whole ones that a sharded run would read as shards."""
    layout_file = checkpoint / CHECKPOINT_LAYOUT
    if not layout_file.is_file():
        return
    before, now = json.loads(layout_file.read_text()), _layout(recipe)
    if not before["sharded"] and not now["sharded"]:
        return  # whole checkpoints: any number of processes reads them (global_batch_size keeps the batch)
    if (before["strategy"], before["world_size"]) == (now["strategy"], now["world_size"]):
        return

    def describe(layout: dict[str, Any]) -> str:
        kind = "shards" if layout["sharded"] else "a whole checkpoint"
        return f"{kind} of {layout['strategy']} with {layout['world_size']} process(es)"

    raise RecipeError(
        f"{recipe.location(('train', 'distributed'))}: {checkpoint} holds {describe(before)}, but this run is "
        f"{now['strategy']} with {now['world_size']} process(es). Resume with the same strategy and "
        f"--nproc {before['world_size']}, or start a new output_dir (or train.resume=false)."
    )


def full_state_dict(trainer: Any) -> dict[str, torch.Tensor]:
    """The whole trained state dict on process 0 (empty elsewhere); a collective under FSDP / DeepSpeed."""
    if trainer.is_deepspeed_enabled:
        return trainer.accelerator.get_state_dict(trainer.model_wrapped)  # the DeepSpeed engine gathers ZeRO-3
    if trainer.is_fsdp_enabled:
        return trainer.accelerator.get_state_dict(trainer.model)
    return trainer.accelerator.unwrap_model(trainer.model).state_dict()


def finish() -> None:
    """End this process's part of a multi-process run: wait for the others, then close the process group (the
    process then leaves without the interpreter's teardown: `tuning/__main__.py`)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, argv: list[str]) -> int:
    """Run `hf-attn-zoo tune ARGV` in `nproc` processes under torchrun and return its exit status.

    On a machine without GPUs the processes train on CPU over gloo, one thread each unless `OMP_NUM_THREADS` says
    otherwise (torchrun would otherwise let every process use every core).
    """
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        "-m",
        "hf_attn_zoo.tuning",
        "tune",
        *argv,
    ]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logger.info("launching: %s", " ".join(command))
    return subprocess.run(command, env=env).returncode
