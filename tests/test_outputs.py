"""Finished work is never overwritten: every command that writes a model, plan, profile or report refuses an output
that already holds something else (leaving it byte-identical), replaces it with --overwrite / overwrite=True, and
writes beside the final path so that a crash leaves nothing there that looks finished."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_attn_zoo.cli import main
from hf_attn_zoo.errors import OutputExistsError, ZooError
from hf_attn_zoo.outputs import JOB_MARKER, atomic_output, check_output, claim_folder
from tests.tiny import save_tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(
        tmp_path_factory.mktemp("outputs") / "tiny", vocab_size=256, max_position_embeddings=128, bos_prefix=True
    )


def _foreign(path: Path) -> dict[str, bytes]:
    """A folder holding another model's files."""
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "someone_elses"}')
    (path / "model.safetensors").write_bytes(b"\x00weights of another model")
    return _snapshot(path)


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.stem) and p != path)


# the shared policy


def test_atomic_output_refuses_replaces_and_leaves_nothing_after_a_crash(tmp_path):
    out = tmp_path / "out"
    before = _foreign(out)
    with pytest.raises(OutputExistsError, match=r"--overwrite.*overwrite=True") as error:
        with atomic_output(out):
            raise AssertionError("not reached")
    assert str(out) in str(error.value) and isinstance(error.value, ZooError)
    assert _snapshot(out) == before

    with atomic_output(out, overwrite=True) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith("out.partial-")
        (tmp / "new.txt").write_text("new")
    assert _snapshot(out) == {"new.txt": b"new"} and _siblings(out) == []

    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_output(fresh) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("disk full")
    assert not fresh.exists() and _siblings(fresh) == []

    empty = tmp_path / "empty"
    empty.mkdir()
    check_output(empty)  # an empty folder holds nothing
    plan = tmp_path / "plan.json"
    plan.write_text("old")
    with pytest.raises(OutputExistsError, match="plan.json"):
        check_output(plan)
    with atomic_output(plan, overwrite=True, is_file=True) as tmp:
        assert tmp.suffix == ".json"  # writers that look at the suffix still see it
        tmp.write_text("new")
    assert plan.read_text() == "new" and _siblings(plan) == []


def test_claim_folder_reuses_its_own_job_and_refuses_others(tmp_path):
    work = claim_folder(tmp_path / "work", "demo")
    (work / "results").mkdir()
    assert claim_folder(work, "demo") == work  # a rerun of the same job
    with pytest.raises(OutputExistsError, match="not from `hf-attn-zoo upcycle-study`"):
        claim_folder(work, "upcycle-study")
    legacy = tmp_path / "legacy"
    (legacy / "moe").mkdir(parents=True)
    claim_folder(legacy, "upcycle-study", own=("moe", "tuned"))  # a cache written before the marker existed
    assert (legacy / JOB_MARKER).is_file()
    claim_folder(work, "upcycle-study", overwrite=True)
    assert sorted(p.name for p in work.iterdir()) == [JOB_MARKER]


# each command


def test_patch_refuses_a_foreign_folder_and_overwrites_when_asked(tiny_dir, tmp_path, capsys):
    out = tmp_path / "patched"
    before = _foreign(out)
    assert main(["patch", str(tiny_dir), "moh", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and _snapshot(out) == before
    assert main(["patch", str(tiny_dir), "moh", str(out), "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["hf_attn_zoo"][0]["method"] == "moh"
    assert not (out / "model.safetensors").read_bytes().startswith(b"\x00weights") and _siblings(out) == []


def test_patch_crash_mid_save_leaves_no_folder(tiny_dir, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    original = PreTrainedModel.save_pretrained

    def crash(self, directory, *args, **kwargs):
        original(self, directory, *args, **kwargs)
        raise OSError("killed mid-save")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash)
    out = tmp_path / "patched"
    with pytest.raises(OSError, match="killed mid-save"):
        main(["patch", str(tiny_dir), "moh", str(out)])
    assert not out.exists() and _siblings(out) == []


def test_upcycle_refuses_a_foreign_folder_keeps_it_on_a_crash_and_overwrites(tiny_dir, tmp_path, monkeypatch):
    from hf_attn_zoo.upcycling import upcycle

    out = tmp_path / "moe"
    before = _foreign(out)
    with pytest.raises(OutputExistsError, match="moe"):
        upcycle(tiny_dir, mode="sparse", num_experts=2, output_dir=out)
    assert main(["upcycle", str(tiny_dir), "--mode", "sparse", "--num-experts", "2", "--out", str(out)]) == 2
    assert _snapshot(out) == before

    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-save")

    with monkeypatch.context() as patched:
        from transformers import AutoTokenizer

        patched.setattr(AutoTokenizer, "from_pretrained", crash)  # after the weights, before the tokenizer
        with pytest.raises(RuntimeError, match="killed mid-save"):
            upcycle(tiny_dir, mode="sparse", num_experts=2, output_dir=out, overwrite=True)
    assert _snapshot(out) == before and _siblings(out) == []  # the old folder is only replaced once complete

    assert (
        main(["upcycle", str(tiny_dir), "--mode", "sparse", "--num-experts", "2", "--out", str(out), "--overwrite"])
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert config["hf_attn_zoo_upcycling"]["mode"] == "sparse" and "model.safetensors" in _snapshot(out)
    assert _snapshot(out)["model.safetensors"] != before["model.safetensors"]


def test_moa_profile_and_search_refuse_an_existing_file(tmp_path, capsys):
    for step, out in (("profile", tmp_path / "prof.pt"), ("search", tmp_path / "plan.json")):
        out.write_bytes(b"finished work")
        extra = ["--profile", str(tmp_path / "missing.pt")] if step == "search" else ["--model", "no-such-model"]
        assert main(["moa", step, *extra, "--out", str(out)]) == 2
        assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"finished work"
        # with --overwrite the command gets past the check (and fails on the missing input instead)
        try:
            main(["moa", step, *extra, "--out", str(out), "--overwrite"])
        except OSError:
            pass  # the missing model
        assert "--overwrite" not in capsys.readouterr().err and out.read_bytes() == b"finished work"


def test_report_refuses_a_foreign_folder_and_overwrites(tmp_path, capsys):
    from tests.eval.test_report import _results

    files = []
    for name, acc in (("base", 0.5), ("moh", 0.6)):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(_results(acc, 10.0, 0.3)))
    out = tmp_path / "rep"
    before = _foreign(out)
    assert main(["report", *map(str, files), "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err and _snapshot(out) == before
    assert main(["report", *map(str, files), "--out", str(out), "--overwrite"]) == 0
    assert sorted(_snapshot(out)) == ["report.json", "report.md", "report.png"] and _siblings(out) == []
    assert str(out / "report.md") in capsys.readouterr().out


def test_upcycle_study_and_demo_refuse_a_foreign_folder(tmp_path, capsys):
    for command in ("upcycle-study", "demo"):
        out = tmp_path / command
        before = _foreign(out)
        assert main([command, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"not from `hf-attn-zoo {command}`" in err and "--overwrite" in err
        assert _snapshot(out) == before


def test_upcycle_study_rebuilds_an_interrupted_stage_of_its_own_cache(tmp_path, monkeypatch):
    from hf_attn_zoo.upcycling import pipeline

    calls = []
    monkeypatch.setattr(
        "hf_attn_zoo.upcycling.build.upcycle",
        lambda *a, **k: calls.append(k) or (Path(k["output_dir"]).mkdir(parents=True, exist_ok=True)),
    )
    root = tmp_path / "study"
    (root / "moe" / "sparse").mkdir(parents=True)  # an interrupted build, from before the marker existed
    (root / "moe" / "sparse" / "model.safetensors").write_bytes(b"half")
    pipeline.build_moes({"a": tmp_path}, root, modes=["sparse"])
    assert calls[0]["overwrite"] is True and (root / JOB_MARKER).is_file()
