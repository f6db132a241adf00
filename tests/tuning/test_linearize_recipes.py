"""The two-stage linearizing recipes (attention transfer, then LoRA), on a tiny model and as shipped."""

from __future__ import annotations

from pathlib import Path

import torch

import hf_attn_zoo
from hf_attn_zoo.patches.linearize import linear_attention_layers
from hf_attn_zoo.tuning import load_recipe, run_recipe
from tests.tuning.test_train import base_weights, tiny_recipe


def test_two_stage_recipe_transfer_then_lora(tmp_path: Path, tiny_model_dir: Path):
    stage1 = tiny_recipe(
        tmp_path,
        tiny_model_dir,
        name="stage1",
        patches=[{"method": "linearize", "window": 2, "chunk": 4}],
        train={"what": "new", "max_steps": 3},
        optim={"lr": 1e-2},
        callbacks=[{"name": "linear_attention_transfer", "options": {"weight": 100.0}}],
    )
    first = run_recipe(stage1)
    # every step logs the transfer loss (the MSE to the softmax outputs), and only the maps train
    assert len(first.aux_loss_history) == 3 and all(loss > 0 for _, loss in first.aux_loss_history)
    reloaded = hf_attn_zoo.from_pretrained(first.final_dir)
    assert [p["method"] for p in hf_attn_zoo.applied_patches(reloaded)] == ["linearize"]
    maps = list(linear_attention_layers(reloaded).values())
    assert all(m.transfer_weight is None for m in maps)
    eye = torch.eye(maps[0].q_map.shape[1])
    assert all(not torch.equal(m.q_map[0], eye) for m in maps)
    original = base_weights(tiny_model_dir)
    for name, tensor in reloaded.state_dict().items():
        if name in original:
            assert torch.equal(tensor, original[name]), f"{name} changed in stage 1 (the model is frozen)"
    stage2 = tiny_recipe(
        tmp_path,
        first.final_dir,
        name="stage2",
        patches=[],
        train={"what": "lora", "max_steps": 2},
    )
    second = run_recipe(stage2)
    assert hf_attn_zoo.applied_patches(hf_attn_zoo.from_pretrained(second.final_dir))[0]["method"] == "linearize"
    assert second.aux_loss_history == []  # stage 2: the next-token loss only


def test_the_shipped_recipes_validate():
    for name in ("linearize/smollm2_stage1_quick", "linearize/smollm2_stage2_quick", "nalaformer/smollm2_stage1_quick"):
        load_recipe(name)
