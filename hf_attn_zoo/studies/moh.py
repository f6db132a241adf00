"""`hf-attn-zoo moh-study`: MoH against dense, continue-tuned on the same tokens, at several token budgets.

MoH's paper reports that a pretrained model converted to Mixture-of-Head attention with 75% of its heads active and
continue-tuned matches the dense model. This study measures it on SmolLM2-135M-Instruct: every variant is a recipe of
`recipes/moh_study/` (the dense baseline, the paper's Eq. 5 router, the MoH-LLaMA3 query-norm rule, our output-norm
rule, KV-group routing, and the retrofit steps: router distillation, gradual head dropping, self-distillation from the
unpatched model, a separate router learning rate), all sharing `_base/moh_study.yaml`: the same token stream (the
Python documentation), batch, optimizer and schedule. Each (variant, budget) is one run of its recipe with
`train.token_budget` set (a full cosine schedule per budget, so every budget is evaluated after a complete decay), or,
with `--schedule wsd`, one warm-up-stable-decay run per variant at its largest budget whose smaller budgets are decay
branches of it (`train.branch_budgets`): every budget still ends with a complete decay, at about the cost of the
largest run alone.
The default plan (`PLAN`) runs every variant at the smallest budget and the dense model, the retrofit before the study
and the best one at the larger budgets; `--variants` / `--budgets` ask for a grid instead.

Evaluation (`evaluate_run`): the mean token NLL of each of `--ppl-blocks` blocks of held-out Python documentation (text
no run trains on), so that every variant's gap to dense at the same budget is a *paired* difference over the same
blocks, `gap = exp(mean_b (nll_variant - nll_dense)) - 1`, with its standard error; and, for the largest budget,
lm-eval tasks of the offline pack (`--tasks`, `--limit` documents each; lm-eval's standard errors).

Everything is cached under `<cache>/moh_study` (or `--out`): a finished run is never retrained, an evaluated one never
re-evaluated, so a rerun (or a run with more budgets or variants) only does what is missing. The checkpoints of runs
below the largest budget are deleted once evaluated (`--keep-models` keeps them). Output: `report.md` (tables),
`report.json`, `gap.png` (gap to dense against training tokens).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..assets.model import cache_dir
from ..errors import OutputExistsError
from .trend import GapTrend, fit_gap_trend

if TYPE_CHECKING:
    from ..tuning.run_folder import TuneResult

__all__ = [
    "PLAN",
    "VARIANTS",
    "Variant",
    "cached_results",
    "evaluate_run",
    "gap_to_dense",
    "moh_study_main",
    "run_study",
    "study_markdown",
    "study_root",
    "study_rows",
    "study_trends",
    "tune_variant",
    "write_study_report",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """A row of the study: the recipe `moh_study/<name>`, what it is, and the dense run it is compared with (the
    self-distilled MoH variants against the dense model with the same self-distillation)."""

    description: str
    baseline: str | None = "dense"


VARIANTS = {
    "dense": Variant("dense, continue-tuned (the baseline)", None),
    "dense_kd": Variant("dense + self-distillation (baseline of the *_kd rows)"),
    "eq5": Variant("Eq. 5 learned router, weighted gates, zero init"),
    "qnorm": Variant("query-norm router (MoH-LLaMA3 release)"),
    "onorm": Variant("output-norm router (every head computed)"),
    "group": Variant("KV-group routing, learned, 6 of 9 heads"),
    "learned": Variant("learned binary router distilled from output norms"),
    "learned_anneal": Variant("learned + gradual head dropping"),
    "learned_kd": Variant("learned + self-distillation", "dense_kd"),
    "learned_anneal_kd": Variant("learned + head dropping annealed + self-distillation", "dense_kd"),
    "learned_anneal_kd_router_lr": Variant("learned_anneal_kd + router LR x10", "dense_kd"),
    "learned_anneal_kd_56": Variant("learned_anneal_kd, 5 of 9 heads", "dense_kd"),
    "ranked": Variant("learned, shared heads ranked by the dense model's output norms"),
    "ranked_kd": Variant("ranked + self-distillation", "dense_kd"),
    "ranked_topk": Variant("ranked, router distilled as a top-3 classifier (BCE) on 32k tokens"),
    "ranked_onorm": Variant("ranked shared heads, routed heads by output norm (a router's ceiling)"),
}
# what `hf-attn-zoo moh-study` runs by default (about 2.5 hours on 2 CPU cores from scratch): where each router starts
# (0 tokens: patched and initialised; the *_kd and *_anneal variants start as their plain twin); every variant at 16k
# tokens; the dense models, the retrofit before the study and the ranked ones at 64k; dense and the two retrofits
# that lead at 64k (learned, ranked) at 128k
PLAN: dict[int, tuple[str, ...]] = {
    0: ("dense", "eq5", "qnorm", "onorm", "group", "learned", "ranked", "ranked_topk", "ranked_onorm"),
    16384: tuple(VARIANTS),
    65536: ("dense", "dense_kd", "learned", "ranked", "ranked_kd"),
    131072: ("dense", "learned", "ranked"),
}
DEFAULT_TASKS = ("zoo_arc_easy", "zoo_piqa", "zoo_lambada_openai")
HELD_OUT_CORPUS = "python_docs"


def study_root(root: str | Path | None = None, schedule: str = "cosine") -> Path:
    """`root`, else the study's folder in the asset cache (`moh_study`, or `moh_study_wsd` for the `wsd` study)."""
    if root is not None:
        return Path(root)
    return cache_dir() / ("moh_study" if schedule == "cosine" else f"moh_study_{schedule}")


def _run_dir(root: Path, variant: str, budget: int) -> Path:
    return root / "runs" / variant / str(budget)


def tune_variant(root: Path, variant: str, budget: int, overrides: Sequence[str] = ()) -> Path:
    """Continue-tune `moh_study/<variant>` on `budget` tokens (cached); returns its `final/` folder. Budget 0 is the
    variant as its recipe prepares it (patched, init steps run), untuned: where each retrofit starts."""
    if budget == 0:
        return _untuned(_run_dir(root, variant, budget) / "final", variant, overrides)
    return _run_variant(root, variant, budget, overrides).final_dir


def _run_variant(root: Path, variant: str, budget: int, overrides: Sequence[str]) -> TuneResult:
    from ..tuning.train import run_recipe

    run_dir = _run_dir(root, variant, budget)
    return run_recipe(f"moh_study/{variant}", [f"output_dir={run_dir}", f"train.token_budget={budget}", *overrides])


def _untuned(final: Path, variant: str, overrides: Sequence[str]) -> Path:
    from ..outputs import atomic_output
    from ..tuning.recipe import load_recipe
    from ..tuning.train import prepared_model

    if (final / "config.json").is_file():
        return final
    model, tokenizer = prepared_model(load_recipe(f"moh_study/{variant}", list(overrides)))
    # a folder without config.json is what an interrupted save of this study left: ours to replace
    with atomic_output(final, overwrite=True) as tmp:
        model.save_pretrained(tmp)  # type: ignore[operator]
        tokenizer.save_pretrained(tmp)
    return final


def evaluate_run(
    model_dir: Path, out: Path, ppl_blocks: int, tasks: Sequence[str] = (), limit: int | None = None
) -> dict[str, Any]:
    """Held-out NLL per block (and lm-eval `tasks`) of a tuned model, cached in `out` (a JSON file)."""
    import torch
    from transformers import AutoTokenizer

    from ..analysis.perplexity import held_out_nll
    from ..loading import from_pretrained

    cached = json.loads(out.read_text()) if out.is_file() else {}
    if _evaluated(cached, ppl_blocks, tasks):
        return cached
    model = from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if cached.get("ppl_blocks") != ppl_blocks or "nll" not in cached:
        nll = held_out_nll(model, tokenizer, HELD_OUT_CORPUS, seq_len=256, max_blocks=ppl_blocks)
        cached.update(nll=nll.tolist(), ppl_blocks=ppl_blocks, ppl=math.exp(nll.mean().item()))
    missing = [t for t in tasks if t not in cached.get("tasks", {})]
    if missing:
        from ..eval_harness.runner import evaluate

        results = evaluate(
            model, missing, limit=limit, tokenizer=tokenizer, batch_size=8, model_args={"efficiency": False}
        )
        scores = cached.setdefault("tasks", {})
        for task in missing:
            metrics = results["results"][task]
            metric = "acc_norm,none" if "acc_norm,none" in metrics else "acc,none"
            scores[task] = {
                "metric": metric.split(",")[0],
                "value": metrics[metric],
                "stderr": metrics.get(metric.replace(",", "_stderr,"), None),
                "documents": results.get("n-samples", {}).get(task, {}).get("effective"),
            }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(cached, indent=1))
    return cached


def _evaluated(cached: dict[str, Any], ppl_blocks: int, tasks: Sequence[str]) -> bool:
    """Whether a cached evaluation has the held-out NLL of `ppl_blocks` blocks and a score for every task."""
    return "nll" in cached and cached.get("ppl_blocks") == ppl_blocks and set(tasks) <= set(cached.get("tasks", {}))


def gap_to_dense(variant_nll: Sequence[float], dense_nll: Sequence[float]) -> tuple[float, float]:
    """Relative perplexity gap `exp(mean d) - 1` and its standard error, from the paired per-block NLL differences
    `d` (the same held-out blocks for both models)."""
    diffs = [v - d for v, d in zip(variant_nll, dense_nll, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (n - 1)) if n > 1 else 0.0
    return math.expm1(mean), math.exp(mean) * sd / math.sqrt(n)


def run_study(
    root: Path,
    plan: Mapping[int, Sequence[str]],
    ppl_blocks: int = 32,
    tasks: Sequence[str] = DEFAULT_TASKS,
    limit: int | None = 700,
    keep_models: bool = False,
    overrides: Sequence[str] = (),
    schedule: str = "cosine",
) -> dict[str, Any]:
    """Tune and evaluate every (variant, budget) of `plan` (`{budget: variants}`) that is not cached; lm-eval `tasks`
    run on the models of the largest budget. Returns the collected results.

    `schedule="cosine"`: one run per (variant, budget), each with its whole cosine schedule, smallest budgets first.
    `schedule="wsd"`: one `wsd` run per variant at its largest budget, whose decay branches are its smaller budgets
    (`train.branch_budgets`; each equals the separate `wsd` run of its budget), so a variant costs its largest run
    plus the branches' decays."""
    from tqdm.auto import tqdm

    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: one of {', '.join(SCHEDULES)}")
    _check_settings(root, schedule, overrides)
    results: dict[str, Any] = {"budgets": sorted(plan), "ppl_blocks": ppl_blocks, "schedule": schedule, "runs": {}}
    largest = max(plan)
    order = list(VARIANTS)
    jobs = [(v, b) for b in sorted(plan) for v in sorted(plan[b], key=order.index)]
    if schedule == "wsd":  # a variant's budgets together: its one run gives them all
        jobs.sort(key=lambda job: (order.index(job[0]), job[1]))
    finals: dict[tuple[str, int], Path] = {}
    for index, (variant, budget) in enumerate(tqdm(jobs, desc="moh-study", unit="run")):
        evaluation = root / "eval" / variant / f"{budget}.json"
        run_tasks = list(tasks) if budget == largest else []
        cached = json.loads(evaluation.read_text()) if evaluation.is_file() else {}
        run_dir = _run_dir(root, variant, budget)
        if not _evaluated(cached, ppl_blocks, run_tasks):
            if (variant, budget) not in finals:
                finals.update(_tune(root, variant, budget, plan, overrides, schedule))
            cached = evaluate_run(finals[variant, budget], evaluation, ppl_blocks, run_tasks, limit)
            run_dir = finals[variant, budget].parent
        run_json = run_dir / "result.json"
        if run_json.is_file() and "train_tokens" not in cached:
            tuned = json.loads(run_json.read_text())
            # the run's budget in whole steps (a decay branch's result.json counts only the tokens of its decay)
            steps = tuned.get("global_step")
            per_step = tuned["train_tokens"] / max(1, steps - _steps_before(tuned)) if steps else 0
            cached.update(train_tokens=round(steps * per_step), steps=steps)
            cached["tokens_per_second"] = tuned.get("train_tokens_per_second")
            evaluation.write_text(json.dumps(cached, indent=1))
        results["runs"].setdefault(variant, {})[str(budget)] = cached
        # the evaluations are what the study keeps: the models below the largest budget, and every optimizer state,
        # are not needed again once evaluated (a wsd run's, once all of its branches are)
        variant_done = all(v != variant for v, _ in jobs[index + 1 :])
        if not keep_models and (schedule == "cosine" or variant_done):
            done = [(variant, budget)] if schedule == "cosine" else [key for key in finals if key[0] == variant]
            for key in done:
                if key in finals:
                    _prune(finals.pop(key).parent, keep=key[1] == largest)
    return results


SCHEDULES = ("cosine", "wsd")


def _tune(
    root: Path, variant: str, budget: int, plan: Mapping[int, Sequence[str]], overrides: Sequence[str], schedule: str
) -> dict[tuple[str, int], Path]:
    """`{(variant, budget): final folder}` of the run(s) that give `budget`: its own run, or (wsd) the variant's run at
    its largest budget with every smaller budget as a decay branch."""
    if budget == 0 or schedule == "cosine":
        return {(variant, budget): tune_variant(root, variant, budget, overrides)}
    budgets = sorted(b for b, variants in plan.items() if b and variant in variants)
    wsd = ["optim.schedule=wsd", f"train.branch_budgets={budgets[:-1]}"]
    result = _run_variant(root, variant, budgets[-1], [*overrides, *wsd])
    finals = {(variant, budgets[-1]): result.final_dir}
    finals.update({(variant, b): branch.final_dir for b, branch in result.branches.items()})
    return finals


def _steps_before(result: dict[str, Any]) -> int:
    """Optimizer steps a run had done before this invocation (a resume, or a decay branch's start)."""
    start = result.get("resumed_from")
    return int(start.rsplit("-", 1)[-1]) if start else 0


def _prune(run_dir: Path, keep: bool) -> None:
    """Delete a finished run's checkpoints (optimizer state), and the whole run unless `keep`."""
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for checkpoint in sorted(run_dir.rglob("checkpoint-*")):
        shutil.rmtree(checkpoint, ignore_errors=True)


def _check_settings(root: Path, schedule: str, overrides: Sequence[str]) -> None:
    """A study folder holds runs of one schedule and one set of overrides: `settings.json` records them, and another
    setting is refused (its runs would be mixed with these in the cache and the report)."""
    settings = {"schedule": schedule, "overrides": list(overrides)}
    path = root / "settings.json"
    if path.is_file():
        found = json.loads(path.read_text())
        if found != settings:
            raise OutputExistsError(
                f"{root} holds a study with {found}; this one asks for {settings}. Give this study another --out "
                "(or --overwrite to start that folder over)."
            )
        return
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1))


def cached_results(root: Path, ppl_blocks: int) -> dict[str, Any]:
    """Every (variant, budget) evaluated under `root` with `ppl_blocks` held-out blocks, in the table's order."""
    runs: dict[str, dict[str, Any]] = {}
    budgets: set[int] = set()
    for variant in VARIANTS:
        for path in sorted((root / "eval" / variant).glob("*.json"), key=lambda p: int(p.stem)):
            evaluation = json.loads(path.read_text())
            if evaluation.get("ppl_blocks") == ppl_blocks:
                runs.setdefault(variant, {})[path.stem] = evaluation
                budgets.add(int(path.stem))
    if "dense" not in runs:
        raise FileNotFoundError(f"{root}: no evaluated dense run with {ppl_blocks} held-out blocks to report on")
    settings = root / "settings.json"
    schedule = json.loads(settings.read_text())["schedule"] if settings.is_file() else "cosine"
    return {"budgets": sorted(budgets), "ppl_blocks": ppl_blocks, "schedule": schedule, "runs": runs}


def _base_scores(root: Path, ppl_blocks: int, tasks: Sequence[str], limit: int | None) -> dict[str, Any]:
    from ..assets.model import default_model_path

    return evaluate_run(default_model_path(), root / "eval" / "base.json", ppl_blocks, tasks, limit)


def study_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per evaluated (variant, budget): perplexity, the baseline it is compared with, and the paired gap
    `(gap, stderr)` (`None` for a baseline, or when its baseline was not run at that budget)."""
    runs = results["runs"]
    rows = []
    for variant, by_budget in runs.items():
        spec = VARIANTS.get(variant, Variant(variant))
        baseline = spec.baseline if spec.baseline in runs else "dense"
        for budget in results["budgets"]:
            run = by_budget.get(str(budget))
            if run is None:
                continue
            dense = runs.get(baseline, {}).get(str(budget))
            gap = gap_to_dense(run["nll"], dense["nll"]) if dense is not None and spec.baseline else None
            rows.append({"variant": variant, "budget": budget, "ppl": run["ppl"], "baseline": baseline, "gap": gap})
    return rows


TARGET_GAP = 0.02  # the target: MoH within 2% of dense


def _tuned_rows(rows: list[dict[str, Any]], variant: str) -> list[dict[str, Any]]:
    """`variant`'s rows with a gap after some tuning (the points of its trend), smallest budget first."""
    return sorted((r for r in rows if r["variant"] == variant and r["budget"] and r["gap"]), key=lambda r: r["budget"])


def study_trends(rows: list[dict[str, Any]], target: float = TARGET_GAP) -> dict[str, GapTrend]:
    """A power law of the gap against tokens (`studies.trend`) for every variant with at least two tuned budgets."""
    trends = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        trend = fit_gap_trend([(r["budget"], *r["gap"]) for r in _tuned_rows(rows, variant)], target)
        if trend is not None:
            trends[variant] = trend
    return trends


def _trend_markdown(rows: list[dict[str, Any]]) -> list[str]:
    trends = study_trends(rows)
    if not trends:
        return []
    lines = [
        "",
        f"Trend: a power law `gap = c * tokens^b` fitted to each variant's tuned budgets (weighted by their standard "
        f"errors, `hf_attn_zoo.studies.trend`), and the budget where it reaches {TARGET_GAP:.0%}. That budget is an "
        "extrapolation, often across orders of magnitude: read it as an order of magnitude.",
        "",
        f"| variant | budgets fitted | exponent b | {TARGET_GAP:.0%} gap at |",
        "|---|---:|---:|---:|",
    ]
    for variant, trend in trends.items():
        tuned = _tuned_rows(rows, variant)
        measured = [r["budget"] for r in tuned if r["gap"][0] <= TARGET_GAP]
        if measured:
            where = f"reached: {_tokens(measured[0])} tokens (measured)"
        elif trend.tokens_at_target is None:
            where = "never: the gap does not shrink"
        else:
            log10 = math.log10(trend.tokens_at_target)
            mantissa, exponent = f"{trend.tokens_at_target:.0e}".split("e")
            where = f"~{mantissa}e{int(exponent)} tokens (10^{log10:.1f} ± {trend.log10_tokens_se:.1f})"
        span = f"{_tokens(tuned[0]['budget'])}-{_tokens(tuned[-1]['budget'])} ({len(tuned)})"
        vs = "" if tuned[0]["baseline"] == "dense" else f" (vs {tuned[0]['baseline']})"
        lines.append(f"| `{variant}`{vs} | {span} | {trend.exponent:+.3f} ± {trend.exponent_se:.3f} | {where} |")
    return lines


def study_markdown(report: dict[str, Any]) -> str:
    """The report's tables (markdown) from `report.json`'s content: perplexity and gap per budget, lm-eval at the
    largest budget."""
    budgets, runs, base = report["budgets"], report["runs"], report.get("base")
    rows = study_rows(report)
    lines = [
        f"Token perplexity on {report['ppl_blocks']} held-out blocks of 256 tokens of the Python documentation (pages "
        "no run trains on); gap: perplexity ratio to the dense model tuned on the same tokens, minus 1, from the "
        "paired per-block differences, ± one standard error. " + _SCHEDULE_TEXT[report.get("schedule", "cosine")],
        "",
        "| variant | "
        + " | ".join(f"ppl, {_tokens(b)} tokens | gap" if b else "ppl, untuned | gap" for b in budgets)
        + " |",
        "|---|" + "---:|---:|" * len(budgets),
    ]
    if base is not None and 0 not in budgets:
        lines.append(
            "| SmolLM2-135M-Instruct, untuned | " + " | ".join(f"{base['ppl']:.2f} | " for _ in budgets) + " |"
        )
    for variant in runs:
        cells = []
        for budget in budgets:
            row = next((r for r in rows if r["variant"] == variant and r["budget"] == budget), None)
            if row is None:
                cells.append(" | ")
            elif row["gap"] is None:
                cells.append(f"{row['ppl']:.2f} | baseline")
            else:
                gap, se = row["gap"]
                vs = "" if row["baseline"] == "dense" else f" (vs {row['baseline']})"
                cells.append(f"{row['ppl']:.2f} | {gap:+.1%} ± {se:.1%}{vs}")
        description = VARIANTS[variant].description if variant in VARIANTS else variant
        lines.append(f"| `{variant}`: {description} | " + " | ".join(cells) + " |")
    lines += _trend_markdown(rows)
    largest = str(max(budgets))
    task_names = sorted({t for v in runs.values() for t in v.get(largest, {}).get("tasks", {})})
    if task_names:
        lines += ["", f"lm-eval after {_tokens(int(largest))} tokens (± standard error; n: documents per task):", ""]
        lines.append("| variant | " + " | ".join(task_names) + " |")
        lines.append("|---|" + "---:|" * len(task_names))
        scored = [("SmolLM2-135M-Instruct, untuned", base)] if base is not None else []
        scored += [(f"`{v}`", by_budget.get(largest)) for v, by_budget in runs.items()]
        for name, run in scored:
            if run is None or not run.get("tasks"):
                continue
            cells = []
            for task in task_names:
                score = run["tasks"].get(task)
                cells.append(
                    f"{score['metric']} {score['value']:.3f} ± {score['stderr']:.3f} (n={score['documents']})"
                    if score
                    else ""
                )
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


_SCHEDULE_TEXT = {
    "cosine": "Each budget is a run of its own with a whole cosine schedule.",
    "wsd": "Each variant is one warm-up-stable-decay run at its largest budget; each smaller budget is a decay branch "
    "of it (`optim.decay_fraction` of its steps, 20% unless overridden), equal to a separate run of that budget.",
}


def write_study_report(results: dict[str, Any], root: Path, base: dict[str, Any] | None = None) -> dict[str, Path]:
    """`report.md` (`study_markdown`), `report.json` (everything it is made from) and `gap.png`."""
    report = {**results, "base": base}
    root.mkdir(parents=True, exist_ok=True)
    md = root / "report.md"
    md.write_text("## MoH against dense, continue-tuned on the same tokens\n\n" + study_markdown(report) + "\n")
    (root / "report.json").write_text(json.dumps(report, indent=1))
    return {"md": md, "json": root / "report.json", "png": _plot_gap(study_rows(report), root / "gap.png")}


def _tokens(count: int) -> str:
    return f"{count / 1024:g}k" if count >= 1024 else str(count)


def _plot_gap(rows: list[dict[str, Any]], path: Path) -> Path:
    """Left: the gap of every variant at the budget most of them ran (which retrofit steps help); right: the gap
    against training tokens of the variants run at several budgets (the trend)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["gap"] is not None]
    fig, (bars, trend) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.2]})
    budgets = [r["budget"] for r in rows if r["budget"] > 0]
    if budgets:
        common = max(set(budgets), key=lambda b: (budgets.count(b), -b))
        at = sorted((r for r in rows if r["budget"] == common), key=lambda r: r["gap"][0])
        names = [r["variant"] + ("" if r["baseline"] == "dense" else f" (vs {r['baseline']})") for r in at]
        values = [100 * r["gap"][0] for r in at]
        errors = [100 * r["gap"][1] for r in at]
        bars.barh(names, values, xerr=errors, color="tab:blue", alpha=0.8, capsize=2)
        bars.axvline(2.0, color="grey", linestyle="--", linewidth=1, label="2% target")
        bars.set_xlabel(f"held-out perplexity gap to dense after {_tokens(common)} tokens (%)")
        bars.tick_params(axis="y", labelsize=7)
        bars.legend(fontsize=7)
    colors = [f"C{i}" for i in range(10)]  # the default cycle; past it the lines turn dashed
    several = [v for v in dict.fromkeys(r["variant"] for r in rows) if sum(r["variant"] == v for r in rows) > 1]
    for index, variant in enumerate(several):
        points = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["budget"])
        trend.errorbar(
            [r["budget"] for r in points],
            [100 * r["gap"][0] for r in points],
            yerr=[100 * r["gap"][1] for r in points],
            marker="o",
            capsize=3,
            color=colors[index % len(colors)],
            linestyle="-" if index < len(colors) else "--",
            label=variant,
        )
    trend.axhline(2.0, color="grey", linestyle="--", linewidth=1, label="2% target")
    trend.set_xscale("symlog", base=2, linthresh=8192)  # 0 tokens (untuned) on the linear part near the origin
    # the untuned gaps are large: a logarithmic scale above 2% keeps the tuned ones readable
    trend.set_yscale("symlog", linthresh=2)
    top = max([100 * (r["gap"][0] + r["gap"][1]) for r in rows if r["variant"] in several] + [10.0])
    trend.set_yticks([t for t in (0, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if t <= 2 * top])
    trend.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    trend.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    lowest = min([100 * (r["gap"][0] - r["gap"][1]) for r in rows if r["variant"] in several] + [0.0])
    trend.set_ylim(bottom=min(0.0, lowest))
    trend.set_xlabel("continue-tuning tokens (0: patched and initialised, untuned)")
    trend.set_ylabel("gap to dense (%)")
    trend.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("MoH on SmolLM2-135M-Instruct: held-out perplexity gap to the dense model tuned on the same tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def moh_study_main(argv: list[str]) -> int:
    plan_text = "; ".join(f"{_tokens(b)} tokens: {', '.join(v)}" for b, v in PLAN.items())
    parser = argparse.ArgumentParser(
        prog="hf-attn-zoo moh-study",
        description=__doc__,
        epilog=f"The default plan: {plan_text}.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", type=Path, help="cache/work folder (default: <cache>/moh_study, or <cache>/moh_study_wsd)"
    )
    parser.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="cosine",
        help="cosine: one run per variant and budget, each with its whole cosine schedule; wsd: one "
        "warm-up-stable-decay run per variant at its largest budget, the smaller budgets as decay branches of it "
        "(about the cost of the largest run alone)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        metavar="NAME",
        help=f"run these at every budget (default: the plan below): {', '.join(VARIANTS)}",
    )
    parser.add_argument("--budgets", nargs="+", type=int, help="training tokens per run (default: the plan below)")
    parser.add_argument("--ppl-blocks", type=int, default=32, help="held-out blocks of 256 tokens")
    parser.add_argument("--tasks", nargs="*", default=list(DEFAULT_TASKS), help="lm-eval tasks at the largest budget")
    parser.add_argument("--limit", type=int, default=700, help="lm-eval documents per task (700: stderr <= 0.019)")
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="recipe overrides for every run, e.g. train.batch_size=64 train.mixed_precision=bf16 on a GPU (they "
        "change what is trained: use another --out)",
    )
    parser.add_argument("--keep-models", action="store_true", help="keep the checkpoints of every budget")
    parser.add_argument(
        "--report-only", action="store_true", help="train nothing: report every run evaluated in --out so far"
    )
    parser.add_argument("--smoke", action="store_true", help="a check of the pipeline: 2 variants, 2 tiny budgets")
    parser.add_argument(
        "--overwrite", action="store_true", help="start over: empty --out first (the study's own cache is reused)"
    )
    args = parser.parse_intermixed_args(argv)
    if args.smoke:
        args.variants, args.budgets, args.ppl_blocks, args.limit = ["dense", "ranked_kd"], [2048, 4096], 4, 8
    if args.variants or args.budgets:
        budgets = args.budgets or sorted(PLAN)
        plan = {b: tuple(args.variants or PLAN.get(b, ("dense",))) for b in budgets}
    else:
        plan = dict(PLAN)
    if any("dense" not in variants for variants in plan.values()):
        parser.error("the study needs the dense baseline at every budget: include `dense` in --variants")
    from ..outputs import claim_folder

    root = claim_folder(study_root(args.out, args.schedule), "moh-study", args.overwrite)
    if args.report_only:
        results = cached_results(root, args.ppl_blocks)
    else:
        results = run_study(
            root, plan, args.ppl_blocks, args.tasks, args.limit, args.keep_models, args.set, args.schedule
        )
    base = _base_scores(root, args.ppl_blocks, args.tasks, args.limit)
    paths = write_study_report(results, root, base)
    print(paths["md"].read_text())
    print(f"wrote {paths['md']}, {paths['json']}, {paths['png']}")
    return 0
