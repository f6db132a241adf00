"""The `hf-attn-zoo` command line (in-process)."""

from __future__ import annotations

import torch

import hf_attn_zoo
from hf_attn_zoo.cli import main
from tests.matrix import tiny_model


def test_methods_markdown_table(capsys):
    assert main(["methods", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| method |") and "| `moh` |" in out


def test_methods_lists_decoding_methods_with_their_kind(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "\nmoh: " in out and "\nscmoe (decoding method, not a patch): SCMoE self-contrast decoding" in out
    assert "    use: hf_attn_zoo.decoding.scmoe_generate(" in out
    assert "    beta (float, >= 0, default 0.5): contrast strength >= 0; 0 = greedy" in out
    assert main(["methods", "--markdown"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| method | kind |") and "| `moh` | patch |" in table
    assert "| `scmoe` | decoding | SCMoE" in table
    assert "| yes | `alpha`, `beta`, `weak`, `weak_rank`, `m`, `ban_eos` |" in table


def test_patch_command_refuses_a_decoding_method(tmp_path, capsys):
    source = tmp_path / "src"
    tiny_model("llama").save_pretrained(source)
    assert main(["patch", str(source), "scmoe", str(tmp_path / "out"), "beta=0.5"]) == 2
    assert "error: 'scmoe' is a decoding method, not a patch" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_patch_command_saves_a_loadable_patched_model(tmp_path, capsys):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    source = tmp_path / "src"
    model = tiny_model("qwen2")
    model.save_pretrained(source)
    PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")), unk_token="<unk>"
    ).save_pretrained(source)
    out = tmp_path / "out"
    assert main(["patch", str(source), "moh", str(out), "router=onorm", "top_k=3", "--layers", "0"]) == 0
    reloaded = hf_attn_zoo.from_pretrained(out)
    record = hf_attn_zoo.applied_patches(reloaded)[0]
    assert record["layers"] == [0] and record["options"]["router"] == "onorm" and record["options"]["top_k"] == 3
    assert isinstance(reloaded(torch.randint(3, 100, (1, 4))).logits, torch.Tensor)


def test_bad_option_exits_2_with_one_line(tmp_path, capsys):
    source = tmp_path / "src"
    tiny_model("llama").save_pretrained(source)
    assert main(["patch", str(source), "moh", str(tmp_path / "out"), "top_k=99"]) == 2
    err = capsys.readouterr().err
    assert "error: moh: top_k=99 is out of range: it must be >= 1 and <= the model's query heads (4)" in err
    assert not (tmp_path / "out").exists()


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_analyze_head_usage_writes_the_plot(tmp_path, capsys):
    from tests.tiny import save_tiny_llama

    source = save_tiny_llama(tmp_path / "tiny", vocab_size=300, max_position_embeddings=1024, bos_prefix=False)
    out = tmp_path / "usage.png"
    assert (
        main(
            [
                "analyze",
                "head-usage",
                str(source),
                "--out",
                str(out),
                "--tokens",
                "256",
                "router=qnorm",
                "shared_heads=2",
                "top_k=1",
            ]
        )
        == 0
    )
    assert "mean active fraction 0.750" in capsys.readouterr().out
    assert out.stat().st_size > 1000 and out.with_suffix(".json").exists()


def test_version(capsys):
    from hf_attn_zoo.version import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"hf-attn-zoo {__version__}\n"
