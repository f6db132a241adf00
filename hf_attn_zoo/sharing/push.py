"""`push_to_hub`: upload exactly the files a reload needs, with the model card, in one commit.

A saved folder often holds more than the model: a tuning run's checkpoints, optimizer state, trainer logs, eval
output, caches. `reload_files` lists what `hf_attn_zoo.from_pretrained` (and the tokenizer) read: `config.json`,
`generation_config.json`, the safetensors weights (the single file, or the index and exactly the shards it names),
the tokenizer files, and the remote-code modules a config's `auto_map` names. `push_to_hub` uploads those, the model
card (ours regenerated for the repository; a README.md that is not ours as it is) and, for a MoE model SCMoE can
decode, the `custom_generate/` folder (see `hf_attn_zoo.decoding.custom_generate_repo`), through
`huggingface_hub.HfApi.create_commit`. Weight, tokenizer and `custom_generate/` files a previous push left in the
repository that this one does not upload are deleted in the same commit (a stale `model.safetensors` beside a new
index would be loaded instead of it); other files in the repository stay.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointMismatchError, InvalidOptionError, UnknownModelError
from ..patching import RECORD_KEY, package_version
from ..wrappers import inner_model
from .model_card import CARD_FILE, is_own_card, rebuild_on_meta, render_model_card

__all__ = ["TOKENIZER_FILES", "push_main", "push_to_hub", "reload_files"]

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tiktoken.model",
    "tekken.json",
)
_CHAT_TEMPLATES = "additional_chat_templates"
_CUSTOM_GENERATE = "custom_generate/"
# files of these kinds in the repository that this push does not upload are stale: deleted in the same commit
_MANAGED = re.compile(
    r"^(.*\.safetensors|.*\.safetensors\.index\.json|pytorch_model.*\.bin(\.index\.json)?|"
    + "|".join(re.escape(name) for name in TOKENIZER_FILES)
    + rf"|{_CHAT_TEMPLATES}/.*|{re.escape(_CUSTOM_GENERATE)}.*)$"
)
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[\w.-]+$")


def reload_files(folder: str | os.PathLike) -> list[str]:
    """The files of a saved model folder that a reload needs, as sorted paths relative to it (the card excluded).

    Raises `UnknownModelError` for a folder that is not a saved model, `CheckpointMismatchError` for one whose weights
    are not complete safetensors (a PEFT adapter folder, `.bin` weights, an index naming a missing shard).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UnknownModelError(f"{folder}: no such folder; give the folder a model was saved to with save_pretrained.")
    if not (folder / "config.json").is_file():
        hint = (
            " It holds a PEFT adapter: merge it first (model = model.merge_and_unload()) and save the model."
            if (folder / "adapter_config.json").is_file()
            else ""
        )
        raise UnknownModelError(f"{folder} holds no config.json, so it is not a saved model.{hint}")
    files = ["config.json"]
    if (folder / _INDEX).is_file():
        shards = sorted(set(json.loads((folder / _INDEX).read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointMismatchError(
                f"{folder / _INDEX} names shards that are not in the folder ({', '.join(missing)}); the save was "
                "interrupted: save the model again with save_pretrained."
            )
        files += [_INDEX, *shards]
    elif (folder / _SINGLE).is_file():
        files.append(_SINGLE)
    else:
        raise CheckpointMismatchError(
            f"{folder} holds no {_SINGLE} or {_INDEX}; hf-attn-zoo shares safetensors checkpoints only: load the "
            "model and save it again with model.save_pretrained(folder)."
        )
    names = ["generation_config.json", *TOKENIZER_FILES]
    files += [name for name in names if (folder / name).is_file()]
    templates = folder / _CHAT_TEMPLATES
    if templates.is_dir():
        files += [f"{_CHAT_TEMPLATES}/{p.name}" for p in sorted(templates.glob("*.jinja"))]
    config = json.loads((folder / "config.json").read_text())
    if config.get("auto_map"):  # a remote-code architecture: its modules are part of the model
        files += [p.name for p in sorted(folder.glob("*.py"))]
    return sorted(files)


def push_to_hub(
    model_or_folder: torch.nn.Module | str | os.PathLike,
    repo_id: str,
    *,
    tokenizer: Any = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    custom_generate: bool | None = None,
    base_model: str | None = None,
    eval_results: Mapping[str, Any] | None = None,
) -> Any:
    """Upload a (patched) model to a hub repository: exactly the files a reload needs, and its model card.

    Args:
        model_or_folder (`PreTrainedModel | str | os.PathLike`): a saved model folder, or a model (saved to a
            temporary folder first, with `tokenizer` when given).
        repo_id (`str`): `namespace/name` (or `name` in your namespace); created when missing.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): saved beside a model object.
        private (`bool`, *optional*): visibility of a repository this call creates.
        token (`str | bool`, *optional*): the hub token (default: the one `hf auth login` stored).
        revision (`str`, *optional*): the branch to commit to (created from `main` when missing).
        commit_message (`str`, *optional*): defaults to one naming the methods.
        create_pr (`bool`, *optional*, defaults to `False`): open a pull request instead of committing.
        custom_generate (`bool`, *optional*): upload SCMoE's `custom_generate/` folder; by default when the model is
            a MoE model SCMoE can decode. `True` on a model it cannot decode raises the reason.
        base_model (`str`, *optional*): the hub id the model was made from, for the card, when the config does not
            say.
        eval_results (`Mapping[str, dict | path]`, *optional*): lm-eval results for the card's table, by column.

    Returns:
        `huggingface_hub.CommitInfo`: what `HfApi.create_commit` returns (its `commit_url`, `pr_url`, ...).

    Example:
        >>> hf_attn_zoo.push_to_hub("smollm2-moh", "me/smollm2-moh")
        >>> model = hf_attn_zoo.from_pretrained("me/smollm2-moh")
    """
    if not isinstance(repo_id, str) or not _HUB_ID.match(repo_id):
        raise InvalidOptionError(f"repo_id={repo_id!r} is not a hub repository id; give it as 'namespace/name'.")
    options: dict[str, Any] = dict(
        private=private,
        token=token,
        revision=revision,
        commit_message=commit_message,
        create_pr=create_pr,
        custom_generate=custom_generate,
        base_model=base_model,
        eval_results=eval_results,
    )
    if isinstance(model_or_folder, torch.nn.Module):
        model: Any = inner_model(model_or_folder)
        if hasattr(model_or_folder, "merge_and_unload") or getattr(model, "_hf_peft_config_loaded", False):
            raise InvalidOptionError(
                "this model carries PEFT adapters; merge them first (model = model.merge_and_unload()) so the "
                "repository holds a model that loads on its own."
            )
        with tempfile.TemporaryDirectory(prefix="hf_attn_zoo_push_") as tmp:
            folder = Path(tmp) / repo_id.split("/")[-1]
            model.save_pretrained(folder)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            return _push_folder(folder, repo_id, model, **options)
    if tokenizer is not None:
        raise InvalidOptionError("tokenizer= goes with a model object; a folder is uploaded with the tokenizer in it.")
    return _push_folder(Path(model_or_folder), repo_id, None, **options)


def _push_folder(
    folder: Path,
    repo_id: str,
    model: torch.nn.Module | None,
    *,
    private: bool | None,
    token: str | bool | None,
    revision: str | None,
    commit_message: str | None,
    create_pr: bool,
    custom_generate: bool | None,
    base_model: str | None,
    eval_results: Mapping[str, Any] | None,
) -> Any:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    from ..decoding.custom_generate_repo import custom_generate_files, scmoe_refusal

    files = reload_files(folder)  # validates the folder first
    config = json.loads((folder / "config.json").read_text())
    if custom_generate is None or custom_generate:
        built = model if model is not None else rebuild_on_meta(config)
        reason = scmoe_refusal(built) if built is not None else "the model could not be rebuilt to check it"
        if custom_generate and reason is not None:
            raise InvalidOptionError(f"custom_generate=True, but SCMoE cannot decode this model: {reason}")
        custom_generate = reason is None
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    uploads: dict[str, bytes | str] = {name: str(folder / name) for name in files}
    card = folder / CARD_FILE
    if card.is_file() and not is_own_card(card):
        uploads[CARD_FILE] = str(card)  # the user's own card, as written
    else:
        text = render_model_card(
            folder,
            model,
            repo_id=repo_id,
            base_model=base_model,
            eval_results=eval_results,
            custom_generate=custom_generate,
        )
        uploads[CARD_FILE] = text.encode()
    if custom_generate:
        uploads.update(custom_generate_files())
    present = api.list_repo_files(repo_id, revision=revision)
    stale = sorted(p for p in present if _MANAGED.match(p) and p not in uploads)
    operations: list[Any] = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=uploads[p]) for p in sorted(uploads)]
    operations += [CommitOperationDelete(path_in_repo=p) for p in stale]
    methods = ", ".join(dict.fromkeys(r["method"] for r in config.get(RECORD_KEY) or [])) or "no patches"
    message = commit_message or f"Upload model patched with hf-attn-zoo ({methods}) [hf-attn-zoo {package_version()}]"
    return api.create_commit(
        repo_id, operations, commit_message=message, revision=revision, create_pr=create_pr or None
    )


def push_main(argv: list[str]) -> int:
    """`hf-attn-zoo push FOLDER REPO_ID`: upload a saved model (see `push_to_hub`)."""
    parser = argparse.ArgumentParser(
        prog="hf-attn-zoo push",
        description="Upload a saved model to a hub repository: the files a reload needs and its model card.",
    )
    parser.add_argument("folder", type=Path, help="the folder the model was saved to (e.g. by `hf-attn-zoo patch`)")
    parser.add_argument("repo_id", help="namespace/name of the repository (created when missing)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", help="the branch to commit to")
    parser.add_argument("--message", help="the commit message")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--base-model", help="hub id of the model it was made from, for the card")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--custom-generate",
        dest="custom_generate",
        action="store_true",
        default=None,
        help="upload SCMoE's custom_generate/ folder (default: when SCMoE can decode the model)",
    )
    group.add_argument(
        "--no-custom-generate", dest="custom_generate", action="store_false", help="never upload custom_generate/"
    )
    args = parser.parse_intermixed_args(argv)
    info = push_to_hub(
        args.folder,
        args.repo_id,
        private=args.private or None,
        revision=args.revision,
        commit_message=args.message,
        create_pr=args.create_pr,
        custom_generate=args.custom_generate,
        base_model=args.base_model,
    )
    url = getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or args.repo_id
    print(f"pushed {args.folder} -> {url}")
    return 0
