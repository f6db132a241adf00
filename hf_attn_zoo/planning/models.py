"""Where a plan's model comes from, and how it is built and patched on the meta device (no weight is allocated).

A model is named by one of:

- a shipped config of a well-known model (`configs/<name>.json`, written from the published model cards):
  `llama3-8b`, `llama3-70b`, `mixtral-8x7b`, `qwen3-30b-a3b`, `deepseek-v3`;
- `default`: the embedded SmolLM2-135M-Instruct (`hf_attn_zoo.assets.default_model_path()`);
- a local folder holding a `config.json` (or the path of a config JSON file);
- a hub id, read with `AutoConfig.from_pretrained` where the hub is reachable.

The model is built with `torch.device("meta")` and `no_init_weights()`: every parameter is a meta tensor (shape and
dtype only), so an 8B or 70B model is built in a fraction of a second, and patched the same way through
`hf_attn_zoo.patch`. Upcycling plans build the target MoE config with `upcycling.targets.moe_config` (the function
`upcycle()` uses) and apply the recorded `bam` patch for `mode="bam"`.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.initialization import no_init_weights
from transformers.modeling_utils import set_zero3_state

from ..errors import InvalidOptionError, PlanError, UnknownModelError
from ..families.spec import FamilySpec, resolve_family

__all__ = [
    "CONFIGS_DIR",
    "UPCYCLE_OPTIONS",
    "BuiltModels",
    "build_meta",
    "build_plan_models",
    "load_config",
    "shipped_models",
]

CONFIGS_DIR = Path(__file__).parent / "configs"
UPCYCLE_OPTIONS = ("mode", "num_experts", "top_k", "layers", "bam_options")
_DEFAULT_UPCYCLE_EXPERTS = 4  # planning has no expert models to count: sparse upcycling's default
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def shipped_models() -> list[str]:
    """Names of the shipped model configs (plus `default`, the embedded SmolLM2-135M-Instruct)."""
    return sorted(path.stem for path in CONFIGS_DIR.glob("*.json")) + ["default"]


def _from_dict(data: dict[str, Any], source: str) -> PretrainedConfig:
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    model_type = data.get("model_type")
    if not model_type:
        raise UnknownModelError(f"{source} has no model_type; it is not a transformers config.json.")
    try:
        return AutoConfig.for_model(data.pop("model_type"), **data)
    except (KeyError, ValueError) as error:
        raise UnknownModelError(f"{source}: transformers cannot build a {model_type!r} config: {error}") from error


def load_config(model: str | Path | PretrainedConfig) -> tuple[PretrainedConfig, str]:
    """`(config, where it came from)` for a shipped name, `default`, a local folder or JSON file, or a hub id."""
    if isinstance(model, PretrainedConfig):
        return copy.deepcopy(model), f"a {model.model_type} config"
    name = str(model)
    shipped = CONFIGS_DIR / f"{name.lower()}.json"
    if shipped.is_file():
        return _from_dict(json.loads(shipped.read_text()), f"shipped config {name}"), f"shipped config {name.lower()}"
    if name == "default":
        from ..assets import default_model_path

        path = default_model_path()
        return AutoConfig.from_pretrained(path), f"default model ({path})"
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".json":
        return _from_dict(json.loads(path.read_text()), str(path)), str(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownModelError(
                f"{path} is a folder without a config.json; give a model folder, a hub id or "
                f"one of the shipped configs: {', '.join(shipped_models())}."
            )
        return AutoConfig.from_pretrained(path), str(path)
    try:
        return AutoConfig.from_pretrained(name), f"hub {name}"
    except (OSError, ValueError) as error:
        offline = any(
            os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
            for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
        )
        hub = (
            "the hub is offline here (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE set) and it is not in the local cache"
            if offline
            else f"the hub could not provide it ({str(error).splitlines()[0]})"
        )
        raise UnknownModelError(
            f"unknown model {name!r}: it is not a shipped config ({', '.join(shipped_models())}), not a local folder "
            f"with a config.json, and {hub}. Pass a folder holding the model's config.json, or a shipped name."
        ) from error


def build_meta(config: PretrainedConfig, dtype: str = "bf16") -> torch.nn.Module:
    """The causal LM of `config` with every parameter on the meta device (nothing allocated, nothing initialised)."""
    # `set_zero3_state` keeps transformers from wrapping the build in DeepSpeed's zero.Init when ZeRO-3 is active
    # (the model card is rendered on rank 0 inside a ZeRO-3 run): zero.Init partitions collectively, so one rank
    # building alone would wait for the others forever, and a meta model has nothing to partition anyway
    with torch.device("meta"), no_init_weights(), set_zero3_state():
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=_DTYPES[dtype])
    model.tie_weights()  # no_init_weights() skips the tying (tie_word_embeddings: SmolLM2, Llama-3.2 ...)
    return model


@dataclass
class BuiltModels:
    """The unpatched model and the planned one (patched, or the upcycled MoE), both on the meta device."""

    before: torch.nn.Module
    after: torch.nn.Module
    family_before: FamilySpec
    family_after: FamilySpec
    records: list[dict[str, Any]]  # the patch records of `after` (config.hf_attn_zoo)
    upcycle: dict[str, Any] | None  # mode, num_experts, top_k, layers (upcycling plans)
    new_params: int  # patch-created parameters; for upcycling also the MoE blocks (routers + experts)
    lora_full_params: int  # trained fully next to LoRA adapters: patch-created parameters (upcycling: + routers)
    non_meta: dict[str, int]  # tensors the patch put on a real device: name -> bytes (should be empty)


def _non_meta(model: torch.nn.Module) -> dict[str, int]:
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return {name: t.numel() * t.element_size() for name, t in tensors if t.device.type != "meta"}


def _patch_meta(model: torch.nn.Module, method: str, layers: Any, options: dict[str, Any]) -> None:
    from ..errors import ZooError
    from ..patching import patch

    try:
        patch(model, method, layers=layers, **options)
    except ZooError:
        raise  # the patch's own message (bad option, unsupported family ...)
    except Exception as error:  # a patch that is not meta-device safe
        last = f"{type(error).__name__}: {error}".splitlines()[0]
        raise PlanError(
            f"{method} could not be applied to a model on the meta device ({last}); the plan needs a "
            "meta-safe patch. Report it with this message."
        ) from error


def _upcycle_options(options: dict[str, Any], layers: Any) -> dict[str, Any]:
    from ..upcycling.build import _DEFAULT_TOP_K, UPCYCLE_MODES

    unknown = sorted(set(options) - set(UPCYCLE_OPTIONS))
    if unknown:
        raise InvalidOptionError(
            f"upcycle: unknown option(s) {unknown}; known options: {list(UPCYCLE_OPTIONS)} "
            "(bam attention options go in bam_options, e.g. 'bam_options={kv: shared}')."
        )
    mode = options.get("mode", "btx")
    if mode not in UPCYCLE_MODES:
        raise InvalidOptionError(f"upcycle: mode={mode!r} is not one of {', '.join(UPCYCLE_MODES)}.")
    n = options.get("num_experts", _DEFAULT_UPCYCLE_EXPERTS)
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise InvalidOptionError(f"upcycle: num_experts={n!r} must be an integer >= 2 (an MoE needs two experts).")
    top_k = options.get("top_k", _DEFAULT_TOP_K[mode])
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= n:
        raise InvalidOptionError(f"upcycle: top_k={top_k!r} must be between 1 and the number of experts ({n}).")
    bam_options = options.get("bam_options") or {}
    if not isinstance(bam_options, dict):
        raise InvalidOptionError(f"upcycle: bam_options={bam_options!r} must be a mapping of bam options.")
    if bam_options and mode != "bam":
        raise InvalidOptionError(f"upcycle: bam_options are only used with mode=bam (got mode={mode!r}).")
    return {
        "mode": mode,
        "num_experts": n,
        "top_k": top_k,
        "layers": options.get("layers", layers),
        "bam_options": dict(bam_options),
    }


def _build_upcycled(
    config: PretrainedConfig,
    dtype: str,
    options: dict[str, Any],
    layers: Any,
    before: torch.nn.Module,
    family_before: FamilySpec,
) -> BuiltModels:
    from ..registry import get_patch
    from ..upcycling.build import _layers
    from ..upcycling.targets import moe_config

    spec = _upcycle_options(options, layers)
    n = spec["num_experts"]
    moe_layers = _layers(spec["layers"], config.num_hidden_layers)
    target = moe_config(config, n, spec["top_k"], moe_layers)
    family = resolve_family(target)
    if spec["mode"] == "bam":  # the same check upcycle() runs before reading any weight
        bam = get_patch("bam")
        bam.configure({"num_experts": n, **spec["bam_options"]}, family, target)
    after = build_meta(target, dtype)
    if spec["mode"] == "bam":
        _patch_meta(after, "bam", moe_layers, {"num_experts": n, **spec["bam_options"]})
    from ..patching import applied_patches, new_parameters

    patch_new = {id(p): p for p in new_parameters(after).values()}
    routers, experts = dict(patch_new), dict(patch_new)
    for index in family.moe_layers(after):
        mlp = family.mlp_module(after, index)
        routers.update({id(p): p for p in getattr(mlp, family.mlp.router).parameters()})
        experts.update({id(p): p for p in getattr(mlp, family.mlp.experts).parameters()})
    new = {**routers, **experts}
    spec["layers"] = moe_layers
    return BuiltModels(
        before,
        after,
        family_before,
        family,
        applied_patches(after),
        spec,
        sum(p.numel() for p in new.values()),
        sum(p.numel() for p in routers.values()),
        _non_meta(after),
    )


def build_plan_models(
    config: PretrainedConfig, method: str, options: dict[str, Any], layers: Any = "all", dtype: str = "bf16"
) -> BuiltModels:
    """Build the unpatched model and the planned one on the meta device.

    `method` is a registered patch, `none` (the unpatched model) or `upcycle` (options: mode, num_experts, top_k,
    layers, bam_options). A bad option raises the patch's (or upcycling's) own error.
    """
    from ..patching import applied_patches, new_parameters

    family = resolve_family(config)
    before = build_meta(config, dtype)
    if method == "upcycle":
        return _build_upcycled(config, dtype, options, layers, before, family)
    if method == "none":
        if options:
            raise InvalidOptionError(f"method none (the unpatched model) takes no options; got {sorted(options)}.")
        return BuiltModels(before, before, family, family, [], None, 0, 0, _non_meta(before))
    after = build_meta(config, dtype)
    _patch_meta(after, method, layers, options)
    new = sum(p.numel() for p in new_parameters(after).values())
    return BuiltModels(before, after, family, family, applied_patches(after), None, new, new, _non_meta(after))
