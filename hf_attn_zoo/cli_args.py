"""Argument helpers the subcommands of `hf-attn-zoo` share: `key=value` options, prompt sources, model names.

`hf_attn_zoo.cli` and the subcommand modules (`upcycling/cli.py`, `planning/cli.py`, ...) import these from here, so
no subcommand module imports the command-line entry point and the entry point imports no subcommand module at load.
Light on purpose: yaml and the assets are imported when used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import InvalidOptionError

__all__ = ["parse_options", "parse_value", "read_prompts", "resolve_model"]


def parse_value(text: str) -> Any:
    """A command-line value read as YAML: `7` -> 7, `true` -> True, `[0, 2]` -> [0, 2], `onorm` -> "onorm"."""
    import yaml

    return yaml.safe_load(text)


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """`["router=onorm", "top_k=7"]` -> `{"router": "onorm", "top_k": 7}` (values read by `parse_value`)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidOptionError(f"option {pair!r} is not key=value")
        options[key] = parse_value(value)
    return options


def resolve_model(name: str) -> str:
    """A model argument as a path or hub id: `default` is the embedded SmolLM2-135M-Instruct (`assets`)."""
    from . import assets

    return str(assets.resolve_model(name))


def read_prompts(spec: str, count: int = 16) -> list[str]:
    """Prompts from `corpus:NAME` (the first `count` training documents of a packaged corpus, cut to 1000
    characters), a `.json`/`.yaml` list of strings, or a text file with one prompt per non-empty line."""
    if spec.startswith("corpus:"):
        from .assets.corpora import corpus_texts

        return [text[:1000] for text in corpus_texts(spec.removeprefix("corpus:"), split="train")[:count]]
    path = Path(spec)
    if not path.is_file():
        raise InvalidOptionError(f"prompt file {path} does not exist (give a file, or corpus:NAME).")
    if path.suffix in (".json", ".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(path.read_text())
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise InvalidOptionError(f"prompt file {path} must hold a list of strings.")
        prompts = data
    else:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise InvalidOptionError(f"prompt file {path} is empty.")
    return prompts
