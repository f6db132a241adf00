"""The README's main job, `hf-attn-zoo demo`, end to end at a smoke size (real SmolLM2, real data, offline)."""

from __future__ import annotations

import json

import pytest

import hf_attn_zoo
from hf_attn_zoo.demo import demo_main

pytestmark = pytest.mark.slow


def test_demo_patches_tunes_evaluates_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    assert (
        demo_main(["--out", str(out), "--steps", "2", "--limit", "4", "--ppl-docs", "1", "--tasks", "zoo_arc_easy"])
        == 0
    )
    printed = capsys.readouterr().out
    for step in range(1, 6):
        assert f"[{step}/5]" in printed
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").exists() and (out / "report.png").stat().st_size > 1000
    assert (out / "head_usage.png").exists()
    text = (out / "report.md").read_text()
    for name in ("smollm2 (base)", "moh (patched, untuned)", "moh (tuned)", "dense (tuned, same data)"):
        assert name in text
    assert "zoo_arc_easy" in text and "zoo_corpus_ppl" in text
    assert report  # rows were written
    tuned = hf_attn_zoo.from_pretrained(out / "moh_tuned" / "final")
    assert [r["method"] for r in hf_attn_zoo.applied_patches(tuned)] == ["moh"]
    assert "hf-attn-zoo tune dense/smollm2_quick" in printed
