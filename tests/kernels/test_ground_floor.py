"""The kernels are the ground floor: they import nothing of the package but other kernels and the error types."""

from __future__ import annotations

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[2] / "hf_attn_zoo" / "kernels"
ALLOWED = {"hf_attn_zoo.kernels", "hf_attn_zoo.errors"}


def _package_imports(path: Path) -> set[str]:
    """Every hf_attn_zoo module `path` imports (module level or inside functions), as absolute names."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names if a.name.split(".")[0] == "hf_attn_zoo"}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if (node.module or "").split(".")[0] == "hf_attn_zoo":
                    imported.add(node.module)
                continue
            base = ["hf_attn_zoo", "kernels"][: 3 - node.level] if node.level <= 2 else []
            imported.add(".".join(base + ([node.module] if node.module else [])) or "hf_attn_zoo")
    return imported


def test_kernels_import_only_kernels_and_errors():
    offending = {}
    for path in sorted(KERNELS.rglob("*.py")):
        outside = {m for m in _package_imports(path) if not any(m == a or m.startswith(a + ".") for a in ALLOWED)}
        if outside:
            offending[path.name] = sorted(outside)
    assert not offending, f"kernels importing the floors above them: {offending}"


def test_the_check_sees_a_relative_import_of_the_registry(tmp_path):
    module = tmp_path / "k.py"
    module.write_text("from ..registry import get_patch\nfrom .masks import left_padding\n")
    assert _package_imports(module) == {"hf_attn_zoo.registry", "hf_attn_zoo.kernels.masks"}
