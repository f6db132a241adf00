"""Long-context tasks: passkey prompts fit their window and hide the key once, long-perplexity documents are exact
cuts of the corpus, the scoring is right, and the tasks load through lm-eval (sized with the evaluated tokenizer)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from hf_attn_zoo.assets.model import default_model_path
from hf_attn_zoo.errors import InvalidOptionError
from hf_attn_zoo.eval_harness import evaluate, task_manager
from hf_attn_zoo.eval_harness.tasks import long_context as lc


SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "long_context_eval.py"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)


@pytest.fixture(scope="module")
def stream():
    return lc.corpus_stream()


@pytest.mark.parametrize("length", list(lc.LENGTHS.values()))
def test_passkey_prompts_fill_the_window(tokenizer, length):
    for doc in lc.passkey_docs(length, n_docs=4):
        n_tokens = len(tokenizer.encode(doc["prompt"]))
        assert n_tokens == doc["prompt_tokens"]
        assert length - lc.ANSWER_MARGIN - 4 <= n_tokens <= length - lc.ANSWER_MARGIN


def test_passkey_prompt_layout(tokenizer, stream):
    docs = lc.passkey_docs(2048, n_docs=8)
    assert sorted(doc["depth"] for doc in docs) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    for doc in docs:
        key, prompt = doc["key"], doc["prompt"]
        assert len(key) == 5 and key.isdigit()
        needle = lc.NEEDLE.format(key=key)
        assert prompt.startswith(lc.INSTRUCTION + "\n") and prompt.endswith("\n" + lc.QUESTION)
        assert prompt.count(needle) == 1 and prompt.count(key) == 2
        before, after = prompt[len(lc.INSTRUCTION) + 1 : -len(lc.QUESTION) - 1].split(f"\n{needle}\n")
        # the haystack is one contiguous cut of the held-out text, split at the needle
        assert before + after in stream and len(before + after) > 4000
        n_before, n_after = len(tokenizer.encode(before)), len(tokenizer.encode(after))
        assert n_before / (n_before + n_after) == pytest.approx(doc["depth"], abs=0.01)


def test_passkey_is_deterministic():
    first = lc.passkey_docs(1024, n_docs=5)
    lc._tokenized_stream.cache_clear()
    lc._tokenizer.cache_clear()
    assert lc.passkey_docs(1024, n_docs=5) == first
    assert lc.passkey_docs(1024, n_docs=2) == first[:2]
    assert len({doc["key"] for doc in first}) == 5
    assert [lc.needle_depth(i) for i in range(4)] == pytest.approx([0.1, 0.5, 0.3, 0.7])


def test_passkey_other_corpus_and_tokenizer(tiny_model_dir):
    docs = lc.passkey_docs(1024, n_docs=2, corpus="bible_kjv")
    assert all(doc["corpus"] == "bible_kjv" for doc in docs)
    # sized with the tokenizer it is given (this one prepends <s>, which counts)
    tiny = AutoTokenizer.from_pretrained(tiny_model_dir)
    for doc in lc.passkey_docs(1024, n_docs=2, tokenizer=tiny_model_dir):
        ids = tiny.encode(doc["prompt"])
        assert ids[0] == tiny.bos_token_id
        assert 1024 - lc.ANSWER_MARGIN - 4 <= len(ids) == doc["prompt_tokens"] <= 1024 - lc.ANSWER_MARGIN


@pytest.mark.parametrize(
    ("response", "score"),
    [
        (" {key}", 1.0),
        ("The pass key is {key}", 1.0),
        (" {key} is the pass key", 1.0),
        (" 1{key}", 0.0),
        (" 12345", 0.0),
        (" I do not know", 0.0),
        ("", 0.0),
    ],
)
def test_passkey_filter_and_metric(response, score):
    task = task_manager(metadata={"zoo_passkey_docs": 1}).load(["zoo_passkey_1k"])["tasks"]["zoo_passkey_1k"]
    task.build_all_requests(limit=1, rank=0, world_size=1)
    (instance,) = task.instances
    key = instance.doc["key"]
    assert task.doc_to_target(instance.doc) == key
    instance.resps = [response.format(key=key)]
    task.apply_filters()
    assert task.process_results(instance.doc, [instance.filtered_resps["digits"]]) == {"exact_match": score}


@pytest.mark.parametrize("length", list(lc.LONG_PPL_LENGTHS.values()))
def test_long_ppl_documents(tokenizer, stream, length):
    docs = lc.long_ppl_docs(length)
    assert len(docs) == lc.DEFAULT_LONG_PPL_DOCS
    positions = []
    for doc in docs:
        context, continuation = doc["context"], doc["continuation"]
        n_context = len(tokenizer.encode(context))
        n_whole = len(tokenizer.encode(context + continuation))
        assert (n_context, n_whole - n_context) == (doc["context_tokens"], doc["continuation_tokens"])
        assert doc["continuation_tokens"] == lc.CONTINUATION_TOKENS
        assert length - 1 - 4 <= n_whole <= length - 1
        assert not context[-1].isspace()
        assert doc["continuation_bytes"] == len(continuation.encode("utf-8"))
        # the continuation is the text that follows the context in the corpus
        start = stream.find(context + continuation)
        assert start >= 0
        positions.append(start + len(context))
    assert positions == sorted(positions)
    assert all(b - a >= len(docs[0]["continuation"]) // 2 for a, b in zip(positions, positions[1:]))


def test_long_ppl_score_is_token_level_perplexity():
    task = task_manager().load(["zoo_long_ppl_2k"])["tasks"]["zoo_long_ppl_2k"]
    docs = [
        {"continuation_tokens": 256, "continuation_bytes": 900},
        {"continuation_tokens": 250, "continuation_bytes": 800},
    ]
    items = [lc.long_ppl_results(doc, [(ll, False)]) for doc, ll in zip(docs, (-500.0, -300.0))]
    aggregate = task.aggregation()
    assert aggregate["perplexity"]([i["perplexity"] for i in items]) == pytest.approx(math.exp(800 / 506))
    assert aggregate["byte_perplexity"]([i["byte_perplexity"] for i in items]) == pytest.approx(math.exp(800 / 1700))
    assert aggregate["bits_per_byte"]([i["bits_per_byte"] for i in items]) == pytest.approx(800 / 1700 / math.log(2))
    assert task.higher_is_better() == {"perplexity": False, "byte_perplexity": False, "bits_per_byte": False}


def test_tasks_load_through_lm_eval():
    manager = task_manager()
    passkey = {f"zoo_passkey_{n}" for n in lc.LENGTHS}
    long_ppl = {f"zoo_long_ppl_{n}" for n in lc.LONG_PPL_LENGTHS}
    assert passkey | long_ppl | {"zoo_passkey", "zoo_long_ppl"} <= set(manager.all_tasks)
    loaded = manager.load(["zoo_passkey", "zoo_long_ppl"])["tasks"]
    assert set(loaded) == passkey | long_ppl
    for name, task in loaded.items():
        task.build_all_requests(limit=2, rank=0, world_size=1)
        assert len(task.instances) == 2
        for instance in task.instances:
            doc = instance.doc
            if name in passkey:
                assert len(task.eval_docs) == lc.DEFAULT_PASSKEY_DOCS
                assert instance.request_type == "generate_until"
                assert instance.arguments[0] == doc["prompt"]
                assert instance.arguments[1]["until"] == ["\n", "."] and instance.arguments[1]["max_gen_toks"] == 10
            else:
                assert len(task.eval_docs) == lc.DEFAULT_LONG_PPL_DOCS
                assert instance.request_type == "loglikelihood"
                assert instance.arguments == (doc["context"], doc["continuation"])


def test_metadata_reaches_the_loaders(tiny_model_dir):
    manager = task_manager(
        metadata={
            "zoo_passkey_docs": 3,
            "zoo_long_ppl_docs": 2,
            "zoo_long_ppl_corpus": "bible_kjv",
            "pretrained": str(tiny_model_dir),
        }
    )
    tasks = manager.load(["zoo_passkey_1k", "zoo_long_ppl_2k"])["tasks"]
    assert len(tasks["zoo_passkey_1k"].eval_docs) == 3
    docs = list(tasks["zoo_long_ppl_2k"].eval_docs)
    assert len(docs) == 2 and docs[0]["corpus"] == "bible_kjv"
    assert docs == lc.long_ppl_docs(2048, 2, "bible_kjv", tokenizer=tiny_model_dir)


@pytest.mark.parametrize(
    ("loader", "kwargs", "message"),
    [
        (lc.passkey, {"zoo_length": 4096, "max_length": 2048}, "pass max_length=4096"),
        (lc.long_ppl, {"zoo_length": 8192, "max_length": "4096"}, "pass max_length=8192"),
        (lc.passkey, {"zoo_length": 1024, "zoo_passkey_corpus": "wikipedia"}, "not a corpus"),
        (lc.long_ppl, {"zoo_length": 2048, "zoo_long_ppl_docs": 0}, "positive integer"),
        (lc.long_ppl, {"zoo_length": 8192, "zoo_long_ppl_docs": 100}, "pick a larger corpus"),
        (lc.passkey, {"zoo_length": 1024, "pretrained": "/no/such/model"}, "tokenizer=..."),
    ],
)
def test_bad_metadata_is_named(loader, kwargs, message):
    with pytest.raises(InvalidOptionError, match=message.replace(".", r"\.")):
        loader(**kwargs)


def test_length_beyond_the_model_is_refused(tiny_model_dir):
    # the tiny model holds 2048 positions
    with pytest.raises(InvalidOptionError, match="max_position_embeddings=2048"):
        lc.passkey(zoo_length=4096, pretrained=str(tiny_model_dir))
    # evaluate() tells the loaders its max_length, so a cut context fails before any request runs
    with pytest.raises(InvalidOptionError, match="max_length=1024"):
        evaluate(
            tiny_model_dir, ["zoo_passkey_2k"], limit=1, batch_size=1, device="cpu", model_args={"max_length": 1024}
        )


def test_benchmark_script_skips_unknown_methods(capsys):
    spec = importlib.util.spec_from_file_location("long_context_eval", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.parse_method('sliding_window={"window": 1024, "sinks": 4}') == (
        "sliding_window",
        {"window": 1024, "sinks": 4},
    )
    assert script.parse_lengths("2k,1k,2k") == ["1k", "2k"]
    assert script.task_names(["1k", "8k"]) == ["zoo_passkey_1k", "zoo_passkey_8k", "zoo_long_ppl_8k"]
    runs = script.runnable([("none", {}), ("no_such_method", {}), ("moh", {}), ("scmoe", {}), ("moh", {"top_k": 3})])
    assert runs == [("dense", "none", {}), ("moh", "moh", {}), ("moh-2", "moh", {"top_k": 3})]
    out = capsys.readouterr().out
    assert "skip no_such_method: not a registered patch" in out
    assert "skip scmoe: not a registered patch" in out  # a decoding method, not a patch


@pytest.mark.slow
def test_passkey_end_to_end_on_smollm2():
    results = evaluate(default_model_path(), ["zoo_passkey_1k"], limit=2, batch_size=1, device="cpu", log_samples=True)
    score = results["results"]["zoo_passkey_1k"]["exact_match,digits"]
    samples = results["samples"]["zoo_passkey_1k"]
    assert len(samples) == 2 and 0.0 <= score <= 1.0
    expected = sum(s["filtered_resps"][0] == s["doc"]["key"] for s in samples) / 2
    assert score == expected
    metadata = results["configs"]["zoo_passkey_1k"]["metadata"]
    assert metadata["pretrained"] == str(default_model_path()) and metadata["max_length"] == 2048
