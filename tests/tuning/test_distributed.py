"""`train.distributed` without starting processes: training arguments, shipped configs, resume layouts, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_attn_zoo.errors import RecipeError
from hf_attn_zoo.tuning import load_recipe
from hf_attn_zoo.tuning.cli import tune_main
from hf_attn_zoo.tuning.distributed import (
    SHIPPED_CONFIGS,
    check_resume,
    deepspeed_config_problems,
    distributed_training_args,
    write_checkpoint_layout,
)

from .test_train import tiny_recipe


@pytest.fixture
def recipe_path(tmp_path: Path, tiny_model_dir: Path):
    def make(**distributed) -> Path:
        return tiny_recipe(tmp_path, tiny_model_dir, train={"distributed": distributed} if distributed else {})

    return make


@pytest.mark.parametrize("stage", [2, 3])
def test_shipped_deepspeed_configs_leave_the_recipe_in_charge(stage: int):
    path = SHIPPED_CONFIGS / f"deepspeed_zero{stage}.json"
    assert deepspeed_config_problems(path, stage) == []
    config = json.loads(path.read_text())
    assert config["train_micro_batch_size_per_gpu"] == "auto" and "optimizer" not in config


def test_a_deepspeed_config_that_fights_the_recipe_is_refused_by_name(tmp_path: Path, recipe_path):
    bad = tmp_path / "ds.json"
    bad.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 2},
                "train_micro_batch_size_per_gpu": 8,
                "optimizer": {"type": "AdamW"},
                "bf16": {"enabled": True},
            }
        )
    )
    problems = "\n".join(deepspeed_config_problems(bad, 3))
    for expected in (
        "stage is 2 but train.distributed.zero_stage is 3",
        "train_micro_batch_size_per_gpu is 8",
        "drop the 'optimizer' section",
        "bf16.enabled is True",
    ):
        assert expected in problems
    with pytest.raises(RecipeError, match=r"train.distributed.deepspeed_config: .*stage is 2"):
        load_recipe(recipe_path(strategy="deepspeed", deepspeed_config=str(bad)))
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(recipe_path(strategy="deepspeed", deepspeed_config=str(tmp_path / "missing.json")))
    with pytest.raises(RecipeError, match="only used with strategy: deepspeed"):
        load_recipe(recipe_path(strategy="fsdp", deepspeed_config=str(bad)))


def test_deepspeed_without_the_package_is_refused_before_any_process_starts(recipe_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(RecipeError, match=r"train.distributed.strategy: deepspeed is not installed .*strategy: fsdp"):
        load_recipe(recipe_path(strategy="deepspeed"))


def test_fsdp_and_deepspeed_trainer_args_point_to_the_distributed_section(tmp_path: Path, tiny_model_dir: Path):
    path = tiny_recipe(tmp_path, tiny_model_dir, train={"trainer_args": {"fsdp": "full_shard auto_wrap"}})
    with pytest.raises(RecipeError, match=r"train.trainer_args.fsdp: set it with `train.distributed.strategy`"):
        load_recipe(path)


def test_training_arguments_of_each_strategy(recipe_path, monkeypatch):
    recipe = load_recipe(
        recipe_path(strategy="fsdp", reshard_after_forward=False), ["train.gradient_checkpointing=true"]
    )
    assert distributed_training_args(recipe) == {}  # one process: nothing to shard
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = distributed_training_args(recipe)
    assert args["fsdp"] is True and args["activation_checkpointing"] is False
    config = args["fsdp_config"]
    assert config["version"] == 2 and config["reshard_after_forward"] is False
    assert config["activation_checkpointing"] is True and config["state_dict_type"] == "SHARDED_STATE_DICT"
    assert distributed_training_args(load_recipe(recipe_path(strategy="ddp"))) == {}
    offload = distributed_training_args(load_recipe(recipe_path(strategy="deepspeed", cpu_offload=True)))
    zero = offload["deepspeed"]["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == zero["offload_optimizer"]["device"] == "cpu"


@pytest.mark.parametrize(
    "written,resumed,refused",
    [
        (("fsdp", 2), ("fsdp", 2), False),
        (("fsdp", 2), ("fsdp", 4), True),  # shards of 2 processes
        (("fsdp", 2), ("ddp", 1), True),
        (("ddp", 2), ("ddp", 4), False),  # whole checkpoints: any count (global_batch_size keeps the batch)
        (("ddp", 1), ("ddp", 2), False),
        (("ddp", 2), ("fsdp", 2), True),  # a whole checkpoint is not FSDP shards
        (("deepspeed", 2), ("deepspeed", 2), False),
        (("deepspeed", 2), ("fsdp", 2), True),
    ],
)
def test_a_resume_with_another_layout_is_refused_by_name(recipe_path, monkeypatch, tmp_path, written, resumed, refused):
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    monkeypatch.setenv("WORLD_SIZE", str(written[1]))
    write_checkpoint_layout(checkpoint, load_recipe(recipe_path(strategy=written[0])))
    monkeypatch.setenv("WORLD_SIZE", str(resumed[1]))
    recipe = load_recipe(recipe_path(strategy=resumed[0]))
    if not refused:
        check_resume(checkpoint, recipe)
        return
    with pytest.raises(RecipeError, match=rf"holds .* with {written[1]} process\(es\), but this run is"):
        check_resume(checkpoint, recipe)


def test_nproc_is_checked_before_anything_starts(recipe_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        tune_main([str(recipe_path()), "--nproc", "0"])
    assert "--nproc must be at least 1" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        tune_main([str(recipe_path()), "--nproc", "2"])
    assert "do not combine it with torchrun" in capsys.readouterr().err
