"""Continue-tuning: YAML recipes (`recipe.py`), the Trainer-based runner (`train.py`) and the CLI pieces (`cli.py`).

`recipe.py` re-exports its parts: `recipe_schema.py` (pydantic sections), `recipe_yaml.py` (YAML with line marks,
`_base` includes, overrides), `recipe_checks.py` (`validate_recipe`). `train.py` runs a recipe from `model.py` (load,
patch, init hooks, trainable parameters, final save), `data.py` (packed blocks), `trainer.py` (TrainingArguments,
Trainer subclass, callbacks), `lr_schedule.py`, `muon.py` (`optim.name: muon`) and `run_folder.py` (result,
checkpoints, rerun policy);
`distributed.py` holds ddp / fsdp / deepspeed, `init_hooks.py` the registry of `init` steps, `callback_hooks.py` the
registry of `callbacks` (schedules during training), `distill.py` the `distill` section's teacher and loss.

>>> from hf_attn_zoo.tuning import load_recipe, run_recipe
>>> result = run_recipe("moh/smollm2_quick", overrides=["train.max_steps=10"])
>>> result.final_loss, result.train_tokens_per_second
"""

from __future__ import annotations

from typing import Any

from .init_hooks import INIT_HOOKS, get_init_hook, register_init_hook
from .recipe import Recipe, apply_overrides, find_recipe, load_recipe, recipes_dir, shipped_recipes, validate_recipe

__all__ = [
    "CALLBACKS",
    "INIT_HOOKS",
    "Recipe",
    "TuneResult",
    "apply_overrides",
    "find_recipe",
    "get_init_hook",
    "load_recipe",
    "recipes_dir",
    "register_callback",
    "register_init_hook",
    "run_recipe",
    "shipped_recipes",
    "validate_recipe",
]


def __getattr__(name: str) -> Any:
    # the runner imports transformers.Trainer (seconds); load it only when it is used
    if name in ("run_recipe", "TuneResult"):
        from . import train

        return getattr(train, name)
    if name in ("register_callback", "CALLBACKS"):
        # callbacks are TrainerCallbacks: importing them imports transformers' trainer modules
        from . import callback_hooks

        return getattr(callback_hooks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
