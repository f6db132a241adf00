"""`hf_attn_zoo.push_to_hub` on a local folder standing in for a hub repository (`fake_hub`): exactly the files of a
fresh save are uploaded (never checkpoints, optimizer state, logs, eval output, caches), the model reloads from the
repository bit for bit, stale weight files of an earlier push are deleted, a user's README.md goes up as written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import hf_attn_zoo
from hf_attn_zoo.errors import CheckpointMismatchError, InvalidOptionError, UnknownModelError
from hf_attn_zoo.sharing.model_card import is_own_card
from hf_attn_zoo.sharing.push import push_main, reload_files
from tests.matrix import randomize_new_parameters, tiny_model

REPO = "me/tiny-moh"


def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>", eos_token="</s>"
    )


def _patched():
    model = hf_attn_zoo.patch(tiny_model("llama"), "moh", router="learned", layers=[1])
    randomize_new_parameters(model)
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


def _add_clutter(folder: Path) -> None:
    """What a tuning run or a working folder holds beside the model."""
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "model.safetensors").write_bytes(b"old")
    (folder / "checkpoint-2" / "optimizer.pt").write_bytes(b"state")
    for name in ("optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin", "notes.txt"):
        (folder / name).write_bytes(b"x")
    (folder / "runs" / "events").mkdir(parents=True)
    (folder / "runs" / "events" / "tfevents.1").write_bytes(b"log")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "lock").write_bytes(b"")
    (folder / "eval" / "base").mkdir(parents=True)
    (folder / "eval" / "base" / "results_1.json").write_text('{"results": {}}')


def test_a_folder_is_uploaded_with_exactly_the_files_a_reload_needs(tmp_path: Path, fake_hub):
    model = _patched()
    folder = tmp_path / "tiny-moh"
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    fresh = {p.name for p in folder.iterdir()}
    assert {"README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= fresh
    _add_clutter(folder)

    info = hf_attn_zoo.push_to_hub(folder, REPO)
    assert info.commit_url.startswith(f"https://huggingface.co/{REPO}/")
    assert fake_hub.files(REPO) == fresh  # a fresh save, nothing else
    message, _ = fake_hub.commits[-1]
    assert "(moh)" in message and "hf-attn-zoo" in message

    repo = fake_hub.repo(REPO)
    ids = torch.randint(3, 100, (2, 7))
    torch.testing.assert_close(_logits(hf_attn_zoo.from_pretrained(repo), ids), _logits(model, ids), rtol=0, atol=0)
    card = (repo / "README.md").read_text()
    assert is_own_card(repo / "README.md") and f'hf_attn_zoo.from_pretrained("{REPO}")' in card
    assert "custom_generate" not in card and not (repo / "custom_generate").exists()  # a dense model
    assert (folder / "README.md").read_text() != card  # the local folder is left as it was


def test_a_sharded_push_deletes_the_stale_weights_of_an_earlier_one(tmp_path: Path, fake_hub):
    model = _patched()
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    model.save_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="100KB")
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    (sharded / "model-00099-of-00099.safetensors").write_bytes(b"left over")  # not in the index
    assert reload_files(sharded) == sorted(
        ["config.json", "generation_config.json", "model.safetensors.index.json", *shards]
    )

    hf_attn_zoo.push_to_hub(single, REPO)
    assert "model.safetensors" in fake_hub.files(REPO)
    (fake_hub.repo(REPO) / "LICENSE").write_text("mine")  # a file the push does not manage stays
    hf_attn_zoo.push_to_hub(sharded, REPO)
    files = fake_hub.files(REPO)
    assert "model.safetensors" not in files and "model-00099-of-00099.safetensors" not in files
    kept = {"README.md", "LICENSE", "config.json", "generation_config.json", "model.safetensors.index.json"}
    assert files == kept | set(shards)
    ids = torch.randint(3, 100, (1, 9))
    reloaded = hf_attn_zoo.from_pretrained(fake_hub.repo(REPO))
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), rtol=0, atol=0)


def test_a_model_object_is_saved_with_its_tokenizer_and_pushed(tmp_path: Path, fake_hub):
    model = _patched()
    hf_attn_zoo.push_to_hub(model, REPO, tokenizer=_tokenizer(), base_model="org/base")
    repo = fake_hub.repo(REPO)
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= fake_hub.files(REPO)
    assert "base_model: org/base" in (repo / "README.md").read_text()
    ids = torch.randint(3, 100, (1, 5))
    torch.testing.assert_close(_logits(hf_attn_zoo.from_pretrained(repo), ids), _logits(model, ids), rtol=0, atol=0)

    # model.push_to_hub and save_pretrained(push_to_hub=True) go the same way (transformers' own push would replace
    # the card with an empty one)
    model.push_to_hub("me/direct", commit_message="direct")
    assert fake_hub.files("me/direct") == {"README.md", "config.json", "generation_config.json", "model.safetensors"}
    assert fake_hub.commits[-1][0] == "direct" and is_own_card(fake_hub.repo("me/direct") / "README.md")
    with pytest.raises(InvalidOptionError, match=r"does not take \['tags'\]"):
        model.push_to_hub("me/direct", tags=["mine"])
    model.save_pretrained(tmp_path / "again", push_to_hub=True, repo_id="me/again")
    assert is_own_card(fake_hub.repo("me/again") / "README.md")
    assert 'from_pretrained("me/again")' in (fake_hub.repo("me/again") / "README.md").read_text()


def test_a_users_readme_goes_up_as_written_and_the_command_line(tmp_path: Path, fake_hub, capsys):
    folder = tmp_path / "m"
    _patched().save_pretrained(folder)
    (folder / "README.md").write_text("# my card\n")
    assert push_main([str(folder), REPO, "--message", "first", "--revision", "v1"]) == 0
    assert fake_hub.branches == [(REPO, "v1")]
    assert f"pushed {folder} -> https://huggingface.co/{REPO}/" in capsys.readouterr().out
    assert (fake_hub.repo(REPO) / "README.md").read_text() == "# my card\n"
    assert fake_hub.commits[-1][0] == "first"


def test_the_command_has_help_for_every_argument(monkeypatch):
    import argparse

    parsers: list[argparse.ArgumentParser] = []
    monkeypatch.setattr(argparse.ArgumentParser, "print_help", lambda self, file=None: parsers.append(self))
    with pytest.raises(SystemExit) as exit_:
        push_main(["--help"])
    assert exit_.value.code == 0 and parsers[-1].prog == "hf-attn-zoo push"
    silent = [a.dest for a in parsers[-1]._actions if not a.help and not isinstance(a, argparse._HelpAction)]
    assert not silent


def test_what_cannot_be_pushed_is_refused_with_the_reason(tmp_path: Path, fake_hub):
    with pytest.raises(InvalidOptionError, match="'not a repo id' is not a hub repository id"):
        hf_attn_zoo.push_to_hub(tmp_path, "not a repo id")
    with pytest.raises(UnknownModelError, match="no such folder"):
        hf_attn_zoo.push_to_hub(tmp_path / "missing", REPO)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(UnknownModelError, match="PEFT adapter: merge it first"):
        hf_attn_zoo.push_to_hub(adapter, REPO)
    legacy = tmp_path / "legacy"
    tiny_model("llama").save_pretrained(legacy)
    os.rename(legacy / "model.safetensors", legacy / "pytorch_model.bin")
    with pytest.raises(CheckpointMismatchError, match="holds no model.safetensors .* safetensors checkpoints only"):
        hf_attn_zoo.push_to_hub(legacy, REPO)
    dense = tmp_path / "dense"
    _patched().save_pretrained(dense)
    with pytest.raises(InvalidOptionError, match="custom_generate=True, but SCMoE cannot decode this model: .*no MoE"):
        hf_attn_zoo.push_to_hub(dense, REPO, custom_generate=True)
    assert fake_hub.commits == []  # nothing was uploaded
