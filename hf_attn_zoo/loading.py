"""`from_pretrained`: load a (patched) checkpoint exactly.

transformers loads the pretrained weights into the vanilla architecture (weights created by patches are left out:
the vanilla classes have no place for them). The patches recorded in `config.hf_attn_zoo` are then re-applied and
the tensors they added to the state dict (new parameters, and persistent buffers such as routing centroids) read
from the checkpoint's safetensors files, checked name by name and shape by shape.

No silent dense fallback: a patched model's config carries `"attn_implementation": PATCHED_ATTENTION` (set by
`patch()`, written by `save_pretrained`). A process without hf_attn_zoo that loads the checkpoint with plain
`AutoModelForCausalLM.from_pretrained` (or `lm_eval --model hf`) fails there, transformers naming the unknown
implementation (`...load_with_hf_attn_zoo.from_pretrained`). Where hf_attn_zoo is imported, the name is registered so
that configs still build (planning on the meta device), but the model's first forward raises `CheckpointMismatchError`
naming the fix. `from_pretrained` here clears it before the vanilla load (or uses the caller's `attn_implementation`).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import AttentionInterface, AttentionMaskInterface, AutoConfig, AutoModelForCausalLM
from transformers.utils import cached_file

from .errors import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    UnknownModelError,
    UnsupportedCheckpointError,
    ZooError,
)
from .patching import PATCHED_ATTENTION, RECORD_KEY, VERSION_KEY, new_parameters, package_version, patch, patch_plan

__all__ = ["from_pretrained"]

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


def from_pretrained(
    pretrained_model_name_or_path: str | Path,
    patches: list[dict[str, Any]] | None = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """Load a causal LM, re-applying the patches recorded in its config and loading their weights.

    Args:
        pretrained_model_name_or_path (`str | Path`): a local folder or a hub id.
        patches (`list[dict]`, *optional*): extra patches to apply after loading, each
            `{"method": ..., "layers": ..., **options}` (their new weights start from their initialisation).
        **kwargs: passed to `AutoModelForCausalLM.from_pretrained` (`dtype`, `device_map`, `revision`,
            `attn_implementation`, ...). Remote code is never trusted unless you pass `trust_remote_code=True`.

    Example:
        >>> model.save_pretrained("moh-smollm2")
        >>> same = hf_attn_zoo.from_pretrained("moh-smollm2")
    """
    path = str(pretrained_model_name_or_path)
    _check_local_path(path)
    hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(
        path, trust_remote_code=kwargs.get("trust_remote_code", False), **hub_kwargs
    )
    records = list(getattr(config, RECORD_KEY, None) or [])
    saved_version = config.__dict__.pop(VERSION_KEY, None)
    if records:
        delattr(config, RECORD_KEY)
    config.__dict__.pop("attn_implementation", None)
    if config._attn_implementation == PATCHED_ATTENTION:
        config._attn_implementation = None  # the model's default, as before it was patched
    newer = _is_newer(saved_version)
    try:
        model = _load_quietly(path, config, kwargs)
    except SafetensorError as error:
        raise _corrupt(path, hub_kwargs, error) from error
    vanilla = set(model.state_dict())
    for index, record in enumerate(records):
        unknown = set(record) - {"method", "layers", "options"}
        if unknown or "method" not in record:
            raise CheckpointMismatchError(
                f"{path}: config.{RECORD_KEY} holds a malformed record {record!r}; expected keys method, layers, "
                "options."
            )
        try:
            patch(model, record["method"], layers=record.get("layers", "all"), **record.get("options", {}))
        except ZooError as error:
            raise _from_checkpoint(error, path, index, record, saved_version, newer) from error
    if records:
        try:
            _load_new_weights(model, path, hub_kwargs, vanilla)
        except SafetensorError as error:
            raise _corrupt(path, hub_kwargs, error) from error
        if newer:
            warnings.warn(
                f"{path} was saved by hf-attn-zoo {saved_version}, newer than the installed "
                f"{package_version()}; it loaded, but upgrade hf-attn-zoo if it behaves unexpectedly.",
                stacklevel=2,
            )
    if patches:
        patch_plan(model, patches)
    return model


def _check_local_path(path: str) -> None:
    """A path-like argument that does not exist: say so (transformers would call it a malformed hub id)."""
    looks_like_path = (
        path.startswith(("./", "../", "~", os.sep))
        or os.path.isabs(path)
        or path.count("/") > 1
        or (os.altsep is not None and os.altsep in path)
        or (os.sep != "/" and os.sep in path)
    )
    if looks_like_path and not os.path.exists(os.path.expanduser(path)):
        raise UnknownModelError(
            f"{path}: no such folder. Give the folder a model was saved to with "
            "save_pretrained(), or a hub id such as 'HuggingFaceTB/SmolLM2-135M'."
        )


def _is_newer(saved_version: str | None) -> bool:
    if not saved_version:
        return False
    from packaging.version import InvalidVersion, Version

    try:
        return Version(str(saved_version)) > Version(package_version())
    except InvalidVersion:
        return False


def _from_checkpoint(
    error: ZooError, path: str, index: int, record: dict, saved_version: str | None, newer: bool
) -> ZooError:
    """`error` raised re-applying a checkpoint's record, saying where it comes from and which version wrote it."""
    writer = f"hf-attn-zoo {saved_version}" if saved_version else "an hf-attn-zoo that did not record its version"
    where = (
        f"{path}: the patch recorded in config.{RECORD_KEY}[{index}] ({record.get('method')!r}, written by "
        f"{writer}; installed: {package_version()}) cannot be applied: {error}"
    )
    if newer:
        return UnsupportedCheckpointError(
            f"{where} The checkpoint was saved by a newer hf-attn-zoo: upgrade it (pip install -U hf-attn-zoo)."
        )
    return type(error)(where)


def _corrupt(path: str, hub_kwargs: dict[str, Any], error: Exception) -> CorruptCheckpointError:
    """Name the weights file that cannot be read."""
    files = []
    for name in (_INDEX, _SINGLE):
        found = cached_file(path, name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        if found is not None and name == _SINGLE:
            files = [found]
            break
        if found is not None:
            folder = Path(found).parent
            files = [str(folder / f) for f in sorted(set(json.loads(Path(found).read_text())["weight_map"].values()))]
            break
    bad = []
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError):
            bad.append(file)
    named = ", ".join(bad or files) or f"the safetensors files of {path}"
    return CorruptCheckpointError(
        f"{named}: the weights file cannot be read ({error}); it is truncated or corrupt (an interrupted save or "
        "download). Save the model again with model.save_pretrained(...) (or download it again)."
    )


def _refuse_unpatched(*args: Any, **kwargs: Any) -> Any:
    raise CheckpointMismatchError(
        "this model was built from the config of a checkpoint patched by hf_attn_zoo without re-applying its patches "
        "(its config says attn_implementation=" + repr(PATCHED_ATTENTION) + "), so it would run as the dense model. "
        "Load it with hf_attn_zoo.from_pretrained(path) (lm-eval: --model hf-attn-zoo), or pass "
        "attn_implementation='sdpa' to load the dense weights deliberately."
    )


# registered so that a patched config still builds where hf_attn_zoo is imported (planning, meta device); its first
# forward refuses (the mask function runs first)
AttentionInterface.register(PATCHED_ATTENTION, _refuse_unpatched)
AttentionMaskInterface.register(PATCHED_ATTENTION, _refuse_unpatched)


def _load_quietly(path: str, config: Any, kwargs: dict[str, Any]) -> torch.nn.Module:
    """Vanilla load; its report of the patches' weights as "unexpected" is expected, so it is silenced."""
    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
    finally:
        logger.setLevel(level)


def _checkpoint_files(path: str, hub_kwargs: dict[str, Any]) -> dict[str, str]:
    """Map every tensor name of the checkpoint to the safetensors file holding it."""
    index = cached_file(path, _INDEX, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    if index is not None:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        files = {f: cached_file(path, f, **hub_kwargs) for f in set(weight_map.values())}
        return {name: files[f] for name, f in weight_map.items()}
    single = cached_file(path, _SINGLE, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    if single is None:
        raise CheckpointMismatchError(
            f"{path} records hf_attn_zoo patches but has no {_SINGLE} or {_INDEX}; patched checkpoints are saved "
            "as safetensors by model.save_pretrained(dir)."
        )
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


@torch.no_grad()
def _load_new_weights(model: torch.nn.Module, path: str, hub_kwargs: dict[str, Any], vanilla: set[str]) -> None:
    """Read what the re-applied patches added to the state dict (parameters and persistent buffers)."""
    params = {name: t for name, t in model.state_dict().items() if name not in vanilla}
    params.update(new_parameters(model))
    if not params:
        return
    files = _checkpoint_files(path, hub_kwargs)
    missing = sorted(name for name in params if name not in files)
    if missing:
        raise CheckpointMismatchError(
            f"{path}: the recorded patches {[r['method'] for r in getattr(model.config, RECORD_KEY)]} need "
            f"{len(missing)} weight(s) the checkpoint does not have (first: {missing[0]}). The config and weights "
            "come from different models: save the patched model again with save_pretrained."
        )
    by_file: dict[str, list[str]] = {}
    for name in params:
        by_file.setdefault(files[name], []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as f:
            for name in names:
                tensor = f.get_tensor(name)
                param = params[name]
                if tensor.shape != param.shape:
                    raise CheckpointMismatchError(
                        f"{path}: weight {name} has shape {tuple(tensor.shape)} in the checkpoint but the recorded "
                        f"patch builds {tuple(param.shape)}; the config and weights do not belong together."
                    )
                param.copy_(tensor.to(param.dtype))
