"""`from_pretrained`: load a (patched) checkpoint exactly.

transformers loads the pretrained weights into the vanilla architecture (weights created by patches are left out:
the vanilla classes have no place for them). The patches recorded in `config.hf_attn_zoo` are then re-applied and
the tensors they added to the state dict (new parameters, and persistent buffers such as routing centroids) read
from the checkpoint's safetensors files, checked name by name and shape by shape.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import cached_file

from .errors import CheckpointMismatchError
from .patching import RECORD_KEY, new_parameters, patch

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
    hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(
        path, trust_remote_code=kwargs.get("trust_remote_code", False), **hub_kwargs
    )
    records = list(getattr(config, RECORD_KEY, None) or [])
    if records:
        delattr(config, RECORD_KEY)
    model = _load_quietly(path, config, kwargs)
    vanilla = set(model.state_dict())
    for record in records:
        unknown = set(record) - {"method", "layers", "options"}
        if unknown or "method" not in record:
            raise CheckpointMismatchError(
                f"{path}: config.{RECORD_KEY} holds a malformed record {record!r}; expected keys method, layers, options."
            )
        patch(model, record["method"], layers=record.get("layers", "all"), **record.get("options", {}))
    if records:
        _load_new_weights(model, path, hub_kwargs, vanilla)
    for spec in patches or []:
        spec = dict(spec)
        method = spec.pop("method")
        layers = spec.pop("layers", "all")
        patch(model, method, layers=layers, **spec)
    return model


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
