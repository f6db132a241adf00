"""The README's generated tables match the code (a drift check, like transformers' modular-conversion check)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "readme_tables.py"


def _script():
    spec = importlib.util.spec_from_file_location("readme_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_are_generated_from_the_code(capsys):
    assert _script().main(["--check"]) == 0, capsys.readouterr().out


def test_the_check_reports_a_drifted_table():
    script = _script()
    text = script.README.read_text()
    drifted = text.replace("| `moh` | patch |", "| `moh` | patch (edited by hand) |", 1)
    assert drifted != text
    assert script.render(drifted, script.tables()) == text


def test_families_command_says_what_each_method_does_with_each_family(capsys):
    from hf_attn_zoo.cli import main

    assert main(["families"]) == 0
    out = capsys.readouterr().out
    assert "granitemoe (granitemoe; moe MLP, pre_norm block)" in out
    assert "    moh: no: its attention sinks (`sinks`) live in its own eager attention function" in out
    assert "    mote: yes" in out
