"""Run `hf-attn-zoo tune` in fresh processes, as users start multi-process runs (the `--nproc N` launcher)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def tune(recipe: Path, nproc: int, *overrides: str, expect_failure: bool = False) -> subprocess.CompletedProcess:
    """`python -m hf_attn_zoo.tuning tune RECIPE --nproc N OVERRIDES` on CPU, one thread per process."""
    command = [sys.executable, "-m", "hf_attn_zoo.tuning", "tune", str(recipe), f"--nproc={nproc}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if expect_failure:
        assert done.returncode != 0, done.stdout[-3000:]
    else:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def loss_history(output_dir: Path) -> list[tuple[int, float]]:
    return [tuple(entry) for entry in json.loads((output_dir / "result.json").read_text())["loss_history"]]
