"""Build the model a mergekit-moe YAML describes, so mergekit users can switch with their configs.

Supported keys (mergekit `mergekit/moe/config.py`): `base_model`, `experts` (`source_model`, `positive_prompts`,
`negative_prompts`, `noise_scale`, `residual_scale`), `gate_mode` (`hidden`, `cheap_embed`, `random`,
`uniform_random`), `experts_per_token`, `dtype`, `architecture` (`mixtral`, or unset), `tokenizer_source`
(`base`, or unset). Anything else is refused by name.

Semantics follow mergekit: non-expert weights come from `base_model` alone and experts are exactly the listed
models (the base is an expert only if listed). Two deliberate differences: `hidden` routers are computed on the
normalised layer input the router really sees (mergekit uses the residual stream before the norm) and are centred
over experts; `random` routers are scaled by `initializer_range` (mergekit draws N(0, 1)).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..errors import InvalidOptionError
from .sources import Expert

__all__ = ["mergekit_upcycle_kwargs", "upcycle_from_mergekit"]

_TOP = {"base_model", "experts", "gate_mode", "experts_per_token", "dtype", "architecture", "tokenizer_source"}
_EXPERT = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}
_GATE_MODES = {"hidden": "hidden", "cheap_embed": "embed", "random": "random", "uniform_random": "random"}
_DTYPES = {
    "float32": "float32",
    "bfloat16": "bfloat16",
    "float16": "float16",
    "fp32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    None: "auto",
}


def _fail(path: Path, message: str) -> InvalidOptionError:
    return InvalidOptionError(f"{path}: {message}")


def mergekit_upcycle_kwargs(path: str | Path) -> dict[str, Any]:
    """Translate a mergekit-moe YAML file into `upcycle(**kwargs)` arguments."""
    path = Path(path)
    if not path.is_file():
        raise InvalidOptionError(f"mergekit config {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise _fail(path, f"is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise _fail(path, "must be a mapping with base_model and experts.")
    unknown = sorted(set(data) - _TOP)
    if unknown:
        raise _fail(path, f"unknown mergekit-moe field(s) {unknown}; supported: {sorted(_TOP)}.")
    for key in ("base_model", "experts"):
        if key not in data:
            raise _fail(path, f"missing required field {key!r}.")
    if data.get("architecture") not in (None, "mixtral"):
        raise _fail(
            path,
            f"architecture={data['architecture']!r} is not supported; the MoE architecture follows "
            "the base model (Mixtral for Llama/Mistral). Remove the field.",
        )
    if data.get("tokenizer_source") not in (None, "base"):
        raise _fail(path, "only tokenizer_source: base is supported (experts must share the base tokenizer).")
    gate_mode = data.get("gate_mode", "hidden")
    if gate_mode not in _GATE_MODES:
        raise _fail(path, f"gate_mode={gate_mode!r} is not one of {sorted(_GATE_MODES)}.")
    if data.get("dtype") not in _DTYPES:
        raise _fail(path, f"dtype={data['dtype']!r} is not one of float32, bfloat16, float16.")
    if not isinstance(data["experts"], list) or len(data["experts"]) < 2:
        raise _fail(path, "experts must be a list of at least two entries with source_model.")
    experts = []
    for i, entry in enumerate(data["experts"]):
        if not isinstance(entry, dict) or "source_model" not in entry:
            raise _fail(path, f"experts[{i}] must be a mapping with source_model.")
        unknown = sorted(set(entry) - _EXPERT)
        if unknown:
            raise _fail(path, f"experts[{i}] has unknown field(s) {unknown}; supported: {sorted(_EXPERT)}.")
        experts.append(
            Expert(
                source=str(entry["source_model"]),
                prompts=list(entry.get("positive_prompts") or []),
                negative_prompts=list(entry.get("negative_prompts") or []),
                noise_scale=float(entry.get("noise_scale") or 0.0),
                residual_scale=float(entry.get("residual_scale", 1.0)),
            )
        )
    return {
        "seed": str(data["base_model"]),
        "experts": experts,
        "mode": "btx",
        "include_seed": False,
        "shared": "seed",
        "router_init": _GATE_MODES[gate_mode],
        "top_k": int(data.get("experts_per_token", 2)),
        "dtype": _DTYPES[data.get("dtype")],
    }


def upcycle_from_mergekit(
    path: str | Path, output_dir: str | Path | None = None, overwrite: bool = False, **overrides: Any
):
    """Build the MoE a mergekit-moe YAML describes (see the module docstring for the differences); a non-empty
    `output_dir` is refused unless `overwrite`."""
    from .build import upcycle

    return upcycle(**{**mergekit_upcycle_kwargs(path), **overrides}, output_dir=output_dir, overwrite=overwrite)
