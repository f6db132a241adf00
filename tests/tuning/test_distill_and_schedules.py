"""Retrofit tools of the tuning runs: self-distillation (`distill:`), router learning rates (`optim.lr_scale`) and
schedules during training (`callbacks:`, MoH's gradual head dropping)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

import hf_attn_zoo as zoo
from hf_attn_zoo.errors import InvalidOptionError, RecipeError
from hf_attn_zoo.patches.moh import moh_routers
from hf_attn_zoo.tuning import load_recipe, run_recipe
from hf_attn_zoo.tuning.callback_hooks import MoHHeadDropAnneal
from hf_attn_zoo.tuning.distill import distillation_loss
from tests.patches.test_moh import _gqa_model
from tests.tuning.test_train import tiny_recipe

# binary gates: an unselected head's gate is exactly 0, so with drop=0 every head is fully on
MOH_BINARY = {"method": "moh", "router": "learned", "shared_heads": 2, "routed_heads": 2, "top_k": 1, "gate": "binary"}


class _Logs(TrainerCallback):
    def __init__(self):
        self.logs: list[dict] = []
        self.groups: list[dict] = []
        self.drops: list[float] = []
        self.routers = []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.groups = [
            {"lr": g["lr"], "n": len(g["params"]), "ids": {id(p) for p in g["params"]}} for g in optimizer.param_groups
        ]

    def on_step_begin(self, args, state, control, **kwargs):
        self.drops.append(self.routers[0].drop if self.routers else None)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_distillation_loss_is_the_tokenwise_kl_and_zero_for_the_teacher_itself():
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    expected = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="none")
    torch.testing.assert_close(distillation_loss(student, teacher), expected.sum(-1).mean())
    assert distillation_loss(teacher, teacher).abs() < 1e-6
    # temperature: T^2 KL of the softened distributions
    soft = F.kl_div(F.log_softmax(student / 2, -1), F.log_softmax(teacher / 2, -1), log_target=True, reduction="none")
    torch.testing.assert_close(distillation_loss(student, teacher, 2.0), 4 * soft.sum(-1).mean())
    # padding does not count: the masked mean equals the mean over the kept tokens
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    kept = expected.sum(-1)[mask.bool()].mean()
    torch.testing.assert_close(distillation_loss(student, teacher, attention_mask=mask), kept)
    student.requires_grad_(True)
    distillation_loss(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_distill_adds_the_teacher_kl_which_starts_at_zero_for_the_dense_model(tmp_path: Path, tiny_model_dir: Path):
    logs = _Logs()
    path = tiny_recipe(
        tmp_path, tiny_model_dir, patches=[], distill={"weight": 0.5, "temperature": 2.0}, train={"max_steps": 3}
    )
    result = run_recipe(path, callbacks=[logs])
    steps = [log for log in logs.logs if "distill_loss" in log]
    assert len(steps) == 3
    # the student starts as its own teacher: the KL of the first step is 0, then the weights move away from it
    assert steps[0]["distill_loss"] < 1e-6 and steps[-1]["distill_loss"] > 1e-6
    for log in steps:
        assert log["lm_loss"] == pytest.approx(log["loss"] - 0.5 * log["distill_loss"], abs=1e-3)
    assert zoo.from_pretrained(result.final_dir) is not None


def test_distill_is_refused_where_the_teacher_would_defeat_sharding(tmp_path: Path, tiny_model_dir: Path):
    path = tiny_recipe(tmp_path, tiny_model_dir, distill={}, train={"distributed": {"strategy": "fsdp"}})
    with pytest.raises(RecipeError, match=r"distill.*full teacher copy per process"):
        load_recipe(path)
    empty = tmp_path / "empty.yaml"
    empty.write_text(path.read_text().replace("distill: {}", "distill:"))
    with pytest.raises(RecipeError, match=r"distill.*empty \(null\)"):
        load_recipe(empty)


def test_lr_scale_gives_the_routers_their_own_learning_rate(tmp_path: Path, tiny_model_dir: Path):
    logs = _Logs()
    path = tiny_recipe(tmp_path, tiny_model_dir, optim={"lr_scale": {"head_router": 10.0}}, train={"max_steps": 1})
    run_recipe(path, callbacks=[logs])
    lrs = sorted({round(g["lr"] / 3e-3, 6) for g in logs.groups if g["n"]})
    assert lrs == [1.0, 10.0]
    bad = tiny_recipe(tmp_path, tiny_model_dir, name="bad", optim={"lr_scale": {"no_such_module": 2.0}})
    with pytest.raises(RecipeError, match="no_such_module"):
        run_recipe(bad)
    with pytest.raises(RecipeError, match="lr_scale"):
        load_recipe(tiny_recipe(tmp_path, tiny_model_dir, name="neg", optim={"lr_scale": {"head_router": -1.0}}))


def test_unselected_heads_fully_kept_reproduce_the_dense_model():
    dense = _gqa_model()
    ids = torch.randint(1, 128, (2, 12))
    with torch.no_grad():
        expected = dense(ids).logits
    zoo.patch(dense, "moh", router="learned", shared_heads=2, routed_heads=4, top_k=1, gate="binary")
    routers = list(moh_routers(dense).values())
    torch.nn.init.normal_(routers[0].proj.weight)
    with torch.no_grad():
        dropped = dense(ids).logits
        for router in routers:
            router.drop = 0.0
        kept = dense(ids).logits
        for router in routers:
            router.drop = 0.5
        half = dense(ids).logits
    torch.testing.assert_close(kept, expected)
    assert not torch.allclose(dropped, expected, atol=1e-4)
    assert not torch.allclose(half, expected, atol=1e-4) and not torch.allclose(half, dropped, atol=1e-4)


def test_head_drop_anneal_schedule_runs_to_plain_moh(tmp_path: Path, tiny_model_dir: Path):
    model = _gqa_model()
    with pytest.raises(InvalidOptionError, match="no MoH layer"):
        MoHHeadDropAnneal(model, steps=4)
    zoo.patch(model, "moh", router="learned", shared_heads=2, routed_heads=4, top_k=1, gate="binary")
    schedule = MoHHeadDropAnneal(model, steps=4, start=0.2)
    assert [schedule.drop_at(s) for s in (0, 2, 4, 9)] == pytest.approx([0.2, 0.6, 1.0, 1.0])
    with pytest.raises(InvalidOptionError, match="one of steps and fraction"):
        MoHHeadDropAnneal(model, steps=2, fraction=0.5)

    logs = _Logs()

    class _Find(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            logs.routers = list(moh_routers(model).values())

    path = tiny_recipe(
        tmp_path,
        tiny_model_dir,
        patches=[MOH_BINARY],
        callbacks=[{"name": "moh_head_drop_anneal", "options": {"fraction": 0.5}}],
        train={"max_steps": 4},
    )
    result = run_recipe(path, callbacks=[_Find(), logs])
    assert logs.drops == pytest.approx([0.0, 0.5, 1.0, 1.0])  # over the first half of 4 steps
    assert all(r.drop == 1.0 for r in logs.routers)  # the saved model is plain MoH
    reloaded = zoo.from_pretrained(result.final_dir)
    assert all(r.drop == 1.0 for r in moh_routers(reloaded).values())


def test_an_unknown_callback_is_a_recipe_error_before_training(tmp_path: Path, tiny_model_dir: Path):
    path = tiny_recipe(tmp_path, tiny_model_dir, callbacks=[{"name": "no_such_schedule"}])
    with pytest.raises(RecipeError, match=r"callbacks\.0\.name.*unknown callback 'no_such_schedule'"):
        load_recipe(path)
    wrong = tiny_recipe(
        tmp_path,
        tiny_model_dir,
        name="wrong",
        callbacks=[{"name": "moh_head_drop_anneal", "options": {"steps": 0}}],
        patches=[MOH_BINARY],
    )
    with pytest.raises(RecipeError, match=r"callbacks.*steps=0"):
        run_recipe(wrong)
