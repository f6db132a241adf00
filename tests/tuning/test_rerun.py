"""Rerunning a recipe never redoes or overwrites finished work: a finished run of the same recipe trains nothing and
returns its stored result, a changed recipe is refused by key unless `train.allow_recipe_change`, `--overwrite`
starts over, and a folder that is not a run is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from hf_attn_zoo.errors import OutputExistsError, RecipeError
from hf_attn_zoo.tuning.cli import tune_main
from hf_attn_zoo.tuning.recipe import load_recipe
from hf_attn_zoo.tuning.train import run_recipe
from tests.tuning.test_train import tiny_recipe


def _snapshot(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_mtime_ns, p.stat().st_size) for p in path.rglob("*") if p.is_file()}


def test_a_finished_run_is_not_retrained_and_a_changed_recipe_is_refused(tmp_path: Path, tiny_model_dir: Path, capsys):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, patches=[], train={"max_steps": 2})
    first = run_recipe(recipe)
    output = first.output_dir
    assert first.global_step == 2 and not first.already_finished
    before = _snapshot(output)

    again = run_recipe(recipe, overrides=["train.logging_steps=2", "eval=null"])  # harmless keys
    assert again.already_finished and again.to_json() == first.to_json()
    assert _snapshot(output) == before  # nothing trained, nothing written

    assert tune_main([str(recipe)]) == 0
    assert f"already finished: {output}" in capsys.readouterr().out and _snapshot(output) == before

    with pytest.raises(RecipeError, match=r"changed: optim\.lr, train\.max_steps\..*allow_recipe_change"):
        run_recipe(recipe, overrides=["optim.lr=1e-3", "train.max_steps=3"])
    assert tune_main([str(recipe), "train.max_steps=3"]) == 2
    assert "train.max_steps" in capsys.readouterr().err
    assert _snapshot(output) == before

    more = run_recipe(recipe, overrides=["train.max_steps=3", "train.allow_recipe_change=true"])
    assert not more.already_finished and more.global_step == 3
    assert "max_steps: 3" in (output / "recipe.yaml").read_text()

    assert tune_main([str(recipe), "--overwrite"]) == 0  # starts over with the recipe as written
    assert "done: 2 steps" in capsys.readouterr().out
    assert "max_steps: 2" in (output / "recipe.yaml").read_text()
    assert not any(output.glob("checkpoint-3"))


def test_a_folder_that_is_not_a_run_is_refused_even_with_overwrite(tmp_path: Path, tiny_model_dir: Path):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, patches=[], train={"max_steps": 1})
    output = tmp_path / "run"
    output.mkdir()
    (output / "config.json").write_text("{}")  # somebody's model
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match=r"not a tuning run"):
            run_recipe(recipe, overwrite=overwrite)
    assert [p.name for p in output.iterdir()] == ["config.json"]


def test_an_unfinished_run_with_a_changed_recipe_is_refused_before_training(tmp_path: Path, tiny_model_dir: Path):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, patches=[], train={"max_steps": 1})
    output = tmp_path / "run"
    output.mkdir()
    (output / "recipe.yaml").write_text(load_recipe(recipe, ["optim.lr=0.01"]).to_yaml())
    with pytest.raises(RecipeError, match=r"unfinished run of a different recipe; changed: optim\.lr\."):
        run_recipe(recipe)
    assert not (output / "final").exists()
