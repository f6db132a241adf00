"""Write the zoo_mmlu task files from lm-eval's own `mmlu/default` configs (run once per lm-eval upgrade).

    python hf_attn_zoo/eval_harness/tasks/zoo_mmlu/_generate_configs.py

Each subject keeps lm-eval's description and category; only the task names (`zoo_` prefix) and the data source
differ. The files are committed, so the pack needs no generation step at run time.
"""

from __future__ import annotations

from pathlib import Path

import yaml

import lm_eval.tasks


CATEGORIES = ("stem", "other", "social_sciences", "humanities")
HERE = Path(__file__).resolve().parent


def main() -> None:
    default = Path(lm_eval.tasks.__file__).parent / "mmlu" / "default"
    for path in sorted(default.glob("mmlu_*.yaml")):
        config = yaml.safe_load(path.read_text())
        subject = config["dataset_name"]
        category = config["tag"].removeprefix("mmlu_").removesuffix("_tasks")
        out = {
            "dataset_kwargs": {"zoo_subject": subject},
            "description": config["description"],
            "tag": f"zoo_mmlu_{category}_tasks",
            "include": "_default_template_yaml",
            "task": f"zoo_mmlu_{subject}",
            "task_alias": config["task_alias"],
        }
        (HERE / f"zoo_mmlu_{subject}.yaml").write_text(yaml.dump(out, width=float("inf"), allow_unicode=True))
    for category in CATEGORIES:
        group = {
            "group": f"zoo_mmlu_{category}",
            "group_alias": category,
            "task": [f"zoo_mmlu_{category}_tasks"],
            "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
            "metadata": {"version": 2},
        }
        (HERE / f"_zoo_mmlu_{category}.yaml").write_text(yaml.dump(group, sort_keys=False))


if __name__ == "__main__":
    main()
