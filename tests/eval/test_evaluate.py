"""End to end on a tiny random Llama: the Python API, the in-process CLI and lm-eval's stock `hf` model agree, a
patch changes the scores, and the report puts the runs side by side."""

from __future__ import annotations

import json

import lm_eval
import pytest

from hf_attn_zoo.eval_harness import evaluate, task_manager
from hf_attn_zoo.eval_harness.cli import eval_main, report_main


TASKS = ["zoo_arc_easy", "zoo_winogrande", "zoo_lambada_openai"]
LIMIT = 3
METRICS = {
    "zoo_arc_easy": ["acc,none", "acc_norm,none"],
    "zoo_winogrande": ["acc,none"],
    "zoo_lambada_openai": ["acc,none", "perplexity,none"],
}


def _scores(results):
    return {f"{task}/{m}": results["results"][task][m] for task, metrics in METRICS.items() for m in metrics}


def _loglikelihoods(results, task):
    return [float(resp[0][0]) for sample in results["samples"][task] for resp in sample["resps"]]


@pytest.fixture(scope="module")
def api_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("api_out")
    results = evaluate(
        tiny_model_dir, TASKS, limit=LIMIT, batch_size=1, device="cpu", log_samples=True, output_path=out
    )
    return results, out


def test_python_api(api_run, tiny_model_dir):
    results, out = api_run
    assert set(TASKS) <= set(results["results"])
    for task in TASKS:
        assert results["n-samples"][task]["effective"] == LIMIT
    for key, value in _scores(results).items():
        assert value >= 0 and ("perplexity" in key or value <= 1)
    assert len(results["samples"]["zoo_arc_easy"]) == LIMIT
    assert results["config"]["model"] == str(tiny_model_dir)
    zoo = results["config"]["hf_attn_zoo"]
    assert zoo["patches"] == [] and zoo["efficiency"]["kv_cache_bytes_per_token"] == 2 * 2 * 16 * 2 * 4
    saved = list(out.rglob("results_*.json"))
    assert len(saved) == 1
    assert json.loads(saved[0].read_text())["results"]["zoo_winogrande"]["acc,none"] == pytest.approx(
        results["results"]["zoo_winogrande"]["acc,none"]
    )


def test_same_scores_as_lm_eval_hf_model(api_run, tiny_model_dir):
    stock = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(tiny_model_dir), "device": "cpu"},
        tasks=TASKS,
        limit=LIMIT,
        batch_size=1,
        task_manager=task_manager(),
        log_samples=True,
    )
    ours = api_run[0]
    assert _scores(stock) == pytest.approx(_scores(ours), rel=1e-6)
    for task in TASKS:
        assert _loglikelihoods(stock, task) == pytest.approx(_loglikelihoods(ours, task), rel=1e-5)


def test_patch_changes_scores_and_reports_head_usage(api_run, tiny_model_dir):
    moh = evaluate(
        tiny_model_dir,
        TASKS[:1],
        limit=LIMIT,
        batch_size=1,
        device="cpu",
        log_samples=True,
        patches=[{"method": "moh", "router": "onorm", "top_k": 1}],
    )
    base_ll = _loglikelihoods(api_run[0], "zoo_arc_easy")
    moh_ll = _loglikelihoods(moh, "zoo_arc_easy")
    assert len(moh_ll) == len(base_ll)
    assert moh_ll != pytest.approx(base_ll, rel=1e-3)
    zoo = moh["config"]["hf_attn_zoo"]
    assert [p["method"] for p in zoo["patches"]] == ["moh"]
    assert zoo["head_usage"]["mean_active_fraction"] == pytest.approx(0.25)


def test_cli_matches_api_and_feeds_the_report(api_run, tiny_model_dir, tmp_path, capsys):
    cli_out = tmp_path / "cli_out"
    rc = eval_main(
        [
            "--model_args",
            f"pretrained={tiny_model_dir}",
            "--tasks",
            ",".join(TASKS),
            "--limit",
            str(LIMIT),
            "--device",
            "cpu",
            "--output_path",
            str(cli_out),
        ]
    )
    assert rc == 0
    saved = list(cli_out.rglob("results_*.json"))
    assert len(saved) == 1
    cli_results = json.loads(saved[0].read_text())
    assert cli_results["config"]["model"] == "hf-attn-zoo"
    assert cli_results["config"]["batch_size"] == "8"
    assert cli_results["config"]["hf_attn_zoo"]["efficiency"]["probe"]["prompt_tokens"] == 128
    assert _scores(cli_results) == pytest.approx(_scores(api_run[0]), rel=1e-6)

    report_dir = tmp_path / "report"
    assert report_main([str(api_run[1]), str(cli_out), "--names", "api,cli", "--out", str(report_dir)]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["models"] == ["api", "cli"]
    labels = sorted((row["task"], row["label"]) for row in report["rows"])
    assert labels == [
        ("zoo_arc_easy", "acc"),
        ("zoo_arc_easy", "acc_norm"),
        ("zoo_lambada_openai", "acc"),
        ("zoo_lambada_openai", "perplexity"),
        ("zoo_winogrande", "acc"),
    ]
    for row in report["rows"]:
        assert row["values"]["api"] == pytest.approx(row["values"]["cli"], rel=1e-6)
    assert [row["label"] for row in report["efficiency"]] == [
        "prefill tokens/s",
        "decode tokens/s",
        "peak memory (MiB)",
        "KV cache bytes/token",
    ]
    assert report["efficiency"][3]["relative"] == {"api": 1.0, "cli": 1.0}
    markdown = (report_dir / "report.md").read_text()
    assert "| zoo_winogrande | acc ↑ | 3 |" in markdown
    assert "| KV cache bytes/token ↓ | 512.0 | 512.0 (1.00×) |" in markdown
    assert (report_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_help_and_bad_arguments(capsys):
    assert eval_main(["run", "--help"]) == 0
    assert "--include_path" in capsys.readouterr().out
    assert eval_main(["run", "--tasks", "zoo_arc_easy", "--no_such_flag"]) == 2
