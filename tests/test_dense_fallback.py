"""Issue 13: a patched checkpoint never loads silently as the dense model through plain transformers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hf_attn_zoo
from hf_attn_zoo.errors import CheckpointMismatchError
from hf_attn_zoo.patching import PATCHED_ATTENTION
from tests.matrix import tiny_model


@pytest.fixture
def saved(moh_checkpoint):
    return moh_checkpoint


def test_plain_transformers_refuses_a_patched_checkpoint(saved):
    _, path = saved
    script = textwrap.dedent(f"""
        import sys
        from transformers import AutoConfig, AutoModelForCausalLM
        config = AutoConfig.from_pretrained({str(path)!r})
        assert config.hf_attn_zoo[0]["method"] == "moh"
        try:
            AutoModelForCausalLM.from_pretrained({str(path)!r})
        except ValueError as error:
            print("REFUSED", error)
        else:
            print("LOADED")
        assert not any(name.startswith("hf_attn_zoo") for name in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "REFUSED" in done.stdout and "load_with_hf_attn_zoo.from_pretrained" in done.stdout, done.stdout


def test_plain_load_where_the_package_is_imported_refuses_to_run(saved):
    _, path = saved
    model = AutoModelForCausalLM.from_pretrained(path)  # builds (planning reads patched configs), but cannot run
    with pytest.raises(CheckpointMismatchError, match="without re-applying its patches.*hf_attn_zoo.from_pretrained"):
        model(torch.tensor([[1, 2, 3]]))


def test_a_deliberate_dense_load_still_works(saved):
    model, path = saved
    dense = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    ids = torch.tensor([[5, 6, 7]])
    assert dense(ids).logits.shape == model(ids).logits.shape


def test_zoo_loader_is_exact_and_keeps_the_marker(saved, tmp_path):
    model, path = saved
    reloaded = hf_attn_zoo.from_pretrained(path).eval()
    ids = torch.randint(3, 128, (2, 7))
    assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert reloaded.config._attn_implementation == "zoo"
    assert json.loads((path / "config.json").read_text())["attn_implementation"] == PATCHED_ATTENTION
    eager = hf_attn_zoo.from_pretrained(path, attn_implementation="eager")
    assert eager.config._zoo_base_attn_implementation == "eager"
    reloaded.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["attn_implementation"] == PATCHED_ATTENTION


def test_unpatched_model_saves_a_plain_config(tmp_path):
    model = hf_attn_zoo.unpatch(hf_attn_zoo.patch(tiny_model("llama"), "moh", router="learned"))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "attn_implementation" not in config and "hf_attn_zoo" not in config
    assert AutoConfig.from_pretrained(tmp_path)._attn_implementation is None
