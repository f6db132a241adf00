"""The model card `save_pretrained` of a patched model writes: hub metadata, what was patched (per plan entry, with
its paper), parameters against the base, the base model and its license, the eval table, the tuning run (`tune`'s
`final/`), how to load; a README.md that is not ours is never replaced; unpatched models save as before."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

import hf_attn_zoo
from hf_attn_zoo.sharing.model_card import CARD_MARKER, is_own_card
from tests.matrix import randomize_new_parameters, tiny_model

PLAN = [
    {"method": "moh", "router": "learned", "layers": [1]},
    {"method": "sliding_window", "layers": [0], "window": 8},
]


def _patched():
    model = hf_attn_zoo.patch_plan(tiny_model("llama"), PLAN)
    randomize_new_parameters(model)
    return model


def _card(folder: Path) -> ModelCard:
    return ModelCard.load(folder / "README.md")


def _results(accuracy: float) -> dict:
    """A minimal lm-eval results dict (one task, one metric)."""
    return {
        "results": {"zoo_arc_easy": {"alias": "zoo_arc_easy", "acc,none": accuracy, "acc_stderr,none": 0.01}},
        "higher_is_better": {"zoo_arc_easy": {"acc": True}},
        "n-samples": {"zoo_arc_easy": {"original": 100, "effective": 100}},
    }


def test_save_pretrained_of_a_patched_model_writes_the_card(tmp_path: Path):
    model = _patched()
    folder = tmp_path / "tiny-hybrid"
    model.save_pretrained(folder)
    card = _card(folder)
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["tags"] == ["hf-attn-zoo", "moh", "sliding_window"]
    assert "base_model" not in data  # built from a config: nothing says where it came from
    text = card.text
    assert CARD_MARKER in str(card) and "# tiny-hybrid" in text
    assert "| 1 | `moh` | 1 (1 of 2) |" in text and '`router="learned"`' in text
    assert "| 2 | `sliding_window` | 0 (1 of 2) |" in text and "`window=8`" in text
    assert "[arXiv:2410.11842](https://arxiv.org/abs/2410.11842)" in text  # MoH's paper
    assert "[arXiv:2309.17453](https://arxiv.org/abs/2309.17453)" in text  # StreamingLLM
    base = sum(p.numel() for p in tiny_model("llama").parameters())
    new = sum(p.numel() for p in hf_attn_zoo.new_parameters(model).values())
    assert f"| base model | {base:,} |" in text and f"| patched | {base + new:,} |" in text
    assert f"| created by the patches | {new:,} |" in text
    assert "pip install hf-attn-zoo" in text and 'hf_attn_zoo.from_pretrained("./tiny-hybrid")' in text
    assert "AutoModelForCausalLM.from_pretrained` refuses this checkpoint" in text
    assert "## Tuning" not in text and "## Evaluation" not in text and "custom_generate" not in text

    # a re-save rewrites our card; an unpatched (or unpatched again) model writes none
    model.save_pretrained(folder)
    assert is_own_card(folder / "README.md")
    plain = tmp_path / "plain"
    tiny_model("llama").save_pretrained(plain)
    hf_attn_zoo.unpatch(model).save_pretrained(tmp_path / "unpatched")
    assert not (plain / "README.md").exists() and not (tmp_path / "unpatched" / "README.md").exists()
    assert "save_pretrained" not in model.__dict__ and "push_to_hub" not in model.__dict__


def test_a_readme_that_is_not_ours_is_never_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "README.md").write_text("# my own notes\n")
    with caplog.at_level(logging.WARNING, logger="hf_attn_zoo.sharing.model_card"):
        _patched().save_pretrained(folder)
    assert (folder / "README.md").read_text() == "# my own notes\n"
    assert "is not an hf-attn-zoo model card; left as it is" in caplog.text
    assert (folder / "model.safetensors").is_file()  # the model itself is saved
    assert hf_attn_zoo.write_model_card(folder) is None
    assert hf_attn_zoo.write_model_card(folder, overwrite=True) == folder / "README.md"
    assert is_own_card(folder / "README.md")


def test_the_base_model_and_its_license_are_carried_through_reloads(tmp_path: Path, monkeypatch):
    base_card = tmp_path / "base_card.md"
    base_card.write_text("---\nlicense: mit\n---\n# the base\n")
    monkeypatch.setattr("hf_attn_zoo.sharing.model_card._hub_card", lambda repo_id: base_card)
    model = _patched()
    model.config._name_or_path = "org/base-model"  # as loaded from the hub
    first = tmp_path / "first"
    model.save_pretrained(first)
    data = _card(first).data.to_dict()
    assert data["base_model"] == "org/base-model" and data["license"] == "mit"
    assert "[`org/base-model`](https://huggingface.co/org/base-model)" in _card(first).text

    reloaded = hf_attn_zoo.from_pretrained(first)  # its _name_or_path is now the folder holding our card
    reloaded.save_pretrained(tmp_path / "second")
    again = _card(tmp_path / "second").data.to_dict()
    assert again["base_model"] == "org/base-model" and again["license"] == "mit"

    # a local base folder with its own card: the license, and the folder named without its path
    source = tmp_path / "private" / "src"
    tiny_model("llama").save_pretrained(source)
    (source / "README.md").write_text("---\nlicense: apache-2.0\n---\n# notes\n")
    local = hf_attn_zoo.patch(hf_attn_zoo.from_pretrained(source), "moh", router="onorm", top_k=3)
    local.save_pretrained(tmp_path / "third")
    card = _card(tmp_path / "third")
    assert card.data.to_dict()["license"] == "apache-2.0" and "base_model" not in card.data.to_dict()
    assert "a local checkpoint (`src`)" in card.text and str(tmp_path) not in str(card)


def test_the_embedded_default_model_is_named_by_its_hub_id(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_ATTN_ZOO_CACHE", str(tmp_path / "cache"))
    default = tmp_path / "cache" / "models" / "smollm2-135m"
    tiny_model("llama").save_pretrained(default)
    model = hf_attn_zoo.patch(hf_attn_zoo.from_pretrained(default), "moh", router="onorm", top_k=3)
    model.save_pretrained(tmp_path / "out")
    data = _card(tmp_path / "out").data.to_dict()
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and data["license"] == "apache-2.0"


def test_eval_results_beside_the_model_become_a_table(tmp_path: Path):
    folder = tmp_path / "model"
    _patched().save_pretrained(folder)
    for name, accuracy in (("moh", 0.61), ("base", 0.64)):
        (folder / "eval" / name / "tiny").mkdir(parents=True)
        (folder / "eval" / name / "tiny" / "results_2026.json").write_text(json.dumps(_results(accuracy)))
    assert hf_attn_zoo.write_model_card(folder) == folder / "README.md"
    text = _card(folder).text
    assert "| task | metric | n | base | moh |" in text  # the base model first
    assert "| zoo_arc_easy | acc ↑ | 100 | 0.6400 ± 0.0100 | 0.6100 ± 0.0100 |" in text
    assert "`base` is the unpatched base model" in text
    # explicit results instead of the folder's
    text = hf_attn_zoo.render_model_card(folder, eval_results={"patched": _results(0.5)})
    assert "| task | metric | n | patched |" in text and "| 0.5000 ± 0.0100 |" in text


def test_bad_arguments_name_the_problem(tmp_path: Path):
    from hf_attn_zoo.errors import InvalidOptionError, UnknownModelError

    with pytest.raises(UnknownModelError, match="holds no config.json, so it is not a saved model"):
        hf_attn_zoo.write_model_card(tmp_path)
    _patched().save_pretrained(tmp_path / "m")
    with pytest.raises(InvalidOptionError, match="base_model='not a repo' is not a hub model id"):
        hf_attn_zoo.write_model_card(tmp_path / "m", base_model="not a repo")


def test_a_card_that_cannot_be_written_costs_the_save_nothing(tmp_path: Path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("hf_attn_zoo.sharing.model_card.render_model_card", broken)
    model = _patched()
    with caplog.at_level(logging.WARNING, logger="hf_attn_zoo.sharing.model_card"):
        model.save_pretrained(tmp_path / "m")
    assert "its model card was not written (RuntimeError: boom)" in caplog.text
    assert not (tmp_path / "m" / "README.md").exists()
    hf_attn_zoo.from_pretrained(tmp_path / "m")  # the model is saved and loads


def test_cli_patch_and_tune_outputs_get_the_card(tmp_path: Path):
    from hf_attn_zoo.cli import main
    from hf_attn_zoo.tuning.train import run_recipe
    from tests.tuning.conftest import make_tiny_llama
    from tests.tuning.test_train import MOH, tiny_recipe

    source = make_tiny_llama(tmp_path / "src")
    out = tmp_path / "patched"
    assert main(["patch", str(source), "moh", str(out), "router=onorm", "top_k=3"]) == 0
    assert is_own_card(out / "README.md") and "| 1 | `moh` | 0-1 (all 2) |" in _card(out).text

    result = run_recipe(tiny_recipe(tmp_path, source, name="run", train={"max_steps": 2}))
    card = _card(result.final_dir)
    assert card.data.to_dict()["tags"] == ["hf-attn-zoo", "moh"]
    text = card.text
    assert "# run" in text and 'hf_attn_zoo.from_pretrained("./run/final")' in text
    assert f"Continue-tuned with `hf-attn-zoo tune`: 2 optimizer steps, {result.train_tokens:,} training tokens" in text
    assert "```yaml" in text and "router: learned" in text and f"gate: {MOH['gate']}" in text
    assert "path: <local>/src" in text and str(tmp_path) not in text  # local paths are cut in a public card

    dense = run_recipe(tiny_recipe(tmp_path, source, name="dense", patches=[], train={"max_steps": 1}))
    text = _card(dense.final_dir).text
    assert "it is not patched (a plain transformers checkpoint)" in text
    assert "AutoModelForCausalLM.from_pretrained(" in text and "1 optimizer steps" in text
