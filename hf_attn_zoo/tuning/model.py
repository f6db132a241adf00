"""The model of a tuning run: loaded, patched, prepared by the init hooks, its trainable parameters chosen, its
router losses installed, and at the end saved (LoRA merged) as `final/`, loadable with `hf_attn_zoo.from_pretrained`.

Errors name the recipe line that caused them (`RecipeError`), or say how to get a model that is not available offline
(`MissingAssetError`).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from ..assets.model import resolve_model
from ..errors import MissingAssetError, RecipeError, ZooError
from ..loading import from_pretrained
from ..patching import new_module_names, new_parameters, patch
from . import distributed
from .init_hooks import get_init_hook
from .recipe import LoraSection, Recipe

__all__ = [
    "apply_patches",
    "check_moe",
    "install_moe_losses",
    "load_model_and_tokenizer",
    "recipe_callbacks",
    "run_init_hooks",
    "save_final",
    "select_trainable",
]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def load_model_and_tokenizer(recipe: Recipe) -> tuple[torch.nn.Module, Any]:
    """Load the recipe's model (re-applying patches recorded in its config) and its tokenizer."""
    from transformers import AutoTokenizer

    spec = recipe.model
    path = resolve_model(spec.path)
    kwargs: dict[str, Any] = {"dtype": _DTYPES[spec.dtype]}
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    if spec.revision:
        kwargs["revision"] = spec.revision
    try:
        model = from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **({"revision": spec.revision} if spec.revision else {}))
    except OSError as exc:
        raise MissingAssetError(
            f"{recipe.location(('model', 'path'))}: cannot load {str(path)!r} ({exc}). Use a local folder, or "
            "download the model once with network access (`huggingface-cli download ...`)."
        ) from None
    return model, tokenizer


def apply_patches(model: torch.nn.Module, recipe: Recipe) -> None:
    """Patch the model as the recipe's `patches` say, in order; a refused patch names its recipe line."""
    for index, spec in enumerate(recipe.patches):
        try:
            patch(model, spec.method, layers=spec.layers, **spec.options)
        except ZooError as exc:
            raise RecipeError(f"{recipe.location(('patches', index))}: {exc}") from None


def run_init_hooks(model: torch.nn.Module, train_dataset: Any, recipe: Recipe) -> None:
    """Run the recipe's `init` steps on the patched model, in order; a failing hook names its recipe line."""
    for index, step in enumerate(recipe.init):
        _call_step(recipe, ("init", index), "init hook", step, get_init_hook(step.name), model, train_dataset)


def recipe_callbacks(model: torch.nn.Module, recipe: Recipe) -> list[Any]:
    """The recipe's `callbacks` (schedules during training), built for the model; a failing one names its line."""
    from .callback_hooks import get_callback_factory

    return [
        _call_step(recipe, ("callbacks", index), "callback", step, get_callback_factory(step.name), model, recipe)
        for index, step in enumerate(recipe.callbacks)
    ]


def _call_step(recipe: Recipe, loc: tuple, kind: str, step: Any, fn: Any, *args: Any) -> Any:
    """`fn(*args, **step.options)`; bad options (`ZooError`, `TypeError`) become a `RecipeError` at the step's line."""
    try:
        return fn(*args, **step.options)
    except (ZooError, TypeError) as exc:
        raise RecipeError(f"{recipe.location(loc)}: {kind} {step.name!r} failed: {exc}") from None


def check_moe(model: torch.nn.Module, recipe: Recipe) -> None:
    """A `moe` section (or `train.what: moe` / `routers`) needs MoE layers: say so before the data is tokenized."""
    from ..moe_losses import moe_layers

    wanted = [
        loc
        for loc, on in (
            (("moe",), recipe.moe is not None),
            (("train", "what"), recipe.train.what in ("moe", "routers")),
        )
        if on
    ]
    if not wanted:
        return
    try:
        layers = moe_layers(model)
    except ZooError as exc:
        raise RecipeError(f"{recipe.location(wanted[0])}: {exc}") from None
    if not layers:
        raise RecipeError(
            f"{recipe.location(wanted[0])}: the model ({model.config.model_type}, after the patches) has no MoE layer, "
            "so it has no routers to train or to add router losses to. Start from a MoE model (Mixtral, Qwen2-MoE, "
            "Qwen3-MoE, or a dense model upcycled with `hf-attn-zoo upcycle`), or, for a dense baseline, drop the "
            "`moe:` section (on the command line: `moe=null`) and use `train.what: all`, `lora` or `new`."
        )


def install_moe_losses(model: torch.nn.Module, recipe: Recipe) -> Any:
    """The recipe's `moe` router losses on the model (`install_router_losses`'s handle), or `None` without it."""
    if recipe.moe is None:
        return None
    from ..families.spec import resolve_family
    from ..moe_losses import install_router_losses
    from ..wrappers import inner_model

    try:
        handle = install_router_losses(model, recipe.moe.load_balance_weight, recipe.moe.z_loss_weight)
    except ZooError as exc:
        raise RecipeError(f"{recipe.location(('moe',))}: {exc}") from None
    inner = inner_model(model)
    family = resolve_family(inner.config)
    routers = [family.moe_router(inner, i) for i in handle.layers]
    if not any(p.requires_grad for router in routers for p in router.parameters()):
        logger.warning(
            "%s: the routers are frozen under train.what=%s, so the router losses train nothing of theirs; use "
            "`what: moe`, `all` or `lora` to train the routers",
            recipe.location(("moe",)),
            recipe.train.what,
        )
    return handle


def select_trainable(model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    """`train.what`: `all`, `new` (patch-created parameters), `moe` (the MoE blocks + new), `routers` (the MoE
    routers + new) or `lora` (peft)."""
    from ..families.spec import resolve_family

    what = recipe.train.what
    if what == "all":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    try:
        family = resolve_family(model.config)
    except ZooError:
        family = None  # a model without a family adapter (no patches): plain LoRA / `new` still apply
    moe_layers = family.moe_layers(model) if family is not None else []
    if what in ("moe", "routers"):
        # every parameter of the sparse MoE blocks (router, experts, shared expert), or of their routers only, and
        # those the patches created
        part = family.mlp_module if what == "moe" else family.moe_router
        chosen = {id(p) for i in moe_layers for p in part(model, i).parameters()}
        chosen |= {id(p) for p in new_parameters(model).values()}
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) in chosen)
        return model
    if what == "new":
        new = new_parameters(model)
        if not new:
            raise RecipeError(
                f"{recipe.location(('train', 'what'))}: the patches created no parameters (training-free settings, "
                "e.g. moh with router qnorm/onorm), so `what: new` has nothing to train; use `all` or `lora`"
            )
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for parameter in new.values():
            parameter.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lora = recipe.train.lora or LoraSection()
    # the patches' new modules, and a MoE model's routers, are trained fully (and saved) next to the adapters; the
    # router goes by `mlp.gate` (peft matches name suffixes: a bare `gate` would also take `shared_expert_gate`)
    to_save = new_module_names(model)
    if moe_layers:
        to_save.append(f"{family.mlp.module}.{family.mlp.router}")
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        target_parameters=list(lora.target_parameters) or None,
        modules_to_save=sorted(set(to_save)) or None,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise RecipeError(f"{recipe.location(('train', 'lora'))}: {exc}") from None


def save_final(
    trainer: Any, tokenizer: Any, final_dir: Path, recipe: Recipe, use_cache: bool
) -> torch.nn.Module | None:
    """Save the trained model (gathered from the shards, LoRA merged) and the tokenizer into `final_dir`; the saved
    model on process 0, `None` on the others."""
    trainer.accelerator.wait_for_everyone()
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    state_dict = distributed.full_state_dict(trainer) if sharded else None  # a collective: every process
    if not trainer.is_world_process_zero():
        return None
    model = _unsharded(recipe, state_dict) if sharded else trainer.accelerator.unwrap_model(trainer.model)
    model.config.use_cache = use_cache  # the Trainer turns the cache off for training
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    # written beside, then moved into place: a crash mid-save never leaves a `final/` that looks finished
    partial = final_dir.with_name(f"{final_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    partial.rename(final_dir)
    return model


def _unsharded(recipe: Recipe, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The trained model in one process: the recipe's model rebuilt as it was trained (patches, PEFT wrappers),
    then the gathered state dict loaded into it, every key accounted for."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # training is over: without this, a ZeRO-3 run's `from_pretrained` partitions the copy, a collective that
    # process 0 would enter alone
    unset_hf_deepspeed_config()
    model, _ = load_model_and_tokenizer(recipe)
    apply_patches(model, recipe)
    model = select_trainable(model, recipe)
    model.load_state_dict(state_dict, strict=True)
    return model
