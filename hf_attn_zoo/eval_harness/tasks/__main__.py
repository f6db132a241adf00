"""`python -m hf_attn_zoo.eval_harness.tasks` prints the task pack's folder, for lm-eval's `--include_path`."""

from hf_attn_zoo.eval_harness.tasks import TASKS_DIR

print(TASKS_DIR)
