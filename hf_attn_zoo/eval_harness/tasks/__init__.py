"""The offline lm-eval task pack: `zoo_*` tasks that score like lm-eval's standard tasks, on packaged data.

Pass `TASKS_DIR` to lm-eval as `--include_path` (the `hf-attn-zoo eval` command does it for you) or to
`lm_eval.tasks.TaskManager(include_path=...)`. `README.md` here lists the tasks and how each one is scored.
"""

from __future__ import annotations

import logging
from pathlib import Path


__all__ = ["TASKS_DIR"]

TASKS_DIR: Path = Path(__file__).resolve().parent


class _DropCustomDatasetNotice(logging.Filter):
    """lm-eval warns once per task that uses `custom_dataset`, i.e. for every `zoo_*` task (57 times for MMLU)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


logging.getLogger("lm_eval.api.task").addFilter(_DropCustomDatasetNotice())
