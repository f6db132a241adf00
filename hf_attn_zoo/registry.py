"""The patch registry: the `Patch` base class every method subclasses, and `register_patch`."""

from __future__ import annotations

import abc
import dataclasses
import re
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from .errors import InvalidOptionError, UnknownMethodError
from .options import bounds_text, check_bounds

if typing.TYPE_CHECKING:
    from transformers import PretrainedConfig

    from .families.spec import FamilySpec

__all__ = [
    "Capabilities",
    "MethodInfo",
    "MethodKind",
    "OptionInfo",
    "PATCHES",
    "Patch",
    "PatchConfig",
    "PatchHandle",
    "get_patch",
    "method_info",
    "option_infos",
    "patch_paper",
    "register_patch",
    "take_module_losses",
]


@dataclass
class PatchConfig:
    """Base class of the options of a method.

    Subclasses are dataclasses whose fields carry `metadata={"help": ...}` and, where an option has a range, its
    bounds (`"ge"`, `"le"` ..., see `hf_attn_zoo.options`). Field types are checked when a config is built from user
    options (`from_options`), so a wrong type is reported with the option's name; bounds by `Patch.configure`.
    """

    @classmethod
    def from_options(cls, method: str, options: dict[str, Any]) -> PatchConfig:
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise InvalidOptionError(
                f"{method}: unknown option(s) {unknown}; known options: {sorted(known)}. "
                f"See `hf-attn-zoo methods` for their meaning."
            )
        hints = typing.get_type_hints(cls)
        for name, value in options.items():
            _check_type(method, name, value, hints[name])
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_type(method: str, name: str, value: Any, annotation: Any) -> None:
    if not _matches(value, annotation):
        raise InvalidOptionError(
            f"{method}: option {name}={value!r} has the wrong type; expected {_describe(annotation)}.", option=name
        )


def _matches(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if origin is Literal:
        return value in typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if origin in (list, tuple):
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


@dataclass(frozen=True)
class Capabilities:
    """What a patch supports; the common test grid reads these instead of skip lists."""

    training_free: bool
    new_params: bool
    kv_cache: bool = True
    generate: bool = True
    # under torch.compile one decode step's graph serves the next ones (the cache length is a dynamic size); False
    # where a call's structure follows the length itself, so each new length may recompile
    static_decode_graph: bool = True
    # decodes over a pre-allocated cache (`StaticCache`, generate's `cache_implementation="static"`), whose keys fill
    # the slots of a fixed-size buffer instead of ending at the last query; False: such a cache is refused with the
    # reason (the methods that keep per-position state in their own dynamic cache layers, or place their pattern
    # from the key count)
    static_cache: bool = True


class PatchHandle:
    """What one `apply` changed, with the undo steps to revert it (run in reverse order)."""

    def __init__(self, method: str, layers: list[int], config: PatchConfig):
        self.method = method
        self.layers = layers
        self.config = config
        self.modules: list[torch.nn.Module] = []
        self._undo: list[Callable[[], None]] = []
        # aux_loss_fn(model): reads the loss from the modules as they are *now* (PEFT may run copies of them)
        self.aux_loss_fn: Callable[[torch.nn.Module], torch.Tensor | None] | None = None

    def on_revert(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def revert(self) -> None:
        while self._undo:
            self._undo.pop()()

    def aux_loss(self, model: torch.nn.Module) -> torch.Tensor | None:
        return self.aux_loss_fn(model) if self.aux_loss_fn is not None else None


def take_module_losses(model: torch.nn.Module, kind: type, tag: str) -> list[tuple[Any, torch.Tensor]]:
    """`(module, loss)` for every `kind` module of `model` tagged `tag` (its `patch_tag`: the patch call that made it)
    whose `last_aux_loss` the last forward set; every tagged module's loss is cleared. Looked up in `model` as it is
    now: under PEFT the modules that ran are `modules_to_save` copies, which keep the tag."""
    mine = [m for m in model.modules() if isinstance(m, kind) and getattr(m, "patch_tag", None) == tag]
    losses = [(m, m.last_aux_loss) for m in mine if m.last_aux_loss is not None]
    for m in mine:
        m.last_aux_loss = None
    return losses


class Patch(abc.ABC):
    """A method of the zoo. Subclass it in `patches/<name>.py` and decorate with `@register_patch`.

    Class attributes:
        name: method key (== file stem == recipe folder == CLI key).
        summary: one line shown by `hf-attn-zoo methods`.
        config_class: the `PatchConfig` dataclass of its options.
        targets: what it replaces (`attention`, `attention_fn`, `router`, `experts`, `mlp`).
        capabilities: what the patch supports.
        exclusive: a layer can carry this patch at most once.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    config_class: ClassVar[type[PatchConfig]]
    capabilities: ClassVar[Capabilities]
    targets: ClassVar[tuple[str, ...]]
    exclusive: ClassVar[bool] = True

    def check(self, family: FamilySpec, model_config: PretrainedConfig) -> str | None:
        """The reason this patch cannot be applied to this family, or `None`."""
        return None

    def refusal(self, family: FamilySpec, model_config: PretrainedConfig) -> str | None:
        """Why this method cannot patch `family`: what its spec rules out for every method of this kind (an attention
        that bypasses transformers' attention interface cannot take attention-function patches), then `check`."""
        if "attention_fn" in self.targets and not family.attention.interface:
            return (
                "its attention module computes attention itself instead of through transformers' attention "
                "interface, which attention-function patches take over"
            )
        return self.check(family, model_config)

    def validate(self, config: PatchConfig, family: FamilySpec, model_config: PretrainedConfig) -> PatchConfig:
        """Check what the declared bounds cannot say (options that constrain each other ...); return the completed
        config. Runs after the bounds are checked."""
        return config

    def configure(
        self, options: dict[str, Any], family: FamilySpec | None, model_config: PretrainedConfig
    ) -> PatchConfig:
        """The checked, completed config of `options` for this model: types, declared bounds, then `validate`."""
        config = self.config_class.from_options(self.name, options)
        check_bounds(self.name, config, family, model_config)
        return self.validate(config, family, model_config)

    @abc.abstractmethod
    def apply(
        self, model: torch.nn.Module, config: PatchConfig, family: FamilySpec, layers: list[int], handle: PatchHandle
    ) -> None:
        """Change the model; register every undo step on `handle` as soon as the change is made."""

    def neutral_config(self, family: FamilySpec, model_config: PretrainedConfig) -> PatchConfig | None:
        """Options under which the patched model reproduces the unpatched one, or `None` if there are none."""
        return None


PATCHES: dict[str, type[Patch]] = {}

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def register_patch(cls: type[Patch]) -> type[Patch]:
    """Class decorator that adds a `Patch` subclass to the registry under `cls.name`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{cls.__name__}.name must be lower snake case, got {name!r}")
    if name in PATCHES and PATCHES[name] is not cls:
        raise ValueError(f"a patch named {name!r} is already registered ({PATCHES[name].__qualname__})")
    for attr in ("summary", "config_class", "capabilities", "targets"):
        if not hasattr(cls, attr):
            raise ValueError(f"{cls.__name__} must define `{attr}`")
    PATCHES[name] = cls
    return cls


def get_patch(name: str) -> Patch:
    if name not in PATCHES:
        from .decoding.registry import DECODING_METHODS

        if name in DECODING_METHODS:
            raise UnknownMethodError(
                f"{name!r} is a decoding method, not a patch: it changes how tokens are chosen and leaves the model "
                f"as it is. Use it with {DECODING_METHODS[name].usage}."
            )
        raise UnknownMethodError(
            f"unknown method {name!r}; available: {', '.join(sorted(PATCHES)) or 'none'}. "
            "A checkpoint that records it was made by a version of hf_attn_zoo that has it: upgrade hf-attn-zoo."
        )
    return PATCHES[name]()


@dataclass(frozen=True)
class OptionInfo:
    name: str
    type: str
    default: Any
    help: str
    bounds: str = ""


MethodKind = Literal["patch", "decoding"]


@dataclass(frozen=True)
class MethodInfo:
    """What `hf_attn_zoo.methods()` lists for one method.

    `kind` is `"patch"` for a method `patch()` applies to a model (`PATCHES`), `"decoding"` for a decoding method
    that changes how tokens are chosen and leaves the model alone (`hf_attn_zoo.decoding.registry`).
    """

    name: str
    summary: str
    options: tuple[OptionInfo, ...] = field(default_factory=tuple)
    training_free: bool = False
    kind: MethodKind = "patch"
    paper: str = ""  # the paper(s) it implements, as its module docstring cites them (`Title (arXiv:NNNN.NNNNN)`)
    replaces: tuple[str, ...] = ()  # the `targets` of a patch; empty for a decoding method


def option_infos(config_class: type) -> tuple[OptionInfo, ...]:
    """The options of a dataclass of options: name, type, default, help (field metadata) and declared bounds."""
    hints = typing.get_type_hints(config_class)
    return tuple(
        OptionInfo(
            name=f.name,
            type=_describe(hints[f.name]),
            default=f.default if f.default is not dataclasses.MISSING else None,
            help=f.metadata.get("help", ""),
            bounds=bounds_text(f),
        )
        for f in dataclasses.fields(config_class)
    )


def patch_paper(cls: type[Patch]) -> str:
    """The paper(s) a patch implements: the first paragraph of its module's docstring, on one line (every patch
    module opens by citing its paper; a patch registered from a module without a docstring has none)."""
    module = sys.modules.get(cls.__module__)
    doc = module.__doc__ if module is not None else None
    return " ".join(doc.strip().split("\n\n")[0].split()) if doc else ""


def method_info(cls: type[Patch]) -> MethodInfo:
    return MethodInfo(
        cls.name,
        cls.summary,
        option_infos(cls.config_class),
        cls.capabilities.training_free,
        paper=patch_paper(cls),
        replaces=tuple(cls.targets),
    )
