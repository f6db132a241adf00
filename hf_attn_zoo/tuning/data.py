"""The training text of a tuning run: the recipe's `data.sources` read as documents, split into train and held-out
documents, tokenized and packed into `data.seq_len` blocks (`datasets.Dataset`s, on disk for hub datasets).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import MissingAssetError, RecipeError
from .recipe import CorpusSource, FilesSource, HFDatasetSource, Recipe

__all__ = ["build_datasets"]


def build_datasets(recipe: Recipe, tokenizer: Any) -> tuple[Any, Any | None]:
    """Tokenize the recipe's documents and pack them into `seq_len` blocks (`input_ids` and `labels` columns).

    Documents are split into train / held-out at the document level (`data.held_out_fraction`, chosen by a hash of
    each document's text, so the split does not depend on the seed or the source order), each document ends with
    the EOS token, and the token stream is cut into full blocks (per chunk of 1,000 documents: the tail of each
    chunk that does not fill a block is dropped). Hub datasets stay on disk (Arrow) throughout.

    Returns:
        `tuple[datasets.Dataset, datasets.Dataset | None]`: the training blocks, and the held-out blocks.
    """
    import datasets

    key = _reuse_key(recipe, tokenizer)
    if key is not None and _LAST_PACKED is not None and _LAST_PACKED[0] == key:
        return _LAST_PACKED[1]
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        documents = _documents(recipe)
        fraction = recipe.data.held_out_fraction
        held_out = None
        if fraction > 0:
            if len(documents) < 2:
                raise RecipeError(
                    f"{recipe.location(('data', 'held_out_fraction'))}: the data has {len(documents)} document(s); "
                    "a document-level held-out split needs at least 2"
                )
            keys = documents.map(lambda b: {"_key": [_doc_key(t) for t in b["text"]]}, batched=True)["_key"]
            order = sorted(range(len(keys)), key=keys.__getitem__)
            chosen = set(order[: max(1, round(fraction * len(keys)))])
            held_out = documents.select(sorted(chosen))
            documents = documents.select([i for i in range(len(keys)) if i not in chosen])
        train = _pack(documents, tokenizer, recipe.data.seq_len, recipe.data.num_proc)
        if len(train) == 0:
            raise RecipeError(
                f"{recipe.location(('data', 'seq_len'))}: the training text is shorter than one block of "
                f"{recipe.data.seq_len} tokens"
            )
        evaluation = (
            _pack(held_out, tokenizer, recipe.data.seq_len, recipe.data.num_proc) if held_out is not None else None
        )
    finally:
        if bars:
            datasets.enable_progress_bars()
    packed = (train, evaluation if evaluation is not None and len(evaluation) > 0 else None)
    if key is not None:
        _remember(key, packed)
    return packed


# the last packed corpus data of this process, with its key: a study's runs (its variants, a wsd run's branches) pack
# the same text with the same tokenizer again and again (about 10 s for 9M tokens)
_LAST_PACKED: tuple[str, tuple[Any, Any | None]] | None = None


def _reuse_key(recipe: Recipe, tokenizer: Any) -> str | None:
    """What identifies a packing of corpora (which do not change while a process runs): the data section, where each
    corpus was found, and the tokenizer's vocabulary and special tokens. None for files and hub datasets, which are
    always read again."""
    from ..assets.corpora import corpus_path

    sources = recipe.data.sources
    if not all(isinstance(source, CorpusSource) for source in sources):
        return None
    try:
        found = [str(corpus_path(source.corpus)) for source in sources if isinstance(source, CorpusSource)]
    except MissingAssetError:
        return None  # reported with the recipe's line by `_documents`
    vocab = hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()
    return json.dumps([recipe.data.model_dump(mode="json"), found, vocab, tokenizer.eos_token_id])


def _remember(key: str, packed: tuple[Any, Any | None]) -> None:
    global _LAST_PACKED
    _LAST_PACKED = (key, packed)


def _doc_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="replace")).hexdigest()


_PACK_CHUNK = 1000


def _pack(documents: Any, tokenizer: Any, seq_len: int, num_proc: int | None):
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [row + eos for row in ids]}

    def pack(batch: dict[str, list]) -> dict[str, list]:
        stream = [token for row in batch["input_ids"] for token in row]
        blocks = [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    dataset = documents.map(tokenize, batched=True, remove_columns=documents.column_names, num_proc=num_proc)
    dataset = dataset.map(pack, batched=True, batch_size=_PACK_CHUNK, num_proc=num_proc)
    return dataset.with_format("torch")


def _documents(recipe: Recipe):
    """Every source as one `datasets.Dataset` with a single `text` column (empty documents dropped)."""
    import datasets

    from ..assets.corpora import corpus_texts

    parts = []
    for index, source in enumerate(recipe.data.sources):
        loc = ("data", "sources", index)
        if isinstance(source, CorpusSource):
            try:
                texts = corpus_texts(source.corpus)
            except MissingAssetError as exc:
                raise MissingAssetError(f"{recipe.location(loc + ('corpus',))}: {exc}") from None
            parts.append(datasets.Dataset.from_dict({"text": texts[: source.max_docs]}))
        elif isinstance(source, FilesSource):
            parts.append(datasets.Dataset.from_dict({"text": _read_files(source, recipe, loc)}))
        elif isinstance(source, HFDatasetSource):
            parts.append(_read_hf_dataset(source, recipe, loc))
    documents = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return documents.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)


def _read_files(source: FilesSource, recipe: Recipe, loc: tuple) -> list[str]:
    documents = []
    for file_index, name in enumerate(source.files):
        path = Path(name) if Path(name).is_absolute() else recipe.base_dir / name
        if not path.is_file():
            raise RecipeError(f"{recipe.location(loc + ('files', file_index))}: data file {str(path)!r} does not exist")
        text = path.read_text(encoding="utf-8", errors="replace")
        if source.format == "text":
            documents.append(text)
            continue
        for line_number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecipeError(f"{path}:{line_number}: invalid JSON line ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(source.text_field), str):
                raise RecipeError(
                    f"{path}:{line_number}: no string field {source.text_field!r} "
                    f"(set it with {'.'.join(map(str, loc))}.text_field)"
                )
            documents.append(row[source.text_field])
    return documents


def _read_hf_dataset(source: HFDatasetSource, recipe: Recipe, loc: tuple) -> list[str]:
    import datasets

    try:
        dataset = datasets.load_dataset(source.hf_dataset, source.config, split=source.split)
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as exc:
        raise MissingAssetError(
            f"{recipe.location(loc + ('hf_dataset',))}: cannot load dataset {source.hf_dataset!r} "
            f"(config {source.config!r}, split {source.split!r}) offline: {exc}. Load it once with network access "
            "so that it is cached."
        ) from None
    if source.text_field not in dataset.column_names:
        raise RecipeError(
            f"{recipe.location(loc + ('text_field',))}: dataset {source.hf_dataset!r} has no column "
            f"{source.text_field!r}; columns: {', '.join(dataset.column_names)}"
        )
    if source.max_docs is not None:
        dataset = dataset.select(range(min(source.max_docs, len(dataset))))
    dataset = dataset.select_columns([source.text_field])
    return dataset.rename_column(source.text_field, "text") if source.text_field != "text" else dataset
