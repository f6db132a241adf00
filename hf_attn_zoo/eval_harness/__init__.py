"""Benchmarking with lm-eval: the `hf-attn-zoo` model class, the offline `zoo_*` task pack and the report writer.

>>> from hf_attn_zoo.eval_harness import evaluate, write_report
>>> base = evaluate("smollm2", ["zoo_arc_easy", "zoo_piqa"], limit=200)
>>> moh = evaluate("smollm2", ["zoo_arc_easy", "zoo_piqa"], limit=200, patches=[{"method": "moh", "router": "onorm"}])
>>> write_report({"base": base, "moh": moh}, "report/")

Importing this package registers the model class with lm-eval under `"hf-attn-zoo"` as a lazy entry (lm-eval has no
plugin discovery for models), so `lm_eval.simple_evaluate(model="hf-attn-zoo", ...)` works after
`import hf_attn_zoo.eval_harness`; the class itself, and lm-eval's model code, load when a model is evaluated.
"""

from __future__ import annotations

from hf_attn_zoo.eval_harness.report import load_results, merge_results, write_report
from hf_attn_zoo.eval_harness.runner import evaluate, task_manager
from hf_attn_zoo.eval_harness.tasks import TASKS_DIR


__all__ = ["MODEL_NAME", "TASKS_DIR", "evaluate", "load_results", "merge_results", "task_manager", "write_report"]

MODEL_NAME = "hf-attn-zoo"


def _register_model() -> None:
    try:
        # lm-eval fills its registry with the built-in models only while it is empty: fill it first
        import lm_eval.models  # noqa: F401
        from lm_eval.api.registry import model_registry
    except ImportError:  # the report writer and the task loaders work without lm-eval
        return
    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target="hf_attn_zoo.eval_harness.lm_model:ZooLM")


_register_model()
