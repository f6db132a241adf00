"""Schedules a recipe runs during training (`callbacks:` section): named factories of `transformers.TrainerCallback`s.

A factory is a callable `factory(model, recipe, **options) -> TrainerCallback`, called once the model is patched and
its trainable parameters are chosen. Callbacks must derive what they set from `state.global_step`, so that a resumed
run continues the schedule where it stopped.

Register a factory in this module, or anywhere imported before the recipe is validated:

```python
>>> from hf_attn_zoo.tuning.callback_hooks import register_callback
>>> @register_callback("freeze_embeddings_after")
... def freeze_after(model, recipe, steps: int = 100):
...     ...
```

A recipe may also name any importable function directly: `callbacks: [{name: "my_pkg.schedules:warm_router"}]`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback

from ..errors import InvalidOptionError
from .named_functions import register_in, resolve_in

__all__ = ["CALLBACKS", "CallbackFactory", "MoHHeadDropAnneal", "get_callback_factory", "register_callback"]

CallbackFactory = Callable[..., TrainerCallback]

CALLBACKS: dict[str, CallbackFactory] = {}


def register_callback(name: str) -> Callable[[CallbackFactory], CallbackFactory]:
    """Decorator that registers `factory(model, recipe, **options) -> TrainerCallback` under `name`."""
    return register_in(CALLBACKS, "callback", name)


def get_callback_factory(name: str) -> CallbackFactory:
    """The factory registered under `name`, or the function a `"module:function"` name points at.

    Raises:
        `RecipeError`: unknown name, or a `module:function` that cannot be imported.
    """
    return resolve_in(CALLBACKS, "callback", name)


class MoHHeadDropAnneal(TrainerCallback):
    """Gradual head dropping: MoH's unselected heads keep a gate of `1 - drop`, with `drop` rising linearly from
    `start` to 1 over the first `steps` optimizer steps, or the first `fraction` of the run's steps (then 1: plain
    MoH, as saved and loaded).

    The patched model starts as the dense model (`start=0`: every head fully on), and each step takes away a little
    more of the heads its routers drop, so the weights adapt gradually instead of absorbing the whole loss of the
    dropped heads at step 0.
    """

    def __init__(self, model: Any, steps: int | None = None, fraction: float | None = None, start: float = 0.0):
        from ..patches.moh import moh_routers

        if (steps is None) == (fraction is None):
            raise InvalidOptionError("moh_head_drop_anneal: give one of steps and fraction")
        if (steps is not None and steps < 1) or (fraction is not None and not 0 < fraction <= 1):
            raise InvalidOptionError(f"moh_head_drop_anneal: steps={steps} must be >= 1, fraction={fraction} in (0, 1]")
        if not 0.0 <= start <= 1.0:
            raise InvalidOptionError(f"moh_head_drop_anneal: start={start} must be in [0, 1]")
        self.routers = list(moh_routers(model).values())
        if not self.routers:
            raise InvalidOptionError("moh_head_drop_anneal: the model has no MoH layer (patch it with moh first)")
        self.steps, self.fraction, self.start = steps, fraction, start

    def drop_at(self, step: int) -> float:
        """The drop share of unselected heads at optimizer step `step` (with `fraction`: once training began)."""
        if self.steps is None:
            raise RuntimeError("moh_head_drop_anneal: the run's length is known only once training begins")
        return min(1.0, self.start + (1.0 - self.start) * step / self.steps)

    def _set(self, step: int) -> None:
        for router in self.routers:
            router.drop = self.drop_at(step)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.fraction is not None:
            self.steps = max(1, math.ceil(self.fraction * state.max_steps))
        self._set(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self._set(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        for router in self.routers:
            router.drop = 1.0  # whatever the schedule, the saved model is plain MoH


@register_callback("moh_head_drop_anneal")
def moh_head_drop_anneal(
    model: Any, recipe: Any, steps: int | None = None, fraction: float | None = None, start: float = 0.0
) -> TrainerCallback:
    """`MoHHeadDropAnneal` over the MoH routers of `model` (PEFT's router copies included); by default over the
    first half of the run."""
    if steps is None and fraction is None:
        fraction = 0.5
    return MoHHeadDropAnneal(model, steps, fraction, start)
