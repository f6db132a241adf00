"""What scripts and users may rely on from every `hf-attn-zoo` command: help at every level, options in any order,
and the documented exit statuses. The commands are discovered from the dispatcher, so a new one is checked too."""

from __future__ import annotations

import argparse

import pytest

from hf_attn_zoo import cli
from hf_attn_zoo.cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, main
from hf_attn_zoo.moa.cli import _STEPS as MOA_STEPS

# `eval` is lm-eval's own command line (its help is lm-eval's), checked on its own below
COMMANDS = [[name] for name in cli._COMMANDS if name != "eval"]
SUBCOMMANDS = [["analyze", name] for name in cli._ANALYSES] + [["moa", name] for name in MOA_STEPS]


class _Parsed(Exception):
    """Raised instead of running a command, carrying what its parser produced."""

    def __init__(self, namespace: argparse.Namespace) -> None:
        self.namespace = namespace


@pytest.fixture
def helped(monkeypatch):
    """The parsers that printed their help (their actions are inspected instead of the text)."""
    parsers: list[argparse.ArgumentParser] = []
    monkeypatch.setattr(argparse.ArgumentParser, "print_help", lambda self, file=None: parsers.append(self))
    return parsers


@pytest.mark.parametrize("command", COMMANDS + SUBCOMMANDS, ids=" ".join)
def test_help_at_every_level_names_every_argument(command, helped, capsys):
    assert main([*command, "--help"]) == EXIT_OK
    if not helped:  # a dispatcher with its own usage text (`moa`)
        assert "usage" in capsys.readouterr().out.lower()
        return
    parser = helped[-1]
    assert parser.prog == f"hf-attn-zoo {' '.join(command)}"
    silent = [a.dest for a in parser._actions if not a.help and not isinstance(a, argparse._HelpAction)]
    assert not silent, f"arguments without help: {silent}"


def test_eval_help_is_lm_evals_and_exits_0(capsys):
    assert main(["eval", "--help"]) == EXIT_OK
    assert "run" in capsys.readouterr().out


@pytest.fixture
def parsed(monkeypatch):
    """`parsed(argv)`: the namespace a command's parser makes of `argv`, without running the command."""

    def stop(parse):
        def wrapper(self, args=None, namespace=None):
            raise _Parsed(parse(self, args, namespace))

        return wrapper

    for name in ("parse_args", "parse_intermixed_args"):
        monkeypatch.setattr(argparse.ArgumentParser, name, stop(getattr(argparse.ArgumentParser, name)))

    def run(argv: list[str]) -> argparse.Namespace:
        with pytest.raises(_Parsed) as caught:
            main(argv)
        return caught.value.namespace

    return run


@pytest.mark.parametrize(
    "canonical, reordered",
    [
        (
            ["patch", "default", "moh", "out", "top_k=7", "router=onorm", "--layers", "0,1", "--overwrite"],
            ["patch", "--overwrite", "default", "--layers", "0,1", "moh", "out", "top_k=7", "router=onorm"],
        ),
        (
            ["tune", "moh/smollm2_quick", "train.max_steps=3", "--print"],
            ["tune", "--print", "moh/smollm2_quick", "train.max_steps=3"],
        ),
        (
            ["upcycle", "default", "a", "b", "--out", "moe", "--mode", "bam"],
            ["upcycle", "--mode", "bam", "default", "--out", "moe", "a", "b"],
        ),
        (
            ["plan", "llama3-8b", "moh", "top_k=24", "--gpus", "2"],
            ["plan", "--gpus", "2", "llama3-8b", "moh", "top_k=24"],
        ),
        (
            ["analyze", "routing", "default", "mode=attention", "--seq-len", "64"],
            ["analyze", "routing", "--seq-len", "64", "default", "mode=attention"],
        ),
        (
            ["report", "r1", "r2", "--names", "a,b", "--out", "x"],
            ["report", "--out", "x", "r1", "--names", "a,b", "r2"],
        ),
        (["validate", "r1.yaml", "r2.yaml"], ["validate", "r1.yaml", "r2.yaml"]),
    ],
    ids=lambda argv: " ".join(argv[:2]),
)
def test_options_in_any_order(canonical, reordered, parsed):
    assert parsed(reordered) == parsed(canonical)


def test_bad_arguments_exit_2(capsys):
    assert main(["patch", "default"]) == EXIT_USAGE  # missing positionals: argparse's error
    assert "the following arguments are required" in capsys.readouterr().err
    assert main(["analyze", "nothing"]) == EXIT_USAGE
    assert "invalid choice" in capsys.readouterr().err


def test_refused_output_exits_2_and_keeps_the_folder(tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert main(["analyze", "sinks", "default", "--out", str(out)]) == EXIT_USAGE
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "keep me"


def test_validate_exits_1_on_an_invalid_recipe_and_2_on_a_missing_one(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: default\ntrain: {max_steps: -1}\n")
    assert main(["validate", str(bad)]) == EXIT_FAILED
    assert main(["validate", str(tmp_path / "missing.yaml")]) == EXIT_USAGE


def test_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "families_main", interrupted)
    assert main(["families"]) == EXIT_INTERRUPTED
    assert "interrupted" in capsys.readouterr().err
