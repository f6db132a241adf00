"""Recipe schema and loader: shipped recipes validate; every kind of mistake gives one error with file, key and line."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from hf_attn_zoo.errors import MissingAssetError, RecipeError
from hf_attn_zoo.tuning.cli import tune_main, validate_main
from hf_attn_zoo.tuning.recipe import (
    CorpusSource,
    FilesSource,
    apply_overrides,
    find_recipe,
    load_recipe,
    recipes_dir,
    shipped_recipes,
)

SHIPPED = shipped_recipes()


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error_of(path: Path, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return str(info.value)


def test_the_expected_recipes_are_shipped():
    names = {str(p.relative_to(recipes_dir()).with_suffix("")) for p in SHIPPED}
    assert {"moh/smollm2_quick", "moh/llama3-8b_stage2", "dense/smollm2_quick"} <= names
    assert not any("_base" in name for name in names)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(recipes_dir())))
def test_shipped_recipe_validates_and_starts_with_its_launch_command(path: Path):
    recipe = load_recipe(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("hf-attn-zoo tune" in first or "accelerate launch" in first)
    assert recipe.name == str(path.relative_to(recipes_dir()).with_suffix(""))


def test_dense_baseline_matches_the_moh_quick_recipe_except_the_patch():
    moh = load_recipe("moh/smollm2_quick").model_dump()
    dense = load_recipe("dense/smollm2_quick").model_dump()
    assert moh["patches"] and not dense["patches"]
    for section in ("model", "data", "train", "optim", "seed"):
        assert moh[section] == dense[section], section


def test_llama3_stage2_carries_the_paper_settings():
    recipe = load_recipe("moh/llama3-8b_stage2")
    (moh,) = recipe.patches
    expected = {"router": "qnorm", "shared_heads": 16, "routed_heads": 16, "top_k": 8, "balance_loss_weight": 0.01}
    assert moh.method == "moh" and expected.items() <= moh.options.items()
    assert (recipe.optim.lr, recipe.optim.min_lr, recipe.optim.schedule) == (2e-5, 1e-6, "cosine")
    assert recipe.optim.warmup_steps == 50 and recipe.data.seq_len == 8192
    assert recipe.train.what == "all" and recipe.train.mixed_precision == "bf16"
    assert recipe.model.path == "meta-llama/Meta-Llama-3-8B"


def test_validate_main_checks_every_shipped_recipe(capsys):
    assert validate_main([]) == 0
    assert f"validated {len(SHIPPED)} recipe(s): {len(SHIPPED)} ok, 0 failed" in capsys.readouterr().out


def test_validate_main_reports_a_bad_file(tmp_path: Path, capsys):
    bad = write(tmp_path, "train: {max_steps: 1, what: everything}\n")
    assert validate_main([str(bad)]) == 1
    assert "recipe.yaml:1: train.what" in capsys.readouterr().err


def test_tune_main_prints_the_resolved_recipe_with_overrides(capsys):
    assert tune_main(["moh/smollm2_quick", "optim.lr=1e-4", "train.what=new", "--print"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["optim"]["lr"] == 1e-4 and resolved["train"]["what"] == "new"


def test_tune_main_returns_2_on_a_bad_recipe(capsys):
    assert tune_main(["moh/smollm2_quick", "train.what=everything", "--print"]) == 2
    assert "train.what" in capsys.readouterr().err


def test_broken_yaml_names_file_and_line(tmp_path: Path):
    path = write(tmp_path, "model:\n  path: default\ntrain:\n  what: [all\n")
    message = error_of(path)
    assert "recipe.yaml:5" in message and "invalid YAML" in message and "started at line 4" in message


def test_unknown_key_names_key_line_and_suggestion(tmp_path: Path):
    path = write(tmp_path, "model:\n  path: default\ntrain:\n  max_steps: 3\n  whatt: all\n")
    message = error_of(path)
    assert message.startswith(f"{path}:5: train.whatt: unknown key; did you mean 'what'?")
    assert "\n" not in message


def test_bad_types_are_all_reported_in_one_error(tmp_path: Path):
    path = write(tmp_path, "train:\n  max_steps: three\n  what: everything\noptim:\n  lr: -1\n")
    message = error_of(path)
    assert message.startswith(f"3 problems in recipe {path}")
    assert ":2: train.max_steps:" in message and "'three'" in message
    assert ":3: train.what:" in message and ":5: optim.lr:" in message


def test_yaml_floats_without_a_dot_are_accepted(tmp_path: Path):
    # PyYAML reads `1e-4` as a string; the schema still takes it as a float
    recipe = load_recipe(write(tmp_path, "train: {max_steps: 1}\noptim: {lr: 1e-4, min_lr: 1e-6}\n"))
    assert recipe.optim.lr == 1e-4 and recipe.optim.min_lr == 1e-6


def test_missing_data_file_names_the_file_and_line(tmp_path: Path):
    path = write(
        tmp_path,
        "data:\n  sources:\n    - corpus: python_stdlib_docs\n    - files: [nothere.txt]\ntrain: {max_steps: 2}\n",
    )
    message = error_of(path)
    assert message.startswith(f"{path}:4: data.sources.1.files.0: data file")
    assert "nothere.txt" in message


def test_unknown_corpus_names_the_line_and_a_suggestion(tmp_path: Path):
    path = write(tmp_path, "data:\n  sources:\n    - corpus: shakespear\ntrain: {max_steps: 2}\n")
    assert error_of(path).startswith(
        f"{path}:3: data.sources.0.corpus: unknown corpus 'shakespear'; did you mean 'shakespeare'?"
    )


def test_data_source_without_a_kind_key(tmp_path: Path):
    path = write(tmp_path, "data:\n  sources:\n    - {crpus: x}\ntrain: {max_steps: 2}\n")
    message = error_of(path)
    assert ":3: data.sources.0:" in message and "corpus" in message and "crpus" in message


def test_patch_options_are_checked_against_the_method(tmp_path: Path):
    path = write(tmp_path, "patches:\n  - method: moh\n    topk: 3\n  - method: mohh\ntrain: {max_steps: 2}\n")
    message = error_of(path)
    assert ":3: patches.0.topk: unknown moh option; did you mean 'top_k'?" in message
    assert ":4: patches.1.method: unknown method 'mohh'" in message


def test_cross_field_rules(tmp_path: Path):
    path = write(tmp_path, "train: {what: new, eval_steps: 5}\noptim: {lr: 1e-5, min_lr: 1e-4, name: adamw}\n")
    message = error_of(path)
    for part in (
        "train.max_steps: give exactly one",
        "train.what: 'new' trains only",
        "train.eval_steps: needs",
        "optim.min_lr:",
        "optim.name: unknown optimizer 'adamw'",
    ):
        assert part in message


def test_trainer_args_are_checked(tmp_path: Path):
    path = write(tmp_path, "train:\n  max_steps: 1\n  trainer_args:\n    learning_rate: 1.0\n    warmup_ratioo: 1\n")
    message = error_of(path)
    assert ":4: train.trainer_args.learning_rate: set it with `optim.lr` instead" in message
    assert ":5: train.trainer_args.warmup_ratioo: not a transformers.TrainingArguments field" in message


def test_unknown_init_hook(tmp_path: Path):
    path = write(tmp_path, "train: {max_steps: 1}\ninit:\n  - name: nope\n")
    assert error_of(path).startswith(f"{path}:3: init.0.name: unknown init hook 'nope'")


def test_duplicate_key(tmp_path: Path):
    path = write(tmp_path, "train: {max_steps: 1}\nseed: 1\ntrain: {}\n")
    assert error_of(path) == f"{path}:3: train: duplicate key"


def test_overrides_apply_and_bad_ones_name_the_override(tmp_path: Path):
    path = write(tmp_path, "patches:\n  - method: moh\n    top_k: 3\ntrain: {max_steps: 2}\n")
    recipe = load_recipe(path, ["patches.0.top_k=2", "train.what=all", "optim.betas=[0.9, 0.95]"])
    assert recipe.patches[0].options["top_k"] == 2 and recipe.optim.betas == (0.9, 0.95)
    assert error_of(path, ("train.max_steps=x",)).startswith("override 'train.max_steps=x': train.max_steps:")
    assert "is a list of 1 items" in error_of(path, ("patches.3.top_k=1",))
    assert "must look like key.path=value" in error_of(path, ("train.max_steps",))
    data = apply_overrides({"a": [{"b": 1}]}, ["a.0.b=2", "c.d=null"])
    assert data == {"a": [{"b": 2}], "c": {"d": None}}


def test_base_includes_merge_and_report_lines_in_the_base_file(tmp_path: Path):
    write(tmp_path, "train:\n  max_steps: 5\n  batch_size: 2\noptim: {lr: 1e-3}\n", "_base/common.yaml")
    child = write(tmp_path, "_base: _base/common.yaml\ntrain:\n  batch_size: 3\n")
    recipe = load_recipe(child)
    assert (recipe.train.max_steps, recipe.train.batch_size, recipe.optim.lr) == (5, 3, 1e-3)
    write(tmp_path, "train:\n  max_steps: 5\n  bad_key: 1\n", "_base/broken.yaml")
    child = write(tmp_path, "_base: _base/broken.yaml\n", "child2.yaml")
    assert error_of(child).startswith(str(tmp_path / "_base/broken.yaml") + ":3: train.bad_key: unknown key")
    child = write(tmp_path, "_base: _base/none.yaml\n", "child3.yaml")
    assert "child3.yaml:1: _base: base recipe" in error_of(child)


def test_find_recipe_by_name_and_ambiguity():
    assert find_recipe("moh/smollm2_quick") == recipes_dir() / "moh" / "smollm2_quick.yaml"
    assert find_recipe("mixture_quick") == recipes_dir() / "upcycling" / "mixture_quick.yaml"  # a unique bare name
    with pytest.raises(RecipeError, match="ambiguous"):
        find_recipe("smollm2_quick")
    with pytest.raises(RecipeError, match="Did you mean"):
        find_recipe("moh/smollm2_quik")


def test_data_sources_are_typed_by_their_key(tmp_path: Path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    path = write(
        tmp_path,
        "data:\n  sources:\n    - corpus: bible_kjv\n    - {files: [a.jsonl], format: jsonl}\ntrain: {max_steps: 1}\n",
    )
    sources = load_recipe(path).data.sources
    assert isinstance(sources[0], CorpusSource) and isinstance(sources[1], FilesSource)


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    from hf_attn_zoo.tuning.lr_schedule import lr_lambda as _LRSchedule

    cosine = _LRSchedule("cosine", warmup_steps=4, total_steps=20, lr=1e-3, min_lr=1e-4)
    factors = [cosine(step) for step in range(21)]
    assert factors[:4] == [0.2, 0.4, 0.6, 0.8] and factors[4] == 1.0
    assert math.isclose(factors[20], 0.1) and all(a >= b for a, b in zip(factors[4:], factors[5:]))
    linear = _LRSchedule("linear", 0, 10, 1.0, 0.0)
    assert math.isclose(linear(5), 0.5) and linear(10) == 0.0
    assert _LRSchedule("constant", 2, 10, 1.0, 0.0)(7) == 1.0


def test_missing_corpus_at_run_time_is_a_missing_asset_error(tmp_path: Path, monkeypatch):
    from hf_attn_zoo.tuning.data import _documents

    monkeypatch.setenv("HF_ATTN_ZOO_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_ATTN_ZOO_CORPORA", raising=False)
    monkeypatch.setattr("hf_attn_zoo.assets.corpora._find_shakespeare", lambda root: None)
    path = write(tmp_path, "data:\n  sources:\n    - corpus: shakespeare\ntrain: {max_steps: 1}\n")
    with pytest.raises(MissingAssetError) as info:
        _documents(load_recipe(path))
    message = str(info.value)
    assert message.startswith(f"{path}:3: data.sources.0.corpus:")
    assert "fetch_corpora.sh shakespeare" in message


def test_patch_bounds_and_empty_layer_selections_are_checked_before_any_model_loads(tmp_path: Path):
    path = write(
        tmp_path, "patches:\n  - method: sliding_window\n    window: 0\n    layers: []\ntrain: {max_steps: 2}\n"
    )
    message = error_of(path)
    assert ":3: patches.0.window: sliding_window: window=0 is out of range: it must be >= 1" in message
    assert ":4: patches.0.layers: layers=[] selects no layer" in message
