"""Write (or check) the README's generated tables: the methods, their papers, the family x method support table, and
the MoH study
(from its committed `docs/moh_study/report.json`, written by `hf-attn-zoo moh-study`).

    python scripts/readme_tables.py          # rewrite the tables between their markers
    python scripts/readme_tables.py --check  # exit 1 with a diff when the README drifted from the code

Each table sits between `<!-- BEGIN GENERATED: NAME -->` and `<!-- END GENERATED: NAME -->`; `tests/test_readme.py`
runs the check, so a new method, option or family cannot leave the README behind.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
MOH_STUDY = README.parent / "docs" / "moh_study" / "report.json"


def tables() -> dict[str, str]:
    import json

    import hf_attn_zoo
    from hf_attn_zoo.studies.moh import study_markdown
    from hf_attn_zoo.support import families_markdown, methods_markdown, papers_markdown

    return {
        "methods": methods_markdown(hf_attn_zoo.methods()),
        "papers": papers_markdown(hf_attn_zoo.methods()),
        "families": families_markdown(),
        "moh_study": study_markdown(json.loads(MOH_STUDY.read_text())),
    }


def render(text: str, generated: dict[str, str]) -> str:
    for name, table in generated.items():
        pattern = re.compile(rf"(<!-- BEGIN GENERATED: {name} [^\n]*-->\n).*?(<!-- END GENERATED: {name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{README}: no '<!-- BEGIN GENERATED: {name} ... -->' marker")
        text = pattern.sub(lambda m, table=table: m.group(1) + table + "\n" + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report drift instead of rewriting")
    args = parser.parse_args(argv)
    current = README.read_text()
    wanted = render(current, tables())
    if args.check:
        if wanted != current:
            diff = difflib.unified_diff(
                current.splitlines(), wanted.splitlines(), "README.md", "generated", lineterm=""
            )
            print("\n".join(diff))
            print("README.md is out of date: run `python scripts/readme_tables.py`", file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
