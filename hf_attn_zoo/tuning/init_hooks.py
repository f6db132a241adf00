"""Preparation steps a recipe runs after patching and before training (`init:` section).

A hook is a callable `prepare(model, train_dataset, **options) -> None` that changes the patched model in place
(e.g. distilling a new router from the dense attention before continue-tuning). `train_dataset` is the packed
`datasets.Dataset` with `input_ids` blocks. Hooks run on every process, before LoRA adapters are added, and are
skipped when a run resumes from a checkpoint (the checkpoint already holds their result).

Register a hook in this module, or anywhere imported before the recipe is validated:

```python
>>> from hf_attn_zoo.tuning.init_hooks import register_init_hook
>>> @register_init_hook("zero_router")
... def zero_router(model, train_dataset, scale: float = 0.0):
...     ...
```

A recipe may also name any importable function directly: `init: [{name: "my_pkg.hooks:warm_start"}]`.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

from ..errors import RecipeError

logger = logging.getLogger(__name__)

__all__ = ["INIT_HOOKS", "InitHook", "get_init_hook", "register_init_hook"]

InitHook = Callable[..., None]

INIT_HOOKS: dict[str, InitHook] = {}


def register_init_hook(name: str) -> Callable[[InitHook], InitHook]:
    """Decorator that registers `fn(model, train_dataset, **options)` under `name`."""

    def decorator(fn: InitHook) -> InitHook:
        if name in INIT_HOOKS and INIT_HOOKS[name] is not fn:
            raise ValueError(f"an init hook named {name!r} is already registered ({INIT_HOOKS[name].__qualname__})")
        INIT_HOOKS[name] = fn
        return fn

    return decorator


def get_init_hook(name: str) -> InitHook:
    """The hook registered under `name`, or the function a `"module:function"` name points at.

    Raises:
        `RecipeError`: unknown name, or a `module:function` that cannot be imported.
    """
    if name in INIT_HOOKS:
        return INIT_HOOKS[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            fn: Any = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise RecipeError(f"init hook {name!r} cannot be imported: {exc}") from None
        if not callable(fn):
            raise RecipeError(f"init hook {name!r} is not callable")
        return fn
    known = ", ".join(sorted(INIT_HOOKS)) or "none registered"
    raise RecipeError(f"unknown init hook {name!r}; known: {known} (or give 'package.module:function')")


@register_init_hook("moh_distill_router")
def moh_distill_router(
    model, train_dataset, tokens: int = 4096, batch_size: int = 8, steps: int = 200, lr: float = 1e-2
) -> None:
    """Fit the learned MoH routers to the output-norm head ranking on the first `tokens` training tokens.

    See `hf_attn_zoo.patches.moh.distill_router`: a router fitted this way starts continue-tuning from the
    training-free selection that costs almost no perplexity, instead of from an arbitrary one.
    """
    import torch

    from ..patches.moh import distill_router

    blocks = max(1, min(len(train_dataset), tokens // len(train_dataset[0]["input_ids"])))
    ids = torch.stack([torch.as_tensor(row) for row in train_dataset[:blocks]["input_ids"]])
    device = next(model.parameters()).device
    batches = [{"input_ids": chunk.to(device)} for chunk in ids.split(batch_size)]
    fit = distill_router(model, batches, steps=steps, lr=lr)
    logger.info("moh_distill_router: top-k agreement %.2f on %d tokens", fit["topk_agreement"], fit["tokens"])
