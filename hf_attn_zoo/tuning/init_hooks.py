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

import logging
from collections.abc import Callable
from typing import Literal

from .named_functions import register_in, resolve_in

logger = logging.getLogger(__name__)

__all__ = ["INIT_HOOKS", "InitHook", "get_init_hook", "register_init_hook"]

InitHook = Callable[..., None]

INIT_HOOKS: dict[str, InitHook] = {}


def register_init_hook(name: str) -> Callable[[InitHook], InitHook]:
    """Decorator that registers `fn(model, train_dataset, **options)` under `name`."""
    return register_in(INIT_HOOKS, "init hook", name)


def get_init_hook(name: str) -> InitHook:
    """The hook registered under `name`, or the function a `"module:function"` name points at.

    Raises:
        `RecipeError`: unknown name, or a `module:function` that cannot be imported.
    """
    return resolve_in(INIT_HOOKS, "init hook", name)


def _first_blocks(model, train_dataset, tokens: int, batch_size: int) -> list[dict]:
    """The first `tokens` training tokens (at least one block) as batches of `input_ids` on the model's device."""
    import torch

    blocks = max(1, min(len(train_dataset), tokens // len(train_dataset[0]["input_ids"])))
    ids = torch.stack([torch.as_tensor(row) for row in train_dataset[:blocks]["input_ids"]])
    device = next(model.parameters()).device
    return [{"input_ids": chunk.to(device)} for chunk in ids.split(batch_size)]


@register_init_hook("moh_rank_heads")
def moh_rank_heads(model, train_dataset, tokens: int = 4096, batch_size: int = 8) -> None:
    """Order the heads of every MoH layer patched with `head_order="calibrated"` by their mean output norm on the
    first `tokens` training tokens, so the heads that contribute most are shared (see
    `hf_attn_zoo.patches.moh.rank_heads`). List it before `moh_distill_router`."""
    from ..patches.moh import rank_heads

    orders = rank_heads(model, _first_blocks(model, train_dataset, tokens, batch_size))
    first = next(iter(orders.values()))
    logger.info("moh_rank_heads: %d layers ranked; the first: %s", len(orders), first)


@register_init_hook("moh_distill_router")
def moh_distill_router(
    model,
    train_dataset,
    tokens: int = 4096,
    batch_size: int = 8,
    steps: int = 200,
    lr: float = 1e-2,
    loss: Literal["soft", "topk", "pairwise"] = "soft",
    holdout_tokens: int = 1024,
) -> None:
    """Fit the learned MoH routers to the output-norm head ranking on the first `tokens` training tokens.

    See `hf_attn_zoo.patches.moh.distill_router` (`loss`: soft, topk or pairwise): a router fitted this way starts
    continue-tuning from the training-free selection that costs almost no perplexity, instead of from an arbitrary
    one. The next `holdout_tokens` training tokens are not fitted on: the log reports the fit on them too.
    """
    from ..patches.moh import distill_router

    held = max(0, holdout_tokens)
    batches = _first_blocks(model, train_dataset, tokens + held, batch_size)
    total = sum(b["input_ids"].numel() for b in batches)
    held = max(0, min(held, total - tokens))  # a short dataset: the fit keeps its tokens, the held-out share shrinks
    fit = distill_router(model, batches, steps=steps, lr=lr, loss=loss, holdout=held / total)
    message = "moh_distill_router: top-k agreement %.3f (norm recall %.4f) on %d fitting tokens"
    args: list[float] = [fit["topk_agreement"], fit["norm_recall"], fit["tokens"]]
    if "heldout_tokens" in fit:
        message += ", %.3f (%.4f) on %d held-out tokens"
        args += [fit["heldout_topk_agreement"], fit["heldout_norm_recall"], fit["heldout_tokens"]]
    logger.info(message, *args)


@register_init_hook("mla_calibrate")
def mla_calibrate(model, train_dataset, tokens: int = 8192, batch_size: int = 8) -> None:
    """Refit every MLA layer (which pairs keep RoPE, the latent) on the first `tokens` training tokens (see
    `hf_attn_zoo.patches.mla.calibrate`): the actual keys and values instead of the weights alone."""
    from ..patches.mla import calibrate

    fit = calibrate(model, _first_blocks(model, train_dataset, tokens, batch_size))
    logger.info("mla_calibrate: %d layers refitted on %d tokens", fit["layers"], fit["tokens"])
