"""The report writer on hand-made lm-eval results: rows, best values, groups, missing values, files."""

from __future__ import annotations

import json
import os

import pytest

from hf_attn_zoo.eval_harness.cli import report_main
from hf_attn_zoo.eval_harness.report import build_efficiency_rows, build_rows, load_results, write_report


def _results(acc: float, ppl: float, mmlu: float, *, with_gsm8k: bool = True, patched: bool = False) -> dict:
    results = {
        "zoo_arc_easy": {
            "alias": "zoo_arc_easy",
            "sample_len": 10,
            "acc,none": acc,
            "acc_stderr,none": 0.1,
            "acc_norm,none": 0.5,
            "acc_norm_stderr,none": 0.05,
        },
        "zoo_lambada_openai": {
            "alias": "zoo_lambada_openai",
            "perplexity,none": ppl,
            "perplexity_stderr,none": 1.5,
            "acc,none": 0.2,
            "acc_stderr,none": 0.04,
        },
        "zoo_corpus_ppl": {"alias": "zoo_corpus_ppl", "bits_per_byte,none": 1.25, "bits_per_byte_stderr,none": "N/A"},
        "zoo_mmlu": {"alias": "zoo_mmlu", "sample_len": 14042, "acc,none": mmlu, "acc_stderr,none": 0.01},
        "zoo_mmlu_stem": {"alias": " - stem", "acc,none": 0.3, "acc_stderr,none": 0.02},
        "zoo_mmlu_anatomy": {"alias": "  - anatomy", "acc,none": 0.31, "acc_stderr,none": 0.03},
    }
    if with_gsm8k:
        results["zoo_gsm8k"] = {
            "alias": "zoo_gsm8k",
            "exact_match,strict-match": 0.02,
            "exact_match_stderr,strict-match": 0.01,
            "exact_match,flexible-extract": 0.05,
            "exact_match_stderr,flexible-extract": 0.01,
        }
    higher = {
        "zoo_arc_easy": {"acc": True, "acc_norm": True},
        "zoo_lambada_openai": {"perplexity": False, "acc": True},
        "zoo_corpus_ppl": {"bits_per_byte": False},
        "zoo_mmlu": {"acc": True},
        "zoo_mmlu_stem": {"acc": True},
        "zoo_mmlu_anatomy": {"acc": True},
        "zoo_gsm8k": {"exact_match": True},
    }
    zoo = {"patches": []}
    if patched:
        zoo = {
            "patches": [{"method": "moh", "layers": [0, 1], "options": {}}],
            "head_usage": {"layers": {"0": {"fraction": [1, 0], "tokens": 4}}, "mean_active_fraction": 0.625},
        }
    return {
        "results": results,
        "groups": {"zoo_mmlu": results["zoo_mmlu"], "zoo_mmlu_stem": results["zoo_mmlu_stem"]},
        "group_subtasks": {
            "zoo_mmlu": ["zoo_mmlu_stem"],
            "zoo_mmlu_stem": ["zoo_mmlu_anatomy"],
            "zoo_arc_easy": [],
            "zoo_lambada_openai": [],
        },
        "higher_is_better": higher,
        "n-samples": {"zoo_arc_easy": {"original": 2376, "effective": 10}},
        "config": {
            "model": "hf-attn-zoo",
            "model_args": "pretrained=/models/smollm2,patch=moh",
            "limit": 10.0,
            "hf_attn_zoo": zoo,
        },
    }


@pytest.fixture()
def two_models():
    return {"base": _results(0.40, 20.0, 0.25, with_gsm8k=False), "moh": _results(0.45, 18.0, 0.25, patched=True)}


def test_rows(two_models):
    rows = {(r.task, r.label): r for r in build_rows(two_models)}
    assert ("zoo_mmlu", "acc") in rows
    assert ("zoo_mmlu_stem", "acc") not in rows and ("zoo_mmlu_anatomy", "acc") not in rows
    assert ("zoo_arc_easy", "sample_len") not in rows
    arc = rows[("zoo_arc_easy", "acc")]
    assert arc.values == {"base": 0.40, "moh": 0.45} and arc.stderrs == {"base": 0.1, "moh": 0.1}
    assert arc.n_samples == 10 and arc.best() == ["moh"]
    assert rows[("zoo_lambada_openai", "perplexity")].best() == ["moh"]
    assert rows[("zoo_lambada_openai", "perplexity")].higher_is_better is False
    assert rows[("zoo_mmlu", "acc")].best() == [] and rows[("zoo_mmlu", "acc")].n_samples == 14042
    assert rows[("zoo_corpus_ppl", "bits_per_byte")].stderrs == {"base": None, "moh": None}
    gsm8k = rows[("zoo_gsm8k", "exact_match (strict-match)")]
    assert gsm8k.values == {"base": None, "moh": 0.02} and gsm8k.best() == []
    with_subtasks = {(r.task, r.label) for r in build_rows(two_models, include_subtasks=True)}
    assert {("zoo_mmlu_stem", "acc"), ("zoo_mmlu_anatomy", "acc")} <= with_subtasks


def test_write_report(two_models, tmp_path):
    paths = write_report(two_models, tmp_path / "out")
    assert set(paths) == {"md", "json", "png"} and all(p.is_file() for p in paths.values())
    markdown = paths["md"].read_text()
    assert "| task | metric | n | base | moh |" in markdown
    assert "| zoo_arc_easy | acc ↑ | 10 | 0.4000 ± 0.1000 | **0.4500 ± 0.1000** |" in markdown
    assert "| zoo_lambada_openai | perplexity ↓ |  | 20.0000 ± 1.5000 | **18.0000 ± 1.5000** |" in markdown
    assert "| zoo_gsm8k | exact_match (strict-match) ↑ |  | – | 0.0200 ± 0.0100 |" in markdown
    assert "| zoo_corpus_ppl | bits_per_byte ↓ |  | 1.2500 | 1.2500 |" in markdown
    assert "| moh | /models/smollm2 | moh @[0, 1] | 0.625 | 10.0 |" in markdown
    payload = json.loads(paths["json"].read_text())
    assert payload["models"] == ["base", "moh"]
    assert len(payload["rows"]) == 8
    assert payload["model_info"]["moh"]["active_heads_fraction"] == 0.625
    assert "active_heads_fraction" not in payload["model_info"]["base"]
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _efficiency(prefill: float, kv_per_token: float) -> dict:
    probe = {"batch_size": 1, "prompt_tokens": 128, "decode_tokens": 16, "device": "cpu", "dtype": "torch.float32"}
    return {
        "prefill_tokens_per_s": prefill,
        "decode_tokens_per_s": 10.0,
        "kv_cache_bytes_per_token": kv_per_token,
        "peak_memory_bytes": 512 * 2**20,
        "memory_kind": "cpu_process_peak_rss",
        "probe": {**probe, "threads": 2},
    }


def test_efficiency_beside_the_scores(two_models, tmp_path):
    two_models["base"]["config"]["hf_attn_zoo"]["efficiency"] = _efficiency(200.0, 46080.0)
    two_models["moh"]["config"]["hf_attn_zoo"]["efficiency"] = _efficiency(300.0, 11520.0)
    two_models["stock"] = _results(0.4, 20.0, 0.25)  # lm-eval's own hf class: no measurement
    two_models["broken"] = _results(0.4, 20.0, 0.25)
    two_models["broken"]["config"]["hf_attn_zoo"]["efficiency"] = {"error": "RuntimeError: no cache"}
    rows = {row.metric: row for row in build_efficiency_rows(two_models)}
    assert list(rows) == ["prefill tokens/s", "decode tokens/s", "peak memory (MiB)", "KV cache bytes/token"]
    assert rows["prefill tokens/s"].values == {"base": 200.0, "moh": 300.0, "stock": None, "broken": None}
    assert rows["peak memory (MiB)"].values["moh"] == 512.0 and rows["peak memory (MiB)"].higher_is_better is False

    paths = write_report(two_models, tmp_path / "out")
    markdown = paths["md"].read_text()
    assert "| metric | base | moh | stock | broken |" in markdown
    assert "| prefill tokens/s ↑ | 200.0 | 300.0 (1.50×) | – | – |" in markdown
    assert "| KV cache bytes/token ↓ | 46080.0 | 11520.0 (0.25×) | – | – |" in markdown
    assert "| probe | cpu, float32, 128 + 16 tokens, 2 threads, cpu_process_peak_rss |" in markdown
    assert "| – | failed: RuntimeError: no cache |" in markdown
    payload = json.loads(paths["json"].read_text())
    kv = payload["efficiency"][3]
    assert kv["metric"] == "kv_cache_bytes_per_token" and kv["higher_is_better"] is False
    assert kv["relative"] == {"base": 1.0, "moh": 0.25, "stock": None, "broken": None}
    assert payload["model_info"]["moh"]["efficiency"]["probe"]["prompt_tokens"] == 128


def test_no_efficiency_table_without_measurements(two_models, tmp_path):
    assert build_efficiency_rows(two_models) == []
    paths = write_report(two_models, tmp_path / "out")
    assert "## Efficiency" not in paths["md"].read_text()
    assert json.loads(paths["json"].read_text())["efficiency"] == []


def test_load_results_merges_a_folder(tmp_path):
    run = tmp_path / "lm_eval_out" / "model"
    run.mkdir(parents=True)
    older, newer = _results(0.1, 30.0, 0.2), _results(0.3, 30.0, 0.2)
    del newer["results"]["zoo_lambada_openai"]
    (run / "results_2024-01-01.json").write_text(json.dumps(older))
    (run / "results_2024-01-02.json").write_text(json.dumps(newer))
    os.utime(run / "results_2024-01-01.json", (1, 1))
    merged = load_results(tmp_path / "lm_eval_out")
    assert merged["results"]["zoo_arc_easy"]["acc,none"] == 0.3
    assert merged["results"]["zoo_lambada_openai"]["perplexity,none"] == 30.0
    assert load_results(run / "results_2024-01-01.json")["results"]["zoo_arc_easy"]["acc,none"] == 0.1


def test_load_results_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_results(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError):
        load_results(tmp_path)
    bad = tmp_path / "results_x.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not an lm-eval results file"):
        load_results(bad)


def test_report_cli(two_models, tmp_path, capsys):
    files = []
    for name, res in two_models.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(res))
        files.append(str(path))
    out = tmp_path / "rep"
    assert report_main([*files, "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["models"] == ["base", "moh"]
    assert str(out / "report.md") in capsys.readouterr().out
    assert report_main([*files, "--names", "a,b,c", "--out", str(out)]) == 2
    assert report_main([*files, "--names", "a,a", "--out", str(out)]) == 2
    assert report_main([str(tmp_path / "missing"), "--out", str(out)]) == 1
    assert report_main([]) == 2
