"""`save_pretrained` of a patched model also writes its model card; its `push_to_hub` is `hf_attn_zoo.push_to_hub`.

`patch()` sets `save_pretrained` and `push_to_hub` on the patched model *instance* (`install_save_hook`), wrapping
the class's own methods; `unpatch()` takes them off again. Nothing outside that model changes: transformers' classes
are never touched, and every other model saves as before. The card is written after the weights and config, into
the same folder (so a save into `outputs.atomic_output`'s temporary folder moves into place with it); a card that
cannot be written is a warning, never a lost save.

Pushing goes through `hf_attn_zoo.push_to_hub` (the files a reload needs, with our card): transformers' own
`push_to_hub` and `save_pretrained(..., push_to_hub=True)` would replace the card with an empty one.
"""

from __future__ import annotations

import inspect
import os
import types
from collections.abc import Callable
from typing import Any

import torch

from ..errors import InvalidOptionError

__all__ = ["install_save_hook", "remove_save_hook"]


def save_pretrained(self: Any, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
    """`PreTrainedModel.save_pretrained`, then the model card `README.md` (see `hf_attn_zoo.write_model_card`).

    Named like the method it wraps so that a pickled model restores the plain method instead of failing.
    """
    original = type(self).save_pretrained
    bound = inspect.signature(original).bind(self, save_directory, *args, **kwargs)
    arguments = bound.arguments
    extra = arguments.get("kwargs", {})
    push = bool(arguments.get("push_to_hub", False))
    hub: dict[str, Any] = {}
    if push:
        arguments["push_to_hub"] = False
        hub = {k: extra.pop(k) for k in ("repo_id", "commit_message", "create_pr", "private") if k in extra}
        hub["token"] = arguments.get("token")
    original(*bound.args, **bound.kwargs)
    should_save = getattr(self, "should_save_on_this_rank", None)
    main = arguments.get("is_main_process", True)
    if not (should_save(main) if callable(should_save) else main):
        return
    from .model_card import write_card_or_warn

    write_card_or_warn(save_directory, self)
    if push:
        from .push import push_to_hub as push_folder

        repo_id = hub.pop("repo_id", None) or os.fspath(save_directory).rstrip(os.sep).split(os.sep)[-1]
        push_folder(save_directory, repo_id, **hub)


def push_to_hub(
    self: Any,
    repo_id: str,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    create_pr: bool = False,
    revision: str | None = None,
    **unsupported: Any,
) -> Any:
    """`PreTrainedModel.push_to_hub` of a patched model: `hf_attn_zoo.push_to_hub(self, repo_id, ...)`, so the
    repository gets the files a reload needs and the model card (push the tokenizer with its own `push_to_hub`)."""
    given = sorted(k for k, v in unsupported.items() if v is not None)
    if given:
        raise InvalidOptionError(
            f"push_to_hub of a patched model goes through hf_attn_zoo.push_to_hub, which does not take {given}; "
            "leave them out (save with model.save_pretrained(folder, max_shard_size=...) and push the folder with "
            "hf_attn_zoo.push_to_hub(folder, repo_id) to choose the shard size)."
        )
    from .push import push_to_hub as push_model

    return push_model(
        self,
        repo_id,
        commit_message=commit_message,
        private=private,
        token=token,
        create_pr=create_pr,
        revision=revision,
    )


_HOOKS: dict[str, Callable[..., Any]] = {"save_pretrained": save_pretrained, "push_to_hub": push_to_hub}


def install_save_hook(model: torch.nn.Module) -> None:
    """Make `model.save_pretrained` write the model card and `model.push_to_hub` push through hf-attn-zoo (this
    instance only; idempotent; an instance attribute set by someone else is left alone)."""
    for name, hook in _HOOKS.items():
        if name not in model.__dict__ and callable(getattr(type(model), name, None)):
            model.__dict__[name] = types.MethodType(hook, model)


def remove_save_hook(model: torch.nn.Module) -> None:
    """Undo `install_save_hook`."""
    for name, hook in _HOOKS.items():
        if getattr(model.__dict__.get(name), "__func__", None) is hook:
            del model.__dict__[name]
