"""What is supported, as the README shows it: the method table, the papers table and the family x method table,
generated from the registries and the family data (`scripts/readme_tables.py` writes them into the README; a test
fails on drift)."""

from __future__ import annotations

import re

from .families.spec import family_specs
from .registry import PATCHES, MethodInfo, get_patch

__all__ = ["families_markdown", "link_arxiv", "methods_markdown", "papers_markdown", "support_matrix"]

# what a patch's `targets` replace, in words
TARGET_WORDS = {
    "attention": "attention module",
    "attention_fn": "attention function",
    "router": "MoE router",
    "experts": "MoE experts",
    "mlp": "MLP",
}
_ARXIV = re.compile(r"arXiv:\s*(\d{4}\.\d{4,5})")


def methods_markdown(infos: list[MethodInfo]) -> str:
    """The table of methods: name, kind, summary, training-free, options."""
    rows = ["| method | kind | what it does | training-free | options |", "|---|---|---|---|---|"]
    for info in infos:
        options = ", ".join(f"`{o.name}`" for o in info.options)
        rows.append(
            f"| `{info.name}` | {info.kind} | {info.summary} | {'yes' if info.training_free else 'no'} | {options} |"
        )
    return "\n".join(rows)


def link_arxiv(text: str) -> str:
    """`text` with every `arXiv:NNNN.NNNNN` a markdown link to the paper."""
    return _ARXIV.sub(lambda m: f"[arXiv:{m.group(1)}](https://arxiv.org/abs/{m.group(1)})", text)


def papers_markdown(infos: list[MethodInfo]) -> str:
    """The table of papers: each method, the paper(s) it implements (arXiv ids linked) and what it replaces."""
    rows = ["| method | paper | replaces |", "|---|---|---|"]
    for info in infos:
        paper = link_arxiv(info.paper)
        replaces = " + ".join(TARGET_WORDS.get(t, t) for t in info.replaces) or "decoding (the model is unchanged)"
        rows.append(f"| `{info.name}` | {paper} | {replaces} |")
    return "\n".join(rows)


def support_matrix() -> dict[str, dict[str, str | None]]:
    """`{family: {method: None (supported) or the reason the patch refuses it}}` for every shipped family."""
    matrix = {}
    for name, spec in sorted(family_specs().items()):
        config = spec.tiny_config()
        matrix[name] = {method: get_patch(method).refusal(spec, config) for method in sorted(PATCHES)}
    return matrix


def families_markdown() -> str:
    """The family x method table; every refusal is footnoted with the reason the patch gives."""
    matrix = support_matrix()
    methods = sorted(PATCHES)
    reasons: list[str] = []
    rows = [
        "| family | model types | " + " | ".join(f"`{m}`" for m in methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for name, row in matrix.items():
        cells = []
        for method in methods:
            reason = row[method]
            if reason is None:
                cells.append("yes")
                continue
            if reason not in reasons:
                reasons.append(reason)
            cells.append(f"no ({reasons.index(reason) + 1})")
        types = ", ".join(f"`{t}`" for t in family_specs()[name].model_types)
        rows.append(f"| {name} | {types} | " + " | ".join(cells) + " |")
    notes = [f"({i}) {reason}" for i, reason in enumerate(reasons, 1)]
    return "\n".join(rows) + "\n\n" + "\n".join(f"- {note}" for note in notes)
