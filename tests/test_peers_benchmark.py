"""benchmarks/peers.py, our side only (no peer environment, no network): the `sliding_window` patch equals
transformers' own sliding-window attention on the same weights through prefill and cached decoding, and the
benchmark's per-call peak-memory reading sees an allocation."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def peers():
    # the script sets OMP_WAIT_POLICY for its own run (and its children); keep it out of this process's environment
    saved = os.environ.get("OMP_WAIT_POLICY")
    spec = importlib.util.spec_from_file_location("peers_benchmark", ROOT / "benchmarks" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
        else:
            os.environ["OMP_WAIT_POLICY"] = saved
    yield module
    sys.modules.pop(spec.name, None)


def test_sliding_window_patch_equals_transformers_sliding_window(peers):
    models, _ = peers.sliding_models(layers=2, window=32, smoke=True)
    models.pop("flex_attention")  # compiled flex: minutes of CPU compilation, run by the benchmark itself
    ids = torch.randint(10, 400, (1, 100), generator=torch.Generator().manual_seed(0))
    results = peers.measure_sliding(models, ids, repeats=1, decode=4, skip={})
    ours, native = results["ours"], results["sdpa"]
    assert ours["decode_error"] is None and native["decode_error"] is None
    torch.testing.assert_close(ours["hidden"], native["hidden"], atol=1e-5, rtol=1e-5)
    # the prefill's last token, the untimed first decode step and the 4 timed ones
    assert ours["logits"].shape == native["logits"].shape == (6, 512)
    torch.testing.assert_close(ours["logits"], native["logits"], atol=1e-4, rtol=1e-4)
    for result in (ours, native):
        assert result["prefill"] > 0 and result["decode"] > 0


def test_peak_during_sees_an_allocation(peers):
    def allocate():
        x = torch.ones(16 * 2**20)  # 64 MiB, touched
        return float(x[-1])

    value, peak = peers.peak_during(allocate)
    assert peak is not None, "/proc/self/clear_refs could not reset the peak RSS (the benchmark needs Linux >= 4.0)"
    assert value == 1.0
    assert 60 <= peak < 1024
