"""benchmarks/gpu_check.py --smoke: the GPU check's code runs on CPU with tiny shapes, with only the GPU machine's
packages (no lm-eval, datasets or gguf there; pydantic travels to it as wheels), so the script cannot rot between
GPU runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# packages the GPU machine does not have; importing any of them fails in the smoke run
ABSENT_ON_GPU = ("lm_eval", "datasets", "gguf")

_RUN = """
import runpy, sys
for name in {absent!r}:
    sys.modules[name] = None  # `import name` now raises ImportError
sys.argv = ["benchmarks/gpu_check.py", "--smoke", "--out", {out!r}]
runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
"""


def test_smoke_run_passes_every_check_and_times_every_row(tmp_path):
    out = tmp_path / "gpu_check.md"
    # as on the GPU machine: the package imported from the repo root, not from an installed copy
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", _RUN.format(absent=ABSENT_ON_GPU, out=str(out))],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["complete"]
    assert {"date", "torch", "transformers", "triton", "device"} <= set(report["header"])
    kinds = {table["kind"] for table in report["tables"]}
    assert kinds == {"correctness", "speed"}
    for table in report["tables"]:
        assert table["rows"], table["title"]
        for row in table["rows"]:
            assert row["status"] == "ok", (table["title"], row)
            for column in table["numeric"]:
                assert isinstance(row[column], (int, float)) and math.isfinite(row[column]), (table["title"], row)
    markdown = out.read_text()
    assert markdown.count("### ") == len(report["tables"])
    assert "| method | model | dtype | error | tol |" in markdown
