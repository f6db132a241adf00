"""Plain lm-eval on the embedded SmolLM2: its own `hf` model on the task pack from its command line (`--include_path`,
in a subprocess), our model class from its Python API, and the two give the same log-likelihoods."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import lm_eval
import pytest

from hf_attn_zoo.assets.model import default_model_path
from hf_attn_zoo.eval_harness import TASKS_DIR, task_manager
from hf_attn_zoo.eval_harness.cli import eval_main


pytestmark = pytest.mark.slow

TASKS = ["zoo_arc_easy", "zoo_piqa"]
LIMIT = 2
# float32 scores of the same requests at batch 1 (lm-eval's hf) and batch 4 (ours): padding to a longer row
# changes the matmul shapes, hence the rounding; measured on SmolLM2 up to 1.5e-5 nats per continuation
LOGLIKELIHOOD_ATOL = 1e-4
# SmolLM2-135M: 30 layers x 3 KV heads x head_dim 64, keys and values, float32
SMOLLM2_KV_BYTES_PER_TOKEN = 30 * 3 * 64 * 2 * 4


def _loglikelihoods(samples: list[dict]) -> dict[int, list[float]]:
    return {s["doc_id"]: [float(resp[0][0]) for resp in s["resps"]] for s in samples}


def _run(argv: list[str], cwd) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def stock_hf(tmp_path_factory) -> dict[str, dict[int, list[float]]]:
    """`lm_eval run --model hf ... --include_path <pack>` from another folder, samples read back per task."""
    cwd = tmp_path_factory.mktemp("plain")
    pack = _run([sys.executable, "-m", "hf_attn_zoo.eval_harness.tasks"], cwd).strip()
    assert pack == str(TASKS_DIR)
    _run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "run",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={default_model_path()}",
            "--include_path",
            pack,
            "--tasks",
            ",".join(TASKS),
            "--limit",
            str(LIMIT),
            "--batch_size",
            "1",
            "--device",
            "cpu",
            "--output_path",
            "out",
            "--log_samples",
        ],
        cwd,
    )
    found = {}
    for task in TASKS:
        (path,) = (cwd / "out").rglob(f"samples_{task}_*.jsonl")
        found[task] = _loglikelihoods([json.loads(line) for line in path.read_text().splitlines()])
    return found


def test_our_class_from_lm_eval_python_api_scores_as_stock_hf(stock_hf):
    results = lm_eval.simple_evaluate(
        model="hf-attn-zoo",  # registered by importing hf_attn_zoo.eval_harness
        model_args="pretrained=default",
        tasks=TASKS,
        limit=LIMIT,
        batch_size=4,
        device="cpu",
        log_samples=True,
        task_manager=task_manager(),
    )
    for task in TASKS:
        ours = _loglikelihoods(results["samples"][task])
        assert sorted(ours) == sorted(stock_hf[task]) == list(range(LIMIT))
        for doc, values in ours.items():
            assert values == pytest.approx(stock_hf[task][doc], abs=LOGLIKELIHOOD_ATOL)
    record = results["config"]["hf_attn_zoo"]["efficiency"]
    assert record["kv_cache_bytes_per_token"] == SMOLLM2_KV_BYTES_PER_TOKEN
    assert record["prefill_tokens_per_s"] > 0 and record["decode_tokens_per_s"] > 0


def test_importing_the_package_registers_the_class_lazily(tmp_path):
    code = (
        "import sys, hf_attn_zoo.eval_harness\n"
        "assert 'hf_attn_zoo.eval_harness.lm_model' not in sys.modules\n"
        "from lm_eval.api.registry import get_model\n"
        "print(get_model('hf-attn-zoo').__name__, get_model('hf').__name__)\n"
    )
    assert _run([sys.executable, "-c", code], tmp_path).split() == ["ZooLM", "HFLM"]


def test_eval_prints_the_pack_folder(capsys):
    assert eval_main(["--task-path"]) == 0
    assert capsys.readouterr().out.strip() == str(TASKS_DIR)
