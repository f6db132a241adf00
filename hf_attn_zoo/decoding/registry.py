"""The registry of decoding methods: methods that change how `generate` chooses tokens and leave the model as it is
(no `patch()`, nothing recorded in the config), listed by `hf_attn_zoo.methods()` beside the patches.

A decoding method declares its options as a dataclass whose fields carry `metadata={"help": ...}` (and bounds, as
patch options do, see `hf_attn_zoo.options`), so `hf-attn-zoo methods` shows them the same way. Patches stay in
`hf_attn_zoo.registry.PATCHES`; this registry never holds one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..registry import _NAME, PATCHES, MethodInfo, option_infos

__all__ = ["DECODING_METHODS", "DecodingMethod", "decoding_info", "register_decoding"]


@dataclass(frozen=True)
class DecodingMethod:
    """One decoding method.

    Args:
        name (`str`): lower snake case, distinct from every patch's name.
        summary (`str`): one line, citing the paper (`Title (arXiv:XXXX.XXXXX)`).
        config_class (`type`): the dataclass of its options (every field with a `help`).
        usage (`str`): how to run it (it is not applied with `patch()`).
        training_free (`bool`, *optional*, defaults to `True`): decoding methods add no weights.
        paper (`str`, *optional*): the paper it implements (`Title (arXiv:XXXX.XXXXX)`), for the README and model
            cards.
    """

    name: str
    summary: str
    config_class: type
    usage: str
    training_free: bool = True
    paper: str = ""


DECODING_METHODS: dict[str, DecodingMethod] = {}


def register_decoding(method: DecodingMethod) -> DecodingMethod:
    """Add a decoding method to the registry (again with the same entry is a no-op)."""
    if not isinstance(method.name, str) or not _NAME.match(method.name):
        raise ValueError(f"decoding method name must be lower snake case, got {method.name!r}")
    if method.name in PATCHES:
        raise ValueError(f"{method.name!r} is already the name of a patch")
    known = DECODING_METHODS.get(method.name)
    if known is not None and known != method:
        raise ValueError(f"a decoding method named {method.name!r} is already registered")
    if not dataclasses.is_dataclass(method.config_class):
        raise ValueError(f"{method.name}: config_class must be a dataclass, got {method.config_class!r}")
    DECODING_METHODS[method.name] = method
    return method


def decoding_info(method: DecodingMethod) -> MethodInfo:
    """The `MethodInfo` (kind `"decoding"`) `hf_attn_zoo.methods()` lists for a decoding method."""
    return MethodInfo(
        method.name,
        method.summary,
        option_infos(method.config_class),
        method.training_free,
        kind="decoding",
        paper=method.paper,
    )
