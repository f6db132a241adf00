"""`patch()` and `unpatch()`: validate everything, then change the model, then record what was done.

Applied patches are recorded in `model.config.hf_attn_zoo` (a list of `{"method", "layers", "options"}`), so
`save_pretrained` persists them and `hf_attn_zoo.from_pretrained` re-applies them before loading the weights.
The live undo handles sit on the model object (`model._zoo_handles`) and are not saved.

Auxiliary losses: one forward hook on the causal LM adds, in training mode, the patches' auxiliary losses and those of
providers registered with `register_aux_loss` (e.g. `hf_attn_zoo.install_router_losses`) to `outputs.loss`, and
returns their sum as `outputs.aux_loss`.

Model card: `save_pretrained` of a patched model also writes README.md, and its `push_to_hub` is
`hf_attn_zoo.push_to_hub` (`sharing/save_hook.py`, set on the instance).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer
from transformers.utils import ModelOutput

from .errors import (
    InvalidInputError,
    InvalidOptionError,
    PatchConflictError,
    UnsupportedArchitectureError,
    ZooError,
)
from .families.spec import resolve_family
from .layers import LayerSelector, resolve_layers
from .registry import PATCHES, PatchHandle, get_patch
from .sharing.save_hook import install_save_hook, remove_save_hook
from .version import __version__
from .wrappers import inner_model

__all__ = [
    "patch",
    "patch_plan",
    "unpatch",
    "applied_patches",
    "aux_loss",
    "new_parameters",
    "new_module_names",
    "register_aux_loss",
]

RECORD_KEY = "hf_attn_zoo"
_HANDLES = "_zoo_handles"
_HOOK = "_zoo_aux_loss_hook"
_PROVIDERS = "_zoo_aux_loss_providers"
_INPUT_HOOK = "_zoo_input_check_hook"
VERSION_KEY = "hf_attn_zoo_version"  # the package version that wrote config.hf_attn_zoo
# written into a patched config as `attn_implementation`: transformers refuses the unknown name in a process without
# hf_attn_zoo, so a plain AutoModelForCausalLM.from_pretrained of a patched checkpoint fails instead of loading dense
# (see loading.py). No "/", "flash", "sdpa", "flex_attention" or "paged|", which transformers parses specially.
PATCHED_ATTENTION = "hf_attn_zoo:load_with_hf_attn_zoo.from_pretrained"


def package_version() -> str:
    return __version__


def applied_patches(model: torch.nn.Module) -> list[dict[str, Any]]:
    """The patch records of `model` (a copy), in the order they were applied."""
    return [dict(r) for r in (getattr(inner_model(model).config, RECORD_KEY, None) or [])]


def _handles(model: torch.nn.Module) -> list[PatchHandle]:
    return model.__dict__.setdefault(_HANDLES, [])


def patch(model: torch.nn.Module, method: str, layers: LayerSelector = "all", **options: Any) -> torch.nn.Module:
    """Patch `model` in place with a method of the zoo and return it.

    Everything is validated before the model changes: on any error the model is left exactly as it was.

    Args:
        model (`PreTrainedModel`): a loaded causal LM of a supported family (see `hf-attn-zoo methods`), or that
            model inside a PEFT, DDP / FSDP / accelerate (`.module`) or `torch.compile` wrapper: the transformers model
            inside is patched and the object passed in is returned.
        method (`str`): the method key, e.g. `"moh"`.
        layers (`str | int | list[int]`, *optional*, defaults to `"all"`): which decoder layers to patch.
        **options: the method's options (see `hf_attn_zoo.methods()`).

    Example:
        >>> model = hf_attn_zoo.patch(model, "moh", router="onorm", top_k=7, shared_heads=0)
    """
    wrapper, model = model, inner_model(model)
    impl = get_patch(method)
    family = resolve_family(model.config)
    reason = impl.refusal(family, model.config)
    if reason is not None:
        raise UnsupportedArchitectureError(f"{method} cannot patch a {family.name} model: {reason}")
    config = impl.configure(options, family, model.config)
    num_layers = len(family.decoder_layers(model))
    layer_ids = resolve_layers(layers, num_layers)
    if not layer_ids:
        raise InvalidOptionError(
            f"layers={layers!r} selects none of the {num_layers} decoder layers of this model, so {method} would patch "
            "nothing; select at least one layer (e.g. 'all', or an index below the layer count)."
        )
    for record in applied_patches(model):
        other = get_patch(record["method"])
        overlap = sorted(set(record["layers"]) & set(layer_ids))
        if overlap and set(other.targets) & set(impl.targets) and (impl.exclusive or other.exclusive):
            raise PatchConflictError(
                f"layers {overlap} already carry a {record['method']!r} patch of their {'/'.join(other.targets)}; "
                f"{method!r} cannot be applied to them as well. Call hf_attn_zoo.unpatch(model) first, or choose "
                "other layers."
            )

    handle = PatchHandle(method, layer_ids, config)
    try:
        impl.apply(model, config, family, layer_ids, handle)
    except BaseException:
        handle.revert()
        raise
    _handles(model).append(handle)
    records = applied_patches(model)
    records.append({"method": method, "layers": layer_ids, "options": config.to_dict()})
    setattr(model.config, RECORD_KEY, records)
    setattr(model.config, VERSION_KEY, package_version())
    model.config.attn_implementation = PATCHED_ATTENTION  # saved to config.json; read by AutoConfig, see loading.py
    _ensure_aux_loss_hook(model)
    _ensure_input_check(model)
    install_save_hook(model)  # save_pretrained also writes the model card (this instance only)
    return wrapper


def patch_plan(model: torch.nn.Module, plan: Sequence[Mapping[str, Any]]) -> torch.nn.Module:
    """Apply several patches as one, in order: a hybrid model runs different methods on disjoint layer sets.

    All or nothing: when an entry is refused, the entries of this plan applied before it are reverted, so the model is
    left as it was. Each entry is what `patch` takes, as a mapping; `save_pretrained` records every entry and
    `from_pretrained` re-applies them in the same order.

    Args:
        model (`PreTrainedModel`): as for `patch`.
        plan (`list[dict]`): entries `{"method": str, "layers": selector (default "all"), **options}`.

    Example (linear attention everywhere but every 4th layer, which keeps softmax attention):
        >>> hf_attn_zoo.patch_plan(model, [
        ...     {"method": "linearize", "layers": "except_every_4th", "feature_map": "hedgehog"},
        ...     {"method": "sliding_window", "layers": "every_4th", "window": 2048},
        ... ])
    """
    if isinstance(plan, Mapping) or not isinstance(plan, Sequence):
        raise InvalidOptionError(
            "a patch plan is a list of entries such as {'method': 'moh', 'layers': 'all'}, "
            f"not a {type(plan).__name__}."
        )
    for index, entry in enumerate(plan):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("method"), str):
            raise InvalidOptionError(
                f"patch plan entry {index} is {entry!r}; each entry is a mapping with a 'method' name, 'layers' and "
                "the method's options."
            )
    inner = inner_model(model)
    start = len(_handles(inner))
    try:
        for index, entry in enumerate(plan):
            options = dict(entry)
            method, layers = options.pop("method"), options.pop("layers", "all")
            try:
                patch(inner, method, layers=layers, **options)
            except ZooError as exc:
                raise type(exc)(f"patch plan entry {index} ({method}): {exc}") from None
    except BaseException:
        _revert_since(inner, start)
        raise
    return model


def _revert_since(model: torch.nn.Module, start: int) -> None:
    """Revert the patches applied after the first `start` ones (newest first) and drop their records."""
    if start == 0:
        unpatch(model)
        return
    handles = _handles(model)
    while len(handles) > start:
        handles.pop().revert()
    setattr(model.config, RECORD_KEY, applied_patches(model)[:start])


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Revert every patch applied to `model` in this process (newest first); outputs become bit-identical.

    Like `patch`, accepts the model inside a PEFT / DDP / `torch.compile` wrapper and returns the object passed in.
    """
    wrapper, model = model, inner_model(model)
    handles = _handles(model)
    while handles:
        handles.pop().revert()
    for key in (RECORD_KEY, VERSION_KEY, "attn_implementation"):
        model.config.__dict__.pop(key, None)
    _drop_aux_loss_hook_if_unused(model)
    hook = model.__dict__.pop(_INPUT_HOOK, None)
    if hook is not None:
        hook.remove()
    remove_save_hook(model)
    return wrapper


def _check_cache(model: torch.nn.Module, cache: Any) -> None:
    """Refuse a cache whose layers are not dynamic (a `StaticCache`: keys in the slots of a fixed-size buffer) when a
    patch of `model` cannot decode over one (`Capabilities.static_cache`): its outputs would be silently wrong."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return
    refusing = [h.method for h in _handles(model) if not PATCHES[h.method].capabilities.static_cache]
    if not refusing:
        return
    for layer in layers:  # a loop, not a generator: Dynamo traces this hook in a compiled model
        if not isinstance(layer, DynamicLayer):
            _refuse_preallocated(cache, layer, refusing)


def _refuse_preallocated(cache: Any, preallocated: Any, refusing: list[str]) -> None:
    methods = list(dict.fromkeys(refusing))
    which = f"the {methods[0]} patch decodes" if len(methods) == 1 else f"the {', '.join(methods)} patches decode"
    raise InvalidInputError(
        f"{which} over a dynamic KV cache, and this call passed a {type(cache).__name__} with pre-allocated "
        f"{type(preallocated).__name__} layers (generate's cache_implementation='static'?); use transformers' "
        "DynamicCache, generate's default (torch.compile works with it: see the README's torch.compile section)."
    )


def _ensure_input_check(model: torch.nn.Module) -> None:
    """A forward pre-hook on the patched causal LM that refuses inputs the patched attention cannot take."""
    if _INPUT_HOOK in model.__dict__:
        return
    model.__dict__[_INPUT_HOOK] = model.register_forward_pre_hook(_check_inputs, with_kwargs=True)


def _check_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: refuse an empty input, one longer than `max_position_embeddings`, and a pre-allocated KV cache
    a patch cannot decode over, each with one clear error."""
    _check_cache(module, kwargs.get("cache", kwargs.get("past_key_values")))
    name, tokens = "input_ids", kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        name, tokens = "inputs_embeds", kwargs.get("inputs_embeds")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2:
        return
    if tokens.shape[1] == 0:
        raise InvalidInputError(
            f"{name} of shape {list(tokens.shape)} holds no tokens; a patched model needs at least one token per "
            "row (drop empty inputs before calling the model)."
        )
    text = getattr(module.config, "text_config", None) or module.config
    limit = int(getattr(text, "max_position_embeddings", 0) or 0)
    if limit and tokens.shape[1] > limit:
        raise InvalidInputError(
            f"a sequence of {tokens.shape[1]} positions is longer than this model supports "
            f"(max_position_embeddings={limit}); shorten the input (patches do not extend the position range)."
        )


def aux_loss(model: torch.nn.Module) -> torch.Tensor | None:
    """The weighted sum of the auxiliary losses (e.g. MoH load balance, MoE router losses) of the last training forward.

    Sums the patches' losses and those of the providers added with `register_aux_loss`. Reading it clears it. A
    patched causal LM already adds it to `outputs.loss` and exposes it as `outputs.aux_loss`, so training loops (and
    `transformers.Trainer`) include it without calling this.
    """
    total = None
    model = _unwrap(model)
    sources = [handle.aux_loss for handle in _handles(model)] + list(model.__dict__.get(_PROVIDERS, ()))
    for source in sources:
        loss = source(model)
        if loss is not None:
            total = loss if total is None else total + loss
    return total


class AuxLossRegistration:
    """What `register_aux_loss` returns: `remove()` takes the provider out again."""

    def __init__(self, model: torch.nn.Module, fn: Callable[[torch.nn.Module], torch.Tensor | None]):
        self.model, self.fn = model, fn

    def remove(self) -> None:
        providers = self.model.__dict__.get(_PROVIDERS, [])
        if self.fn in providers:
            providers.remove(self.fn)
        if not providers:
            self.model.__dict__.pop(_PROVIDERS, None)
        _drop_aux_loss_hook_if_unused(self.model)


def register_aux_loss(
    model: torch.nn.Module, fn: Callable[[torch.nn.Module], torch.Tensor | None]
) -> AuxLossRegistration:
    """Add an auxiliary loss that is not a patch's: `fn(model)` returns the weighted loss of the last forward, or None.

    `model` is the transformers causal LM (not a PEFT/DDP wrapper). `fn` is called by the aux-loss hook after every
    training-mode forward (never in eval mode), with the patches' losses; it should clear what it read. Its loss is
    added to `outputs.loss` and included in `outputs.aux_loss` and `hf_attn_zoo.aux_loss(model)`.
    """
    model = inner_model(model)
    model.__dict__.setdefault(_PROVIDERS, []).append(fn)
    _ensure_aux_loss_hook(model)
    return AuxLossRegistration(model, fn)


def _drop_aux_loss_hook_if_unused(model: torch.nn.Module) -> None:
    if model.__dict__.get(_HANDLES) or model.__dict__.get(_PROVIDERS):
        return
    hook = model.__dict__.pop(_HOOK, None)
    if hook is not None:
        hook.remove()


def _ensure_aux_loss_hook(model: torch.nn.Module) -> None:
    if _HOOK in model.__dict__:
        return

    def add_aux_loss(module, args, output):
        if not module.training:
            return output  # auxiliary losses exist only in training; skip the lookup on every inference step
        total = aux_loss(module)
        if total is None or not isinstance(output, ModelOutput):
            return output
        fields = dict(output)
        if fields.get("loss") is not None:
            fields["loss"] = fields["loss"] + total.to(fields["loss"].dtype)
        own = fields.pop("aux_loss", None)
        if own is not None:
            # the model's own (transformers' MoE `output_router_logits` load balance), which transformers adds to
            # `loss` weighted by `router_aux_loss_coef`: report it too, so that `loss - aux_loss` stays the LM loss
            coef = getattr(module, "router_aux_loss_coef", getattr(module.config, "router_aux_loss_coef", 1.0))
            total = total + coef * own.to(total)
        return _with_aux_loss(type(output))(**fields, aux_loss=total)

    model.__dict__[_HOOK] = model.register_forward_hook(add_aux_loss)


@functools.cache
def _with_aux_loss(output_class: type[ModelOutput]) -> type[ModelOutput]:
    """`output_class` with a declared `aux_loss` field: DDP rebuilds outputs from their declared fields only."""
    if "aux_loss" in {f.name for f in dataclasses.fields(output_class)}:
        return output_class
    return dataclasses.make_dataclass(
        output_class.__name__,
        [("aux_loss", torch.FloatTensor | None, dataclasses.field(default=None))],
        bases=(output_class,),
        namespace={"__module__": output_class.__module__},
    )


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The patched transformers model inside a PEFT, DDP or `torch.compile` wrapper."""
    inner = inner_model(model)
    if _HANDLES in inner.__dict__ or _PROVIDERS in inner.__dict__:
        return inner
    seen = 0
    while _HANDLES not in model.__dict__ and _PROVIDERS not in model.__dict__ and seen < 4:
        inner = getattr(model, "module", None) or getattr(model, "base_model", None) or getattr(model, "model", None)
        if inner is None or inner is model:
            break
        model, seen = inner, seen + 1
    return model


def new_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters created by patches, by their full name in `model` (what recipes train with `what: new`)."""
    created = {id(p) for handle in _handles(_unwrap(model)) for m in handle.modules for p in m.parameters()}
    return {name: p for name, p in model.named_parameters() if id(p) in created}


def new_module_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of the modules created by patches (e.g. `["head_router"]`), for peft's `modules_to_save`."""
    inner = _unwrap(model)
    created = {id(m) for handle in _handles(inner) for m in handle.modules}
    names = {name.rsplit(".", 1)[-1] for name, m in inner.named_modules() if id(m) in created}
    return sorted(names)
