"""Issue 13: what `hf_attn_zoo.from_pretrained` says about a corrupt weights file, a folder that does not exist, and
a checkpoint written by a newer hf-attn-zoo or recording an option this version does not know."""

from __future__ import annotations

import json
import os
import warnings

import pytest

import hf_attn_zoo
from hf_attn_zoo.errors import (
    CorruptCheckpointError,
    InvalidOptionError,
    UnknownMethodError,
    UnknownModelError,
    UnsupportedCheckpointError,
)


@pytest.fixture
def saved(moh_checkpoint, tmp_path):
    _, saved_once = moh_checkpoint
    for name in os.listdir(saved_once):
        (tmp_path / name).write_bytes((saved_once / name).read_bytes())
    return tmp_path


def _edit_config(path, fn):
    config = json.loads((path / "config.json").read_text())
    fn(config)
    (path / "config.json").write_text(json.dumps(config))


def test_saving_records_the_package_version(saved):
    config = json.loads((saved / "config.json").read_text())
    assert config["hf_attn_zoo_version"] == hf_attn_zoo.__version__


def test_truncated_weights_name_the_file_and_the_fix(saved):
    weights = saved / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 100)
    with pytest.raises(
        CorruptCheckpointError,
        match=f"{weights}: the weights file cannot be read .*truncated or corrupt.*save_pretrained",
    ):
        hf_attn_zoo.from_pretrained(saved)


def test_garbage_weights_name_the_file(saved):
    weights = saved / "model.safetensors"
    with open(weights, "r+b") as f:
        f.write(b"\xff" * 16)
    with pytest.raises(CorruptCheckpointError, match=f"{weights}: the weights file cannot be read"):
        hf_attn_zoo.from_pretrained(saved)


@pytest.mark.parametrize("path", ["./no/such/model", "~/no-such-model-here", "/no/such/model", "a/b/c"])
def test_missing_folder_says_it_does_not_exist(path):
    with pytest.raises(UnknownModelError, match="no such folder"):
        hf_attn_zoo.from_pretrained(path)


def test_missing_absolute_folder_says_it_does_not_exist(tmp_path):
    with pytest.raises(UnknownModelError, match=f"{tmp_path / 'missing'}: no such folder"):
        hf_attn_zoo.from_pretrained(tmp_path / "missing")


def test_hub_id_is_not_taken_for_a_folder():
    with pytest.raises(OSError):  # offline here: transformers' own message about the hub, not "no such folder"
        hf_attn_zoo.from_pretrained("no-such-org/no-such-model")


def test_newer_checkpoint_with_an_unknown_option_says_so(saved):
    def newer(config):
        config["hf_attn_zoo_version"] = "99.0"
        config["hf_attn_zoo"][0]["options"]["future_option"] = 1

    _edit_config(saved, newer)
    message = r"config.hf_attn_zoo\[0\] \('moh', written by hf-attn-zoo 99.0; installed: .*future_option.*newer"
    with pytest.raises(UnsupportedCheckpointError, match=message + " hf-attn-zoo: upgrade"):
        hf_attn_zoo.from_pretrained(saved)


def test_newer_checkpoint_that_loads_warns(saved):
    _edit_config(saved, lambda c: c.update(hf_attn_zoo_version="99.0"))
    with pytest.warns(UserWarning, match="saved by hf-attn-zoo 99.0, newer than the installed"):
        model = hf_attn_zoo.from_pretrained(saved)
    assert hf_attn_zoo.applied_patches(model)[0]["method"] == "moh"


def test_unknown_recorded_option_says_it_comes_from_the_checkpoint(saved):
    _edit_config(saved, lambda c: c["hf_attn_zoo"][0]["options"].update(future_option=1))
    with pytest.raises(
        InvalidOptionError,
        match=rf"{saved}: the patch recorded in config.hf_attn_zoo\[0\] \('moh', "
        rf"written by hf-attn-zoo {hf_attn_zoo.__version__}.*future_option",
    ):
        hf_attn_zoo.from_pretrained(saved)


def test_checkpoint_without_a_version_says_so(saved):
    def old(config):
        del config["hf_attn_zoo_version"]
        config["hf_attn_zoo"][0]["method"] = "mixture_of_wizards"

    _edit_config(saved, old)
    with pytest.raises(UnknownMethodError, match="an hf-attn-zoo that did not record its version.*unknown method"):
        hf_attn_zoo.from_pretrained(saved)


def test_current_checkpoint_loads_without_warnings(saved):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*hf-attn-zoo.*")
        hf_attn_zoo.from_pretrained(saved)
