"""SCMoE as a hub `custom_generate` repository: `write_custom_generate` writes the folder transformers' convention
expects (generate.py, requirements.txt, a README tagged `custom_generate`), transformers' own loader
(`generate(custom_generate=<folder>, trust_remote_code=True)`) decodes the same tokens as `scmoe_decode`, only with
the opt-in; `push_to_hub` adds the folder to a MoE model's repository, so decoding works from the model repo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from huggingface_hub.repocard import metadata_load
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_attn_zoo
from hf_attn_zoo.decoding import scmoe_decode, write_custom_generate
from hf_attn_zoo.errors import OutputExistsError
from hf_attn_zoo.sharing.model_card import is_own_card
from tests.decoding.conftest import save_tiny_mixtral


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_mixtral(tmp_path_factory.mktemp("tiny_mixtral"))


def _generate(model, tokenizer, **kwargs):
    batch = tokenizer(["def add(a, b):", "import os"], return_tensors="pt", padding=True, padding_side="left")
    kwargs = {"beta": 2.0, "weak": "rank:2", **kwargs}  # beta 2: the contrast changes the tokens of this tiny model
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=8, do_sample=False, **kwargs)


def test_the_written_folder_decodes_like_scmoe_decode_through_transformers(tmp_path: Path, mixtral_dir: Path):
    repo = tmp_path / "scmoe-decoding"
    target = write_custom_generate(repo)
    assert target == repo / "custom_generate"
    assert sorted(p.name for p in target.iterdir()) == ["generate.py", "requirements.txt"]
    assert (target / "requirements.txt").read_text() == f"hf-attn-zoo>={hf_attn_zoo.__version__}\n"
    meta = metadata_load(repo / "README.md")
    assert "custom_generate" in meta["tags"] and meta["library_name"] == "transformers"

    model = AutoModelForCausalLM.from_pretrained(mixtral_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(mixtral_dir)
    reference = _generate(model, tokenizer, custom_generate=scmoe_decode)
    assert not torch.equal(reference, _generate(model, tokenizer, custom_generate=scmoe_decode, beta=0.0))  # not greedy
    assert torch.equal(_generate(model, tokenizer, custom_generate=str(repo), trust_remote_code=True), reference)
    with pytest.raises(ValueError, match="custom generation code"):
        _generate(model, tokenizer, custom_generate=str(repo), trust_remote_code=False)  # remote code is opt-in

    assert write_custom_generate(repo) == target  # the same files again: nothing to do
    (target / "generate.py").write_text("# changed\n")
    with pytest.raises(OutputExistsError, match="already holds other files"):
        write_custom_generate(repo)
    write_custom_generate(repo, overwrite=True)
    assert (target / "generate.py").read_text() != "# changed\n"


def test_a_moe_model_repository_carries_the_decoding(tmp_path: Path, mixtral_dir: Path, fake_hub):
    model = hf_attn_zoo.from_pretrained(mixtral_dir)
    hf_attn_zoo.patch(model, "mote", off={"all": [3]})  # a patched MoE: SCMoE merges the switches into its weak pass
    folder = tmp_path / "tiny-mixtral-mote"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(mixtral_dir).save_pretrained(folder)
    fresh = {p.name for p in folder.iterdir()}

    hf_attn_zoo.push_to_hub(folder, "me/tiny-mixtral-mote")  # custom_generate by default: SCMoE can decode it
    files = fake_hub.files("me/tiny-mixtral-mote")
    assert files == fresh | {"custom_generate/generate.py", "custom_generate/requirements.txt"}
    repo = fake_hub.repo("me/tiny-mixtral-mote")
    card = (repo / "README.md").read_text()
    assert is_own_card(repo / "README.md") and "- custom_generate" in card
    assert 'custom_generate="me/tiny-mixtral-mote", trust_remote_code=True' in card

    reloaded = hf_attn_zoo.from_pretrained(repo).eval()  # the model itself: no remote code
    tokenizer = AutoTokenizer.from_pretrained(repo)
    reference = _generate(model.eval(), tokenizer, custom_generate=scmoe_decode)
    assert torch.equal(_generate(reloaded, tokenizer, custom_generate=scmoe_decode), reference)
    assert torch.equal(_generate(reloaded, tokenizer, custom_generate=str(repo), trust_remote_code=True), reference)

    hf_attn_zoo.push_to_hub(folder, "me/no-decoding", custom_generate=False)
    assert fake_hub.files("me/no-decoding") == fresh

    # written into the saved model folder itself, the card there is rewritten to say so
    write_custom_generate(folder)
    assert "## SCMoE decoding (`custom_generate`)" in (folder / "README.md").read_text()
