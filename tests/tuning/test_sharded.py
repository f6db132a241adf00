"""Sharded training on CPU over gloo, started with `hf-attn-zoo tune --nproc 2`: FSDP2 and DeepSpeed ZeRO-3.

For MoH with a learned router, BAM attention experts, routing attention and an upcycled Mixtral: two sharded
processes follow the loss curve of one process at the same global batch, the patches' new modules are sharded and
trained while frozen weights stay bit-identical, the final model reloads with `hf_attn_zoo.from_pretrained`, and an
interrupted run resumes from its sharded checkpoint to the same final weights. A resume with another process count
is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hf_attn_zoo as zoo

from .launch import loss_history, tune
from .test_train import MOH, tiny_recipe

# Measured on the three cases below: per-step losses within 5e-7 of one process (fp32 rounding of the split
# reductions), final weights within 1.2e-4. Adam divides by the root of the squared gradients, so an element whose
# gradient is near zero can move by up to lr per step on rounding noise alone; a lost shard or an unsynchronised
# gradient moves the losses themselves by >1e-3.
FSDP_LOSS_ATOL = 1e-5
FSDP_WEIGHT_ATOL = 1e-3

FSDP = {"distributed": {"strategy": "fsdp"}}


def _probe(out: Path, names: str = "new") -> list[dict]:
    return [{"name": "tests.tuning.sharding_probe:record", "options": {"out": str(out), "names": names}}]


def _one_and_two(recipe: Path, tmp_path: Path) -> tuple[Path, Path]:
    one, two = tmp_path / "one", tmp_path / "two"
    tune(recipe, 1, "train.batch_size=4", f"output_dir={one}", f"init.0.options.out={tmp_path / 'probe_one'}")
    tune(recipe, 2, "train.batch_size=2", f"output_dir={two}", f"init.0.options.out={tmp_path / 'probe_two'}")
    return one, two


def _assert_same_training(one: Path, two: Path) -> None:
    a, b = loss_history(one), loss_history(two)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    for (_, x), (_, y) in zip(a, b):
        assert abs(x - y) < FSDP_LOSS_ATOL
    first = load_file(str(one / "final" / "model.safetensors"))
    second = load_file(str(two / "final" / "model.safetensors"))
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], atol=FSDP_WEIGHT_ATOL, rtol=0)


def _assert_sharded(probe: Path, expect: set[str]) -> None:
    ranks = [json.loads((probe / f"probe_rank{r}.json").read_text()) for r in (0, 1)]
    assert set(ranks[0]) == expect
    for name in expect:
        views = [rank[name] for rank in ranks]
        assert all(v["class"] == "DTensor" for v in views), name
        numel = torch.Size(views[0]["shape"]).numel()
        # each process holds its shard only (dim 0 split in two, the first shard the larger one)
        assert sum(v["local_numel"] for v in views) == numel and views[0]["local_numel"] < numel, name


def _assert_reloads(final: Path, methods: list[str]) -> torch.nn.Module:
    model = zoo.from_pretrained(final).eval()
    assert [r["method"] for r in zoo.applied_patches(model)] == methods
    saved = load_file(str(final / "model.safetensors"))
    state = model.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    return model


@pytest.mark.slow
def test_fsdp_trains_moh_routers_like_one_process_and_resumes(tmp_path: Path, tiny_model_dir: Path):
    # `what: new`: only the routers train; balance loss off (it is per process batch by design, as under DDP)
    moh = {**MOH, "balance_loss_weight": 0.0}
    recipe = tiny_recipe(
        tmp_path,
        tiny_model_dir,
        patches=[moh],
        init=_probe(tmp_path / "probe"),
        train={"what": "new", "max_steps": 4, "save_steps": 2, **FSDP},
    )
    one, two = _one_and_two(recipe, tmp_path)
    _assert_same_training(one, two)

    routers = {n for n in zoo.new_parameters(zoo.from_pretrained(two / "final"))}
    _assert_sharded(tmp_path / "probe_two", routers)
    model = _assert_reloads(two / "final", ["moh"])
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    state = model.state_dict()
    for name, tensor in base.items():  # frozen: bit-identical to the checkpoint
        assert torch.equal(state[name], tensor), name
    start = zoo.patch(zoo.from_pretrained(tiny_model_dir), "moh", **{k: v for k, v in moh.items() if k != "method"})
    start_routers = zoo.new_parameters(start)
    assert all(not torch.equal(state[n], start_routers[n]) for n in routers)  # trained

    layout = json.loads((two / "checkpoint-2" / "zoo_checkpoint.json").read_text())
    assert layout == {"strategy": "fsdp", "world_size": 2, "sharded": True}
    assert (two / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()

    # killed after checkpoint 2: what is left on disk is that checkpoint; resuming ends where the full run ended
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(two / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(two / "recipe.yaml", resumed / "recipe.yaml")
    done = tune(
        recipe,
        1,
        "train.batch_size=4",
        f"output_dir={resumed}",
        f"init.0.options.out={tmp_path / 'p3'}",
        expect_failure=True,
    )
    assert "fsdp with 2 process(es)" in done.stderr and "--nproc 2" in done.stderr
    assert not (resumed / "final").exists()
    tune(recipe, 2, "train.batch_size=2", f"output_dir={resumed}", f"init.0.options.out={tmp_path / 'p4'}")
    assert json.loads((resumed / "result.json").read_text())["resumed_from"] == str(resumed / "checkpoint-2")
    assert loss_history(resumed) == loss_history(two)
    uninterrupted, again = (
        load_file(str(two / "final" / "model.safetensors")),
        load_file(str(resumed / "final" / "model.safetensors")),
    )
    for name in uninterrupted:
        assert torch.equal(uninterrupted[name], again[name]), name


@pytest.mark.slow
@pytest.mark.parametrize(
    "patch",
    [
        pytest.param({"method": "bam", "num_experts": 3}, id="bam"),
        # its k-means centroids are buffers updated in the forward: reduced over the processes, they stay equal
        pytest.param(
            {"method": "routing_attention", "num_clusters": 2, "window": 8, "sinks": 1}, id="routing_attention"
        ),
    ],
)
def test_fsdp_trains_attention_patches_like_one_process(tmp_path: Path, tiny_model_dir: Path, patch: dict):
    recipe = tiny_recipe(
        tmp_path,
        tiny_model_dir,
        patches=[patch],
        init=_probe(tmp_path / "probe"),
        train={"what": "all", "max_steps": 4, **FSDP},
    )
    one, two = _one_and_two(recipe, tmp_path)
    _assert_same_training(one, two)
    model = _assert_reloads(two / "final", [patch["method"]])
    _assert_sharded(tmp_path / "probe_two", set(zoo.new_parameters(model)))


@pytest.mark.slow
def test_deepspeed_zero3_trains_moh_like_one_process(tmp_path: Path, tiny_model_dir: Path):
    # DeepSpeed's CPU accelerator (gloo); it builds its shared-memory op with ninja on first use
    recipe = tiny_recipe(
        tmp_path,
        tiny_model_dir,
        patches=[{**MOH, "balance_loss_weight": 0.0}],
        init=_probe(tmp_path / "probe"),
        train={"what": "all", "max_steps": 4, "save_steps": 2, "distributed": {"strategy": "deepspeed"}},
    )
    one, two = _one_and_two(recipe, tmp_path)
    _assert_same_training(one, two)
    _assert_reloads(two / "final", ["moh"])
    assert json.loads((two / "checkpoint-2" / "zoo_checkpoint.json").read_text()) == {
        "strategy": "deepspeed",
        "world_size": 2,
        "sharded": True,
    }


@pytest.mark.slow
def test_fsdp_trains_an_upcycled_moe_like_one_process(tmp_path: Path, tiny_model_dir: Path):
    moe_dir = tmp_path / "moe"
    zoo.upcycle(tiny_model_dir, mode="sparse", num_experts=4, noise=0.01, output_dir=moe_dir)
    # z-loss only: a mean over tokens, so the same over 2 x 2 blocks as over 4 (the balance loss is not)
    recipe = tiny_recipe(
        tmp_path,
        moe_dir,
        patches=[],
        init=_probe(tmp_path / "probe", names="mlp"),
        moe={"load_balance_weight": 0.0, "z_loss_weight": 0.001},
        train={"what": "moe", "max_steps": 4, **FSDP},
    )
    one, two = _one_and_two(recipe, tmp_path)
    _assert_same_training(one, two)
    model = _assert_reloads(two / "final", [])
    start = load_file(str(moe_dir / "model.safetensors"))
    state = model.state_dict()
    moe_params = {n for n in state if ".mlp." in n}
    assert any(not torch.equal(state[n], start[n]) for n in moe_params)
    for name in set(start) - moe_params:
        assert torch.equal(state[name], start[name]), name
    ranks = json.loads((tmp_path / "probe_two" / "probe_rank0.json").read_text())
    assert {v["class"] for v in ranks.values()} == {"DTensor"}
