"""Benchmarking with lm-eval: the `hf-attn-zoo` model class, the offline `zoo_*` task pack and the report writer.

>>> from hf_attn_zoo.eval_harness import evaluate, write_report
>>> base = evaluate("smollm2", ["zoo_arc_easy", "zoo_piqa"], limit=200)
>>> moh = evaluate("smollm2", ["zoo_arc_easy", "zoo_piqa"], limit=200, patches=[{"method": "moh", "router": "onorm"}])
>>> write_report({"base": base, "moh": moh}, "report/")

lm-eval itself is imported only when a model is evaluated.
"""

from __future__ import annotations

from hf_attn_zoo.eval_harness.report import load_results, merge_results, write_report
from hf_attn_zoo.eval_harness.runner import evaluate, task_manager
from hf_attn_zoo.eval_harness.tasks import TASKS_DIR


__all__ = ["TASKS_DIR", "evaluate", "load_results", "merge_results", "task_manager", "write_report"]
