"""Side-by-side report of lm-eval results: `report.md` (tables), `report.json` (rows) and `report.png` (bars).

Beside the scores, the efficiency the `hf-attn-zoo` model class measured (`config.hf_attn_zoo.efficiency`,
`hf_attn_zoo.eval_harness.efficiency`), with each model's ratio to the first model's.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


__all__ = [
    "EFFICIENCY_METRICS",
    "ReportRow",
    "build_efficiency_rows",
    "build_rows",
    "load_results",
    "merge_results",
    "score_table",
    "write_report",
]

ResultsLike = dict[str, Any] | str | os.PathLike

# (key in the efficiency record, label, higher is better, unit the raw value is divided by)
EFFICIENCY_METRICS: tuple[tuple[str, str, bool, float], ...] = (
    ("prefill_tokens_per_s", "prefill tokens/s", True, 1.0),
    ("decode_tokens_per_s", "decode tokens/s", True, 1.0),
    ("peak_memory_bytes", "peak memory (MiB)", False, 2.0**20),
    ("kv_cache_bytes_per_token", "KV cache bytes/token", False, 1.0),
)


@dataclass
class ReportRow:
    """One (task, metric, filter) line of the report, with one value per model (`None` where a model lacks it)."""

    task: str
    alias: str
    metric: str
    filter: str
    higher_is_better: bool | None
    n_samples: int | None
    values: dict[str, float | None] = field(default_factory=dict)
    stderrs: dict[str, float | None] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.metric if self.filter == "none" else f"{self.metric} ({self.filter})"

    def best(self) -> list[str]:
        """Names of the best models on this row; empty without a direction, with one value, or when all tie."""
        present = {name: v for name, v in self.values.items() if v is not None}
        if self.higher_is_better is None or len(present) < 2:
            return []
        top = (max if self.higher_is_better else min)(present.values())
        winners = [name for name, v in present.items() if v == top]
        return [] if len(winners) == len(present) else winners


def merge_results(into: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Merge the lm-eval results of another run of the same model into `into` (its run config wins)."""
    for key in (
        "results",
        "groups",
        "group_subtasks",
        "higher_is_better",
        "n-samples",
        "configs",
        "n-shot",
        "versions",
    ):
        if isinstance(other.get(key), dict):
            into.setdefault(key, {}).update(other[key])
    if isinstance(other.get("config"), dict):
        into["config"] = other["config"]
    return into


def load_results(source: ResultsLike) -> dict[str, Any]:
    """Read lm-eval results: a results dict, a `results_*.json` file, or a folder lm-eval wrote into.

    A folder may hold several runs (e.g. one per task); their results are merged, newest last, so a task that was
    run twice shows its latest scores.

    Args:
        source (`dict | str | os.PathLike`): The results, or where they are.

    Returns:
        `dict`: One lm-eval results dict (`"results"`, `"higher_is_better"`, `"n-samples"`, `"config"`, ...).

    Raises:
        `FileNotFoundError`: Nothing to read at `source`.
        `ValueError`: A JSON file that is not lm-eval output.
    """
    if isinstance(source, dict):
        return source
    path = Path(source)
    if path.is_dir():
        files = sorted(path.rglob("results*.json"), key=lambda p: (p.stat().st_mtime, p.name))
        if not files:
            raise FileNotFoundError(f"No lm-eval results_*.json under {path}")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"No lm-eval results at {path}")
    merged: dict[str, Any] = {}
    for file in files:
        data = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
            raise ValueError(f"{file} is not an lm-eval results file (no 'results' mapping)")
        merge_results(merged, data)
    return merged


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _members_of_groups(results: dict[str, Any]) -> set[str]:
    return {sub for subs in (results.get("group_subtasks") or {}).values() for sub in subs}


def build_rows(results: dict[str, dict[str, Any]], include_subtasks: bool = False) -> list[ReportRow]:
    """Collect one `ReportRow` per (task, metric, filter) found in any model's results.

    Args:
        results (`dict[str, dict]`): Model name -> lm-eval results dict.
        include_subtasks (`bool`, *optional*, defaults to `False`):
            Also list the members of groups (e.g. the 57 MMLU subjects); by default a group shows only its aggregate.

    Returns:
        `list[ReportRow]`: In the order tasks and metrics first appear.
    """
    rows: dict[tuple[str, str, str], ReportRow] = {}
    names = list(results)
    for name, res in results.items():
        hidden = set() if include_subtasks else _members_of_groups(res)
        for task, metrics in res.get("results", {}).items():
            if task in hidden or not isinstance(metrics, dict):
                continue
            for key, value in metrics.items():
                # lm-eval keys scores as "metric,filter"; other keys ("alias", "sample_len") are bookkeeping.
                metric, comma, filt = key.partition(",")
                if not comma or metric.endswith("_stderr") or _number(value) is None:
                    continue
                row = rows.get((task, metric, filt))
                if row is None:
                    direction = (res.get("higher_is_better") or {}).get(task, {}).get(metric)
                    # groups have no n-samples entry, only the number of documents behind them
                    n = (res.get("n-samples") or {}).get(task, {}).get("effective", metrics.get("sample_len"))
                    alias = str(metrics.get("alias", task)).strip(" -")
                    row = rows[(task, metric, filt)] = ReportRow(
                        task,
                        alias,
                        metric,
                        filt,
                        direction if isinstance(direction, bool) else None,
                        n if isinstance(n, int) else None,
                        dict.fromkeys(names),
                        dict.fromkeys(names),
                    )
                row.values[name] = _number(value)
                row.stderrs[name] = _number(metrics.get(f"{metric}_stderr,{filt}"))
    return list(rows.values())


def _efficiency(res: dict[str, Any]) -> dict[str, Any] | None:
    record = ((res.get("config") or {}).get("hf_attn_zoo") or {}).get("efficiency")
    return record if isinstance(record, dict) else None


def build_efficiency_rows(results: dict[str, dict[str, Any]]) -> list[ReportRow]:
    """One `ReportRow` per efficiency metric (task `"efficiency"`), or none when no model has a measurement.

    Args:
        results (`dict[str, dict]`): Model name -> lm-eval results dict.
    """
    records = {name: _efficiency(res) or {} for name, res in results.items()}
    if not any(_number(r.get(key)) is not None for r in records.values() for key, *_ in EFFICIENCY_METRICS):
        return []
    rows = []
    for key, label, higher, unit in EFFICIENCY_METRICS:
        values = {}
        for name, record in records.items():
            value = _number(record.get(key))
            values[name] = None if value is None else value / unit
        rows.append(ReportRow("efficiency", "efficiency", label, "none", higher, None, values, dict.fromkeys(values)))
    return rows


def _relative(row: ReportRow, first: str) -> dict[str, float | None]:
    """Each model's value divided by the first model's."""
    base = row.values[first]
    return {name: None if value is None or not base else value / base for name, value in row.values.items()}


def _probe_label(record: dict[str, Any] | None) -> str:
    if record is None:
        return "–"
    if "error" in record:
        return f"failed: {record['error']}"[:80]
    probe = record.get("probe") or {}
    memory = record.get("memory_kind") or "no memory counter"
    return (
        f"{probe.get('device')}, {str(probe.get('dtype')).removeprefix('torch.')}, "
        f"{probe.get('prompt_tokens')} + {probe.get('decode_tokens')} tokens, {probe.get('threads')} threads, {memory}"
    )


def _num(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"


def _fmt(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "–"
    return f"{_num(value)} ± {_num(stderr)}" if stderr is not None else _num(value)


def _model_summary(res: dict[str, Any]) -> dict[str, Any]:
    config = res.get("config") or {}
    zoo = config.get("hf_attn_zoo") or {}
    summary = {
        "model": _pretrained(config),
        "patches": zoo.get("patches", []),
        "limit": config.get("limit"),
        "n_shot": res.get("n-shot", {}),
    }
    efficiency = _efficiency(res)
    if efficiency is not None:
        summary["efficiency"] = efficiency
    usage = zoo.get("head_usage")
    if usage is not None:
        summary["head_usage"] = usage
        fraction = _active_fraction(usage)
        if fraction is not None:
            summary["active_heads_fraction"] = fraction
    return summary


def _pretrained(config: dict[str, Any]) -> str | None:
    args = config.get("model_args")
    if isinstance(args, dict) and args.get("pretrained") is not None:
        return str(args["pretrained"])
    if isinstance(args, str):
        for item in args.split(","):
            key, _, value = item.partition("=")
            if key.strip() == "pretrained":
                return value.strip()
    model = config.get("model")
    return None if model is None else str(model)


def _active_fraction(usage: Any) -> float | None:
    # `hf_attn_zoo.analysis.head_usage` format: {"layers": {...}, "mean_active_fraction": float | None}
    if isinstance(usage, dict):
        return _number(usage.get("mean_active_fraction"))
    return _number(usage)


def score_table(rows: list[ReportRow], names: list[str], bold_best: bool = True) -> list[str]:
    """The markdown lines of the scores table: one row per task metric, one column per model (mean ± stderr), the
    best value of a row in bold when `bold_best` (the report's; the model card's table has no winner)."""
    lines = ["| task | metric | n | " + " | ".join(names) + " |", "|---|---|---:|" + "---:|" * len(names)]
    for row in rows:
        arrow = {True: " ↑", False: " ↓"}.get(row.higher_is_better, "")
        best = row.best() if bold_best else []
        cells = []
        for name in names:
            cell = _fmt(row.values[name], row.stderrs[name])
            cells.append(f"**{cell}**" if name in best else cell)
        n = "" if row.n_samples is None else str(row.n_samples)
        lines.append(f"| {row.alias} | {row.label}{arrow} | {n} | " + " | ".join(cells) + " |")
    return lines


def _markdown(rows: list[ReportRow], names: list[str], models: dict[str, dict[str, Any]]) -> str:
    lines = ["# hf-attn-zoo benchmark report", "", *score_table(rows, names)]
    lines += ["", "Values are mean ± standard error as lm-eval reports them; the best value of a row is in bold.", ""]
    lines += ["## Models", "", "| name | model | patches | active heads | limit |", "|---|---|---|---:|---:|"]
    for name in names:
        info = models[name]
        patches = ", ".join(_patch_label(p) for p in info["patches"]) or "none"
        fraction = info.get("active_heads_fraction")
        active = "" if fraction is None else f"{fraction:.3f}"
        limit = "" if info.get("limit") is None else str(info["limit"])
        lines.append(f"| {name} | {info.get('model') or ''} | {patches} | {active} | {limit} |")
    return "\n".join(lines) + "\n"


def _efficiency_markdown(rows: list[ReportRow], names: list[str], models: dict[str, dict[str, Any]]) -> str:
    lines = ["## Efficiency", "", "| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for row in rows:
        relative = _relative(row, names[0])
        cells = []
        for name in names:
            value, ratio = row.values[name], relative[name]
            cell = "–" if value is None else f"{value:.1f}"
            cells.append(cell if name == names[0] or ratio is None else f"{cell} ({ratio:.2f}×)")
        arrow = " ↑" if row.higher_is_better else " ↓"
        lines.append(f"| {row.metric}{arrow} | " + " | ".join(cells) + " |")
    lines.append("| probe | " + " | ".join(_probe_label(models[name].get("efficiency")) for name in names) + " |")
    lines += [
        "",
        f"In parentheses: the ratio to {names[0]}. One probe per model when it was loaded for evaluation: batch 1, "
        "a prompt of held-out text, one prefill, then greedy decode steps (hf_attn_zoo.eval_harness.efficiency). "
        "KV cache: the bytes the cache holds after the prefill, per prompt token. Peak memory: CUDA's max "
        "allocated on a GPU; on CPU the process's peak resident set size (weights and everything else the "
        "process holds). Throughput on a shared CPU is noisy: compare runs made on the same machine.",
        "",
    ]
    return "\n".join(lines)


def _patch_label(record: dict[str, Any]) -> str:
    layers = record.get("layers")
    if layers is None:
        return str(record.get("method"))
    where = f"{len(layers)} layers" if isinstance(layers, list) and len(layers) > 4 else str(layers)
    return f"{record.get('method')} @{where}"


def _plot(rows: list[ReportRow], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(4, max(1, len(rows)))
    nrows = max(1, math.ceil(len(rows) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.8 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, row in zip(axes.flat, rows):
        for i, name in enumerate(names):
            value, err = row.values[name], row.stderrs[name]
            if value is None:
                ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=8, color="gray")
                continue
            ax.bar(i, value, yerr=err, capsize=3, color=colors[i % len(colors)])
        tops = [v + (row.stderrs[n] or 0.0) for n, v in row.values.items() if v is not None]
        if tops and min(tops) >= 0:
            ax.set_ylim(0, max(tops) * 1.15 if max(tops) > 0 else 1.0)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        arrow = {True: " ↑", False: " ↓"}.get(row.higher_is_better, "")
        ax.set_title(f"{row.alias}\n{row.label}{arrow}", fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    results: dict[str, ResultsLike],
    out_dir: str | os.PathLike,
    include_subtasks: bool = False,
) -> dict[str, Path]:
    """Write the models' results side by side as `report.md`, `report.json` and `report.png` in `out_dir`.

    Efficiency measurements, where the results hold them, get their own table (with ratios to the first model),
    `"efficiency"` rows in the JSON and panels in the plot.

    Args:
        results (`dict[str, dict | str | os.PathLike]`):
            Model name -> lm-eval results (a dict from `evaluate`, a results JSON file, or an lm-eval output folder).
        out_dir (`str | os.PathLike`):
            Created if needed.
        include_subtasks (`bool`, *optional*, defaults to `False`):
            Also list the members of groups (MMLU subjects).

    Returns:
        `dict[str, Path]`: The written files under the keys `"md"`, `"json"` and `"png"`.

    Example:
        >>> write_report({"base": "out/base", "moh": "out/moh"}, "report/")
    """
    if not results:
        raise ValueError("write_report needs the results of at least one model")
    loaded = {name: load_results(source) for name, source in results.items()}
    names = list(loaded)
    rows = build_rows(loaded, include_subtasks=include_subtasks)
    efficiency = build_efficiency_rows(loaded)
    models = {name: _model_summary(res) for name, res in loaded.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "report.md", "json": out / "report.json", "png": out / "report.png"}
    markdown = _markdown(rows, names, models)
    if efficiency:
        markdown += "\n" + _efficiency_markdown(efficiency, names, models)
    paths["md"].write_text(markdown, encoding="utf-8")
    payload = {
        "models": names,
        "rows": [{**asdict(row), "label": row.label, "best": row.best()} for row in rows],
        "efficiency": [
            {
                "metric": key,
                "label": row.metric,
                "higher_is_better": row.higher_is_better,
                "values": row.values,
                "relative": _relative(row, names[0]),
            }
            for (key, *_), row in zip(EFFICIENCY_METRICS, efficiency)
        ],
        "model_info": models,
    }
    paths["json"].write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    _plot(rows + efficiency, names, paths["png"])
    return paths
