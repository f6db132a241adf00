"""The `hf-attn-zoo` lm-eval model class: registration, patch arguments, loading through hf_attn_zoo."""

from __future__ import annotations

import json

import pytest
import torch
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM

import hf_attn_zoo
from hf_attn_zoo.errors import InvalidOptionError
from hf_attn_zoo.eval_harness.lm_model import ZooLM, parse_patch_args


def test_registered():
    assert get_model("hf-attn-zoo") is ZooLM
    assert issubclass(ZooLM, HFLM)


@pytest.mark.parametrize(
    ("patch", "options", "expected"),
    [
        (None, None, None),
        ("None", None, None),
        ("moh", None, [{"method": "moh"}]),
        (
            "moh",
            "router:onorm;top_k:2;balance_loss_weight:0.5;layers:0|1",
            [{"method": "moh", "router": "onorm", "top_k": 2, "balance_loss_weight": 0.5, "layers": [0, 1]}],
        ),
        ("moh", " gate : null ; shared_heads:1 ;", [{"method": "moh", "gate": None, "shared_heads": 1}]),
        ("moh", '{"router": "qnorm", "layers": [1]}', [{"method": "moh", "router": "qnorm", "layers": [1]}]),
        ("moh", {"top_k": 3}, [{"method": "moh", "top_k": 3}]),
        (
            None,
            [{"method": "moh", "top_k": 1}, {"method": "moh", "layers": [1]}],
            [{"method": "moh", "top_k": 1}, {"method": "moh", "layers": [1]}],
        ),
        (None, {"method": "moh", "router": "onorm"}, [{"method": "moh", "router": "onorm"}]),
    ],
)
def test_parse_patch_args(patch, options, expected):
    assert parse_patch_args(patch, options) == expected


def test_parse_patch_args_from_files(tmp_path):
    json_file = tmp_path / "moh.json"
    json_file.write_text(json.dumps({"router": "onorm", "top_k": 2}))
    assert parse_patch_args("moh", str(json_file)) == [{"method": "moh", "router": "onorm", "top_k": 2}]
    yaml_file = tmp_path / "stack.yaml"
    yaml_file.write_text("- method: moh\n  router: qnorm\n  layers: [0]\n")
    assert parse_patch_args(None, yaml_file) == [{"method": "moh", "router": "qnorm", "layers": [0]}]


@pytest.mark.parametrize(
    ("patch", "options", "match"),
    [
        (None, "router:onorm", "method"),
        ("moh", [{"method": "moh"}], "dict of options"),
        ("moh", "router=onorm", "key:value"),
        ("moh", "missing.json", "does not exist"),
        ("moh", "{not json", "JSON"),
    ],
)
def test_parse_patch_args_errors(patch, options, match):
    with pytest.raises(InvalidOptionError, match=match):
        parse_patch_args(patch, options)


def test_loads_and_patches_a_checkpoint(tiny_model_dir):
    lm = ZooLM(
        pretrained=str(tiny_model_dir),
        patch="moh",
        patch_options="router:onorm;top_k:2;layers:1",
        device="cpu",
        batch_size=2,
    )
    records = hf_attn_zoo.applied_patches(lm.model)
    assert [(r["method"], r["layers"], r["options"]["top_k"]) for r in records] == [("moh", [1], 2)]
    info = lm.get_model_info()
    assert info["hf_attn_zoo"]["patches"] == records
    assert info["model_sha"] == ""


def test_saved_patched_checkpoint_comes_back_patched(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = hf_attn_zoo.patch(AutoModelForCausalLM.from_pretrained(tiny_model_dir), "moh", router="onorm", top_k=3)
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path)
    lm = ZooLM(pretrained=str(tmp_path), device="cpu")
    assert hf_attn_zoo.applied_patches(lm.model) == hf_attn_zoo.applied_patches(model)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    torch.testing.assert_close(lm._model_call(ids), model(ids).logits)


def test_patches_a_model_object_in_place(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    lm = ZooLM(pretrained=model, tokenizer=tokenizer, patch="moh", patch_options={"router": "onorm", "top_k": 1})
    assert lm.model is model
    assert [r["method"] for r in hf_attn_zoo.applied_patches(model)] == ["moh"]
    ids = torch.tensor([tokenizer("The cat sat on the mat.").input_ids])
    lm._model_call(ids)
    usage = lm.get_model_info()["hf_attn_zoo"]["head_usage"]
    # top_k=1 of 4 heads, no shared heads: a quarter of the heads are active on every token
    assert usage["mean_active_fraction"] == pytest.approx(0.25)
    assert set(usage["layers"]) == {"0", "1"}


def test_unpatched_model_reports_no_head_usage(tiny_model_dir):
    lm = ZooLM(pretrained=str(tiny_model_dir), device="cpu", efficiency=False)
    info = lm.get_model_info()["hf_attn_zoo"]
    assert info == {"patches": []}


def test_pretrained_default_is_the_embedded_model_as_everywhere_else(monkeypatch):
    from hf_attn_zoo.assets.model import default_model_path

    class Loaded(Exception):
        pass

    def fake_init(self, pretrained, **kwargs):
        raise Loaded(pretrained)  # stop where lm-eval would load `pretrained`

    monkeypatch.setattr(HFLM, "__init__", fake_init)
    with pytest.raises(Loaded) as info:
        ZooLM(pretrained="default")
    assert info.value.args[0] == str(default_model_path())
    with pytest.raises(Loaded) as info:
        ZooLM(pretrained="some-org/some-model")  # a hub id goes to the hub path unchanged
    assert info.value.args[0] == "some-org/some-model"
