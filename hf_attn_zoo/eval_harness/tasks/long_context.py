"""Long-context tasks of the pack: passkey retrieval (`zoo_passkey_*`) and long-context perplexity (`zoo_long_ppl_*`).

Both are built from real held-out corpus text (`hf_attn_zoo.assets.corpora.held_out_texts`, concatenated with blank
lines) and sized in tokens of the evaluated model's tokenizer: the loaders receive lm-eval's metadata, which holds
the `model_args` (`pretrained=...`, `tokenizer=...`, `max_length=...`); without them the default model's tokenizer
is used. Every document is deterministic: it depends only on its index, the length, the corpus and the tokenizer.

Metadata keys (`--metadata '{"zoo_passkey_docs": 5}'`, or `metadata=` of `hf_attn_zoo.eval_harness.evaluate`):
`zoo_passkey_corpus`, `zoo_passkey_docs` (default 20), `zoo_long_ppl_corpus`, `zoo_long_ppl_docs` (default 8).
"""

from __future__ import annotations

import functools
import os
import random
from typing import Any

import datasets

from hf_attn_zoo.errors import InvalidOptionError


__all__ = [
    "ANSWER_MARGIN",
    "CONTINUATION_TOKENS",
    "DEFAULT_CORPUS",
    "DEFAULT_LONG_PPL_DOCS",
    "DEFAULT_PASSKEY_DOCS",
    "INSTRUCTION",
    "LENGTHS",
    "LONG_PPL_LENGTHS",
    "NEEDLE",
    "QUESTION",
    "corpus_stream",
    "long_ppl",
    "long_ppl_docs",
    "long_ppl_results",
    "needle_depth",
    "passkey",
    "passkey_docs",
]

LENGTHS: dict[str, int] = {"1k": 1024, "2k": 2048, "4k": 4096, "8k": 8192}
"""Passkey task suffix -> target length in tokens (`zoo_passkey_1k`, ...)."""
LONG_PPL_LENGTHS: dict[str, int] = {"2k": 2048, "4k": 4096, "8k": 8192}
"""Long-perplexity task suffix -> total length in tokens (`zoo_long_ppl_2k`, ...)."""

DEFAULT_CORPUS = "python_stdlib_docs"
DEFAULT_PASSKEY_DOCS = 20
DEFAULT_LONG_PPL_DOCS = 8
ANSWER_MARGIN = 32
"""Tokens left free after a passkey prompt for the answer: prompts hold at most `length - ANSWER_MARGIN` tokens."""
CONTINUATION_TOKENS = 256
"""Tokens scored after each long-perplexity context."""

# Mohtashami & Jaggi (2023), "Landmark Attention", as reused by LongLoRA.
INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"

_SEED = 20230525
_MIN_DEPTH, _MAX_DEPTH = 0.1, 0.9
_FIT_SLACK = 4  # a prompt is accepted when it is at most this many tokens below its budget
_FIT_ATTEMPTS = 6
_DOC_SEPARATOR = "\n\n"


def _resolve_source(value: Any) -> str | None:
    from hf_attn_zoo.assets.model import resolve_model

    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        return None
    return os.fspath(resolve_model(value))


def _tokenizer_source(kwargs: dict[str, Any]) -> str:
    """The tokenizer lm-eval will use: `tokenizer`, else `pretrained` (when strings), else the default model."""
    from hf_attn_zoo.assets.model import default_model_path

    for key in ("tokenizer", "pretrained"):
        source = _resolve_source(kwargs.get(key))
        if source is not None:
            return source
    return os.fspath(default_model_path())


@functools.lru_cache(maxsize=4)
def _tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except OSError as err:
        raise InvalidOptionError(
            f"the long-context tasks size their documents with the model's tokenizer, but {source!r} has none on "
            f"disk ({err}); pass a local folder as model_args pretrained=... or tokenizer=..."
        ) from None


def _model_positions(kwargs: dict[str, Any]) -> int | None:
    """`max_position_embeddings` of the evaluated model (the default model when none is named), if readable."""
    from transformers import AutoConfig

    from hf_attn_zoo.assets.model import default_model_path

    source = _resolve_source(kwargs.get("pretrained")) or os.fspath(default_model_path())
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        return None
    positions = getattr(config, "max_position_embeddings", None)
    return positions if isinstance(positions, int) else None


def _check_length(task: str, length: int, kwargs: dict[str, Any]) -> None:
    positions = _model_positions(kwargs)
    if positions is not None and positions < length:
        raise InvalidOptionError(
            f"{task} needs {length} tokens but the model holds max_position_embeddings={positions}; "
            f"leave this length out or evaluate a model with a longer context."
        )
    max_length = kwargs.get("max_length")
    if max_length is not None and _positive_int("max_length", max_length) < length:
        raise InvalidOptionError(
            f"{task} needs {length} tokens but model_args max_length={max_length}, so lm-eval would cut the left "
            f"of every document; pass max_length={length} (or more) in model_args."
        )


def _positive_int(key: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or number < 1 or str(number) != str(value).strip():
        raise InvalidOptionError(f"{key} must be a positive integer, got {value!r}")
    return number


def _corpus_name(key: str, value: Any) -> str:
    from hf_attn_zoo.assets.corpora import corpus_names

    if value not in corpus_names():
        raise InvalidOptionError(f"{key}={value!r} is not a corpus; pick one of {', '.join(corpus_names())}")
    return str(value)


def corpus_stream(corpus: str = DEFAULT_CORPUS) -> str:
    """Every held-out document of `corpus`, joined by blank lines: the text both task families cut from."""
    from hf_attn_zoo.assets.corpora import held_out_texts

    return _DOC_SEPARATOR.join(held_out_texts(corpus))


@functools.lru_cache(maxsize=8)
def _tokenized_stream(source: str, corpus: str) -> tuple[str, tuple[int, ...]]:
    """`(text, start offset of each token)` of `corpus_stream(corpus)` under the tokenizer at `source`."""
    text = corpus_stream(corpus)
    encoding = _tokenizer(source)(text, add_special_tokens=False, return_offsets_mapping=True)
    return text, tuple(start for start, _ in encoding["offset_mapping"])


class _Stream:
    """The tokenized corpus, cut at token boundaries."""

    def __init__(self, source: str, corpus: str):
        self.corpus = corpus
        self.text, self._starts = _tokenized_stream(source, corpus)

    def __len__(self) -> int:
        return len(self._starts)

    def offset(self, token: int) -> int:
        return self._starts[token] if token < len(self._starts) else len(self.text)

    def span(self, start: int, end: int) -> str:
        return self.text[self.offset(start) : self.offset(end)]


def _count(tokenizer: Any, text: str) -> int:
    # `encode` with the tokenizer's default special tokens, as lm-eval's HFLM encodes a context.
    return len(tokenizer.encode(text))


def needle_depth(index: int) -> float:
    """Depth of the needle in document `index`: 10%..90% of the haystack, spread evenly over any first n documents
    (base-2 van der Corput sequence: 10%, 50%, 30%, 70%, 20%, 60%, ...)."""
    fraction, scale = 0.0, 0.5
    while index:
        index, bit = divmod(index, 2)
        fraction += bit * scale
        scale /= 2
    return _MIN_DEPTH + (_MAX_DEPTH - _MIN_DEPTH) * fraction


def _passkey_prompt(stream: _Stream, start: int, n_haystack: int, depth: float, key: str) -> str:
    n_before = round(depth * n_haystack)
    before = stream.span(start, start + n_before)
    after = stream.span(start + n_before, start + n_haystack)
    return "\n".join([INSTRUCTION, before, NEEDLE.format(key=key), after, QUESTION])


def _passkey_doc(index: int, length: int, stream: _Stream, tokenizer: Any) -> dict[str, Any]:
    budget = length - ANSWER_MARGIN
    depth = needle_depth(index)
    rng = random.Random(_SEED + index)
    key = str(rng.randint(10_000, 99_999))
    start = rng.randrange(len(stream) - budget + 1)
    # the key must occur only in the needle: redraw it while the text the haystack is cut from contains it
    while key in stream.span(start, start + budget):
        key = str(rng.randint(10_000, 99_999))
    n_haystack = budget - _count(tokenizer, _passkey_prompt(stream, start, 0, depth, key))
    for _ in range(_FIT_ATTEMPTS):
        prompt = _passkey_prompt(stream, start, n_haystack, depth, key)
        n_tokens = _count(tokenizer, prompt)
        if budget - _FIT_SLACK <= n_tokens <= budget:
            break
        n_haystack += budget - n_tokens
    while n_tokens > budget:
        n_haystack -= n_tokens - budget
        prompt = _passkey_prompt(stream, start, n_haystack, depth, key)
        n_tokens = _count(tokenizer, prompt)
    return {
        "prompt": prompt,
        "key": key,
        "depth": depth,
        "length": length,
        "prompt_tokens": n_tokens,
        "corpus": stream.corpus,
    }


def passkey_docs(
    length: int,
    n_docs: int = DEFAULT_PASSKEY_DOCS,
    corpus: str = DEFAULT_CORPUS,
    tokenizer: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Passkey-retrieval documents of `length` tokens.

    Each prompt is the instruction, held-out corpus text with the needle "The pass key is NNNNN. Remember it. NNNNN
    is the pass key." at `needle_depth(i)`, then "What is the pass key? The pass key is"; it holds between
    `length - ANSWER_MARGIN - 4` and `length - ANSWER_MARGIN` tokens. Key and haystack offset come from a fixed seed
    per document index.

    Args:
        length (`int`): Target length in tokens.
        n_docs (`int`, *optional*, defaults to 20): Number of documents.
        corpus (`str`, *optional*, defaults to `"python_stdlib_docs"`): Haystack corpus (`corpus_names()`).
        tokenizer (`str | os.PathLike`, *optional*): Tokenizer folder; the default model's when `None`.

    Returns:
        `list[dict]`: Rows with `prompt`, `key` (the target, a string), `depth`, `length`, `prompt_tokens`, `corpus`.

    Raises:
        `InvalidOptionError`: The corpus is unknown or shorter than `length` tokens, or `n_docs` is below 1.
        `MissingAssetError`: The corpus is not on disk.
    """
    source = _tokenizer_source({"tokenizer": tokenizer})
    stream = _Stream(source, _corpus_name("corpus", corpus))
    n_docs = _positive_int("n_docs", n_docs)
    if len(stream) < length:
        raise InvalidOptionError(
            f"corpus {corpus!r} has {len(stream)} held-out tokens, fewer than the {length} a passkey haystack needs; "
            f"pick a larger corpus (bible_kjv, python_docs, shakespeare)."
        )
    tokenizer_obj = _tokenizer(source)
    return [_passkey_doc(i, length, stream, tokenizer_obj) for i in range(n_docs)]


def _scored_tokens(tokenizer: Any, context: str, continuation: str) -> tuple[int, int]:
    """`(context tokens, continuation tokens)` as lm-eval's HFLM splits a loglikelihood request (causal models)."""
    n_context = _count(tokenizer, context)
    return n_context, _count(tokenizer, context + continuation) - n_context


def _long_ppl_doc(start: int, length: int, stream: _Stream, tokenizer: Any) -> dict[str, Any]:
    total = length - 1
    boundary = start + total - CONTINUATION_TOKENS
    # a context ending in whitespace would have it moved into the continuation by lm-eval
    while stream.text[stream.offset(boundary) - 1].isspace():
        boundary -= 1
    continuation = stream.span(boundary, boundary + CONTINUATION_TOKENS)
    while True:
        context = stream.span(start, boundary)
        n_context, n_continuation = _scored_tokens(tokenizer, context, continuation)
        if n_context + n_continuation <= total:
            break
        # re-encoding at the cut can merge differently; drop the excess from the far end of the context
        start += n_context + n_continuation - total
    return {
        "context": context,
        "continuation": continuation,
        "context_tokens": n_context,
        "continuation_tokens": n_continuation,
        "continuation_bytes": len(continuation.encode("utf-8")),
        "length": length,
        "corpus": stream.corpus,
    }


def long_ppl_docs(
    length: int,
    n_docs: int = DEFAULT_LONG_PPL_DOCS,
    corpus: str = DEFAULT_CORPUS,
    tokenizer: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Long-context perplexity documents: a context of about `length - 1 - 256` tokens and the next 256 tokens.

    Windows of `length - 1` tokens start at evenly spaced token offsets of `corpus_stream(corpus)`, from its start
    to its end; they do not overlap when the corpus holds `n_docs * (length - 1)` tokens, and the scored
    continuations never overlap. The context never ends in whitespace, so lm-eval scores exactly `continuation`.

    Args:
        length (`int`): Tokens per window, context and continuation included, plus one (a window holds
            `length - 1` tokens, so the model reads at most `length - 2` positions).
        n_docs (`int`, *optional*, defaults to 8): Number of documents.
        corpus (`str`, *optional*, defaults to `"python_stdlib_docs"`): Corpus name (`corpus_names()`).
        tokenizer (`str | os.PathLike`, *optional*): Tokenizer folder; the default model's when `None`.

    Returns:
        `list[dict]`: Rows with `context`, `continuation`, `context_tokens`, `continuation_tokens` (what lm-eval
        scores), `continuation_bytes`, `length`, `corpus`.

    Raises:
        `InvalidOptionError`: Unknown corpus, `n_docs` below 1, or a corpus too short for `n_docs` windows.
        `MissingAssetError`: The corpus is not on disk.
    """
    source = _tokenizer_source({"tokenizer": tokenizer})
    stream = _Stream(source, _corpus_name("corpus", corpus))
    n_docs = _positive_int("n_docs", n_docs)
    room = len(stream) - (length - 1)
    if room < (n_docs - 1) * CONTINUATION_TOKENS:
        raise InvalidOptionError(
            f"corpus {corpus!r} has {len(stream)} held-out tokens, too few for {n_docs} windows of {length - 1} "
            f"tokens with distinct continuations; ask for fewer docs or pick a larger corpus (bible_kjv, python_docs)."
        )
    step = room / (n_docs - 1) if n_docs > 1 else 0.0
    tokenizer_obj = _tokenizer(source)
    return [_long_ppl_doc(round(i * step), length, stream, tokenizer_obj) for i in range(n_docs)]


def passkey(zoo_length: int, **kwargs: Any) -> datasets.DatasetDict:
    """Loader of `zoo_passkey_*`: `zoo_length` from the task's `dataset_kwargs`, the rest from lm-eval's metadata."""
    length = int(zoo_length)
    _check_length(f"zoo_passkey ({length} tokens)", length, kwargs)
    docs = passkey_docs(
        length,
        _positive_int("zoo_passkey_docs", kwargs.get("zoo_passkey_docs", DEFAULT_PASSKEY_DOCS)),
        _corpus_name("zoo_passkey_corpus", kwargs.get("zoo_passkey_corpus", DEFAULT_CORPUS)),
        _tokenizer_source(kwargs),
    )
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def long_ppl(zoo_length: int, **kwargs: Any) -> datasets.DatasetDict:
    """Loader of `zoo_long_ppl_*`: `zoo_length` from the task's `dataset_kwargs`, the rest from lm-eval's metadata."""
    length = int(zoo_length)
    _check_length(f"zoo_long_ppl ({length} tokens)", length, kwargs)
    docs = long_ppl_docs(
        length,
        _positive_int("zoo_long_ppl_docs", kwargs.get("zoo_long_ppl_docs", DEFAULT_LONG_PPL_DOCS)),
        _corpus_name("zoo_long_ppl_corpus", kwargs.get("zoo_long_ppl_corpus", DEFAULT_CORPUS)),
        _tokenizer_source(kwargs),
    )
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def long_ppl_results(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, tuple[float, int]]:
    """Per-document `(summed log-likelihood, tokens or bytes)` pairs; `weighted_perplexity` turns them into
    exp(-sum ll / sum tokens), i.e. token-level perplexity over every scored continuation."""
    loglikelihood, _ = results[0]
    return {
        "perplexity": (loglikelihood, doc["continuation_tokens"]),
        "byte_perplexity": (loglikelihood, doc["continuation_bytes"]),
        "bits_per_byte": (loglikelihood, doc["continuation_bytes"]),
    }
