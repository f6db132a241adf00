"""Save/load round trips and every way a checkpoint can be wrong."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_attn_zoo
from hf_attn_zoo.errors import CheckpointMismatchError, UnknownMethodError
from tests.matrix import randomize_new_parameters, tiny_model


@pytest.fixture
def saved(tmp_path):
    model = hf_attn_zoo.patch(tiny_model("llama"), "moh", router="learned", layers=[1])
    randomize_new_parameters(model)
    model.save_pretrained(tmp_path)
    return model, tmp_path


def _edit_config(path, fn):
    config = json.loads((path / "config.json").read_text())
    fn(config)
    (path / "config.json").write_text(json.dumps(config))


def test_round_trip_is_exact_and_keeps_the_record(saved):
    model, path = saved
    config = json.loads((path / "config.json").read_text())
    assert config["hf_attn_zoo"][0]["method"] == "moh" and config["hf_attn_zoo"][0]["layers"] == [1]
    reloaded = hf_attn_zoo.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(3, 128, (2, 7))
    assert torch.equal(reloaded(ids).logits, model(ids).logits)
    for name, param in hf_attn_zoo.new_parameters(model).items():
        assert torch.equal(hf_attn_zoo.new_parameters(reloaded)[name], param)


def test_tokenizer_saved_beside_loads_as_usual(saved, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    _, path = saved
    raw = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>").save_pretrained(path)
    assert AutoTokenizer.from_pretrained(path)("hello world").input_ids == [1, 2]


def test_extra_patches_on_load(saved):
    _, path = saved
    model = hf_attn_zoo.from_pretrained(path, patches=[{"method": "moh", "layers": [0], "router": "onorm"}])
    assert [r["layers"] for r in hf_attn_zoo.applied_patches(model)] == [[1], [0]]


def test_unknown_recorded_method_names_the_fix(saved):
    _, path = saved
    _edit_config(path, lambda c: c["hf_attn_zoo"][0].update(method="mixture_of_wizards"))
    with pytest.raises(UnknownMethodError, match="unknown method 'mixture_of_wizards'.*upgrade hf-attn-zoo"):
        hf_attn_zoo.from_pretrained(path)


def test_weights_of_another_shape_are_refused(saved):
    _, path = saved
    _edit_config(path, lambda c: c["hf_attn_zoo"][0]["options"].update(shared_heads=1, routed_heads=3, top_k=2))
    with pytest.raises(CheckpointMismatchError, match="has shape .* in the checkpoint but the recorded patch builds"):
        hf_attn_zoo.from_pretrained(path)


def test_missing_patch_weights_are_refused(saved):
    _, path = saved
    tensors = load_file(path / "model.safetensors")
    save_file(
        {k: v for k, v in tensors.items() if "head_router" not in k},
        path / "model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(CheckpointMismatchError, match="need .* weight\\(s\\) the checkpoint does not have"):
        hf_attn_zoo.from_pretrained(path)


def test_malformed_record_is_refused(saved):
    _, path = saved
    _edit_config(path, lambda c: c["hf_attn_zoo"][0].update(extra=1))
    with pytest.raises(CheckpointMismatchError, match="malformed record"):
        hf_attn_zoo.from_pretrained(path)


def test_bad_recorded_option_is_reported(saved):
    _, path = saved
    _edit_config(path, lambda c: c["hf_attn_zoo"][0]["options"].update(top_k=99))
    with pytest.raises(hf_attn_zoo.errors.InvalidOptionError, match="top_k=99"):
        hf_attn_zoo.from_pretrained(path)


def test_unpatched_checkpoint_loads_like_transformers(tmp_path):
    model = tiny_model("qwen3")
    model.save_pretrained(tmp_path)
    reloaded = hf_attn_zoo.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 128, (1, 5))
    assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert hf_attn_zoo.applied_patches(reloaded) == []
