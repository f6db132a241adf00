"""The MLA conversion as a recipe: patch, calibrate on the training text (`mla_calibrate`), tune, export."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import hf_attn_zoo
from hf_attn_zoo.mla_export import export_deepseek_v3
from hf_attn_zoo.patches.mla import latent_layers
from hf_attn_zoo.tuning import load_recipe, run_recipe
from tests.tuning.test_train import tiny_recipe


def test_convert_calibrate_tune_and_export(tmp_path: Path, tiny_model_dir: Path):
    patch = {"method": "mla", "rank": 6, "rope_pairs": 2, "rope_selection": "rorope", "rope_scope": "model"}
    recipe = tiny_recipe(
        tmp_path,
        tiny_model_dir,
        patches=[patch],
        init=[{"name": "mla_calibrate", "options": {"tokens": 256}}],
        train={"max_steps": 2},
    )
    result = run_recipe(recipe)
    tuned = hf_attn_zoo.from_pretrained(result.final_dir).eval()
    layers = list(latent_layers(tuned).values())
    assert layers and all(torch.equal(m.slot_pairs[:, 0], layers[0].slot_pairs[:, 0]) for m in layers)
    export_deepseek_v3(tuned, tmp_path / "deepseek")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "deepseek").eval()
    ids = torch.randint(3, 100, (2, 9))
    torch.testing.assert_close(stock(ids).logits, tuned(ids).logits, atol=1e-4, rtol=1e-4)


def test_the_shipped_recipe_keeps_0_4x_of_the_cache():
    recipe = load_recipe("mla/smollm2_quick")
    options = recipe.patches[0].options
    assert (options["rank"] + 2 * options["rope_pairs"] * 3) / (2 * 3 * 64) <= 0.4  # SmolLM2: 3 KV heads of 64
    assert [step.name for step in recipe.init] == ["mla_calibrate"]
