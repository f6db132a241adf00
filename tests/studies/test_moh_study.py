"""`hf-attn-zoo moh-study`: the pipeline (tune, evaluate, cache, report) on a tiny model, and the paired gap."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hf_attn_zoo.errors import OutputExistsError
from hf_attn_zoo.studies import moh as study
from hf_attn_zoo.tuning import load_recipe
from tests.tuning.conftest import tiny_model_dir  # noqa: F401  (the fixture)


def test_gap_is_the_paired_perplexity_ratio_with_its_standard_error():
    dense = [2.0, 2.5, 3.0, 2.2]
    variant = [2.1, 2.6, 3.2, 2.2]
    gap, se = study.gap_to_dense(variant, dense)
    diffs = [0.1, 0.1, 0.2, 0.0]
    mean = sum(diffs) / 4
    assert gap == pytest.approx(math.exp(mean) - 1)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3)
    assert se == pytest.approx(math.exp(mean) * sd / 2)
    assert study.gap_to_dense(dense, dense) == (0.0, 0.0)


@pytest.mark.parametrize("variant", list(study.VARIANTS))
def test_every_variant_is_a_valid_recipe_on_the_shared_base(variant: str):
    recipe = load_recipe(f"moh_study/{variant}")
    base = load_recipe("moh_study/dense")
    # same tokens, batch, optimizer and schedule as the dense baseline: only the patch and the retrofit differ
    assert recipe.data == base.data and recipe.train == base.train and recipe.seed == base.seed
    assert recipe.optim.model_dump(exclude={"lr_scale"}) == base.optim.model_dump(exclude={"lr_scale"})
    assert bool(recipe.patches) == (variant not in ("dense", "dense_kd"))


PLAN = {0: ["dense", "dense_kd"], 64: ["dense", "dense_kd"], 128: ["dense_kd", "dense"]}


def test_study_tunes_evaluates_caches_and_reports(tmp_path: Path, tiny_model_dir: Path, monkeypatch):  # noqa: F811
    overrides = [
        f"model.path={tiny_model_dir}",
        "data.sources=[{corpus: python_stdlib_docs, max_docs: 6}]",
        "data.seq_len=32",
        "train.batch_size=2",
        "train.save_steps=null",
    ]
    results = study.run_study(tmp_path, PLAN, ppl_blocks=3, tasks=[], overrides=overrides)
    assert results["budgets"] == [0, 64, 128]
    # budget 0 is the recipe's model as prepared, untuned: for both dense recipes the base model itself
    untuned = results["runs"]["dense"]["0"]["nll"]
    assert results["runs"]["dense_kd"]["0"]["nll"] == untuned and "steps" not in results["runs"]["dense"]["0"]
    assert results["runs"]["dense"]["64"]["nll"] != untuned
    for variant in ("dense", "dense_kd"):
        for budget, steps in ((64, 1), (128, 2)):
            run = results["runs"][variant][str(budget)]
            assert len(run["nll"]) == 3 and run["steps"] == steps and run["train_tokens"] == budget
            assert run["ppl"] == pytest.approx(math.exp(sum(run["nll"]) / 3))
    # the models of the smaller budget are deleted once evaluated; the largest are kept
    assert not (tmp_path / "runs" / "dense" / "64").exists() and not (tmp_path / "runs" / "dense" / "0").exists()
    assert (tmp_path / "runs" / "dense" / "128" / "final" / "config.json").is_file()

    # a rerun trains and evaluates nothing: everything comes from the cache
    def refuse(*args, **kwargs):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr(study, "tune_variant", refuse)
    again = study.run_study(tmp_path, PLAN, ppl_blocks=3, tasks=[], overrides=overrides)
    assert again == results
    assert study.cached_results(tmp_path, 3)["runs"] == results["runs"]

    paths = study.write_study_report(results, tmp_path)
    text = paths["md"].read_text()
    assert "| `dense`: " in text and "baseline" in text and "128 tokens" in text and "ppl, untuned" in text
    gap, se = study.gap_to_dense(results["runs"]["dense_kd"]["128"]["nll"], results["runs"]["dense"]["128"]["nll"])
    assert f"{gap:+.1%} ± {se:.1%}" in text
    assert paths["png"].is_file() and json.loads(paths["json"].read_text())["runs"] == results["runs"]


def test_wsd_study_trains_one_run_per_variant_with_decay_branches(
    tmp_path: Path,
    tiny_model_dir: Path,  # noqa: F811
    monkeypatch,
):
    # 32 tokens per step: the 128-token run takes 4 steps (decaying over the last), the 64-token branch leaves it after
    # step 1 and decays over its second
    overrides = [
        f"model.path={tiny_model_dir}",
        "data.sources=[{corpus: python_stdlib_docs, max_docs: 6}]",
        "data.seq_len=32",
        "train.batch_size=1",
        "train.save_steps=null",
    ]
    plan = {0: ["dense"], 64: ["dense", "dense_kd"], 128: ["dense", "dense_kd"]}
    trained = []
    run_variant = study._run_variant
    monkeypatch.setattr(study, "_run_variant", lambda *a: trained.append(a[1:3]) or run_variant(*a))
    results = study.run_study(tmp_path, plan, ppl_blocks=3, tasks=[], overrides=overrides, schedule="wsd")
    assert trained == [("dense", 128), ("dense_kd", 128)]  # one run per variant
    for variant in ("dense", "dense_kd"):
        for budget, steps in ((64, 2), (128, 4)):
            run = results["runs"][variant][str(budget)]
            assert run["steps"] == steps and run["train_tokens"] == budget
    assert results["schedule"] == "wsd" and "decay branch" in study.study_markdown(results)
    # the branch's model is gone once evaluated, the largest run's model kept, no optimizer state left behind
    run = tmp_path / "runs" / "dense" / "128"
    assert (run / "final" / "config.json").is_file() and not (run / "branches" / "64").exists()
    assert not list(tmp_path.rglob("checkpoint-*"))

    monkeypatch.setattr(study, "_run_variant", lambda *a: pytest.fail("a cached run was trained again"))
    assert study.run_study(tmp_path, plan, ppl_blocks=3, tasks=[], overrides=overrides, schedule="wsd") == results
    # a folder holds one study: other settings would mix their runs with these
    with pytest.raises(OutputExistsError, match=r"holds a study with \{'schedule': 'wsd'.*another --out"):
        study.run_study(tmp_path, plan, ppl_blocks=3, tasks=[], overrides=overrides, schedule="cosine")


def test_the_report_extrapolates_each_tuned_trend_to_the_target_gap():
    dense = [2.0, 2.4, 2.8, 2.2]

    def run(gap: float, wobble: float) -> dict:
        nll = [d + math.log1p(gap) + w for d, w in zip(dense, (wobble, -wobble, wobble, -wobble))]
        return {"nll": nll, "ppl": math.exp(sum(nll) / 4)}

    report = {
        "budgets": [0, 16384, 65536],
        "ppl_blocks": 4,
        "runs": {
            "dense": {b: {"nll": dense, "ppl": math.exp(sum(dense) / 4)} for b in ("0", "16384", "65536")},
            "ranked": {"0": run(0.3, 0.01), "16384": run(0.11, 0.01), "65536": run(0.09, 0.005)},
            "learned": {"16384": run(0.05, 0.01), "65536": run(0.015, 0.002)},
            "onorm": {"16384": run(0.05, 0.01)},
        },
    }
    text = study.study_markdown(report)
    trends = study.study_trends(study.study_rows(report))
    assert list(trends) == ["ranked", "learned"]  # onorm has one tuned budget; budget 0 is not fitted
    ranked = trends["ranked"]
    assert ranked.points == 2 and ranked.gap_at(16384) == pytest.approx(0.11, rel=1e-6)
    log10 = math.log10(ranked.tokens_at_target)
    assert f"| `ranked` | 16k-64k (2) | {ranked.exponent:+.3f} ± {ranked.exponent_se:.3f} |" in text
    assert f"(10^{log10:.1f} ± {ranked.log10_tokens_se:.1f}) |" in text
    assert "| `learned` | 16k-64k (2) |" in text and "reached: 64k tokens (measured) |" in text
