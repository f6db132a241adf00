"""lm-eval model class `hf-attn-zoo`: lm-eval's `HFLM`, loading and patching through `hf_attn_zoo`.

lm-eval has no plugin discovery, so the class is registered when this module is imported (the `hf-attn-zoo eval`
command and `hf_attn_zoo.eval_harness.evaluate` do that). Everything else (batching, padding, generation, every
`HFLM` model argument) is lm-eval's own code, so scores are those of `--model hf` on the same weights.

Patches in `model_args` (values cannot contain commas, lm-eval splits the string on them):

    --model_args pretrained=DIR,patch=moh,patch_options=router:onorm;top_k:6;layers:0|1
    --model_args pretrained=DIR,patch_options=patches.json

`patch_options` is a JSON/YAML file, a JSON string, or inline `key:value;key:value` pairs whose values are parsed as
YAML scalars (`6`, `0.5`, `true`, `null`, `onorm`) and where `a|b|c` makes a list. A file may hold the options of
`patch`, or, without `patch`, one `{"method": ..., **options}` dict or a list of them to stack several patches.

SCMoE self-contrast decoding (arXiv:2405.14507, `hf_attn_zoo.decoding`) of a MoE model, off by default:

    --model_args pretrained=DIR,scmoe=true,scmoe_alpha=0.1,scmoe_beta=0.5,scmoe_weak=rank:2
    --model_args pretrained=DIR,scmoe_loglikelihood=true,scmoe_alpha=0.0001

`scmoe=true` decodes `generate_until` requests with SCMoE (greedy on the contrastive score, or sampling when the
task asks for it; the task's `until` strings, `max_gen_toks` and EOS stop each row as in `HFLM`). Weak routings:
`rank:k`, `top1`, `top_m:m`. `scmoe_loglikelihood=true` scores `loglikelihood` / multiple-choice / rolling requests
with `hf_attn_zoo.decoding.scmoe_logprobs` (the contrastive score normalised over the alpha-plausible tokens; a
token outside them scores -inf, so a small alpha suits multiple choice).

Efficiency, on by default: when the model is built, a short fixed probe (`hf_attn_zoo.eval_harness.efficiency`)
measures prefill and decode tokens/s, peak memory and KV-cache bytes per token; lm-eval keeps them in the results
under `config.hf_attn_zoo.efficiency`, where `hf-attn-zoo report` finds them.

    --model_args pretrained=DIR,efficiency=false                  # no probe
    --model_args pretrained=DIR,efficiency_prompt_tokens=2048     # a prompt longer than a method's window
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from hf_attn_zoo.assets.model import resolve_model
from hf_attn_zoo.decoding import scmoe as _scmoe
from hf_attn_zoo.errors import InvalidOptionError
from hf_attn_zoo.eval_harness import MODEL_NAME
from hf_attn_zoo.eval_harness.efficiency import PROMPT_TOKENS, measure_efficiency
from hf_attn_zoo.loading import from_pretrained as _zoo_from_pretrained
from hf_attn_zoo.patching import applied_patches
from hf_attn_zoo.patching import patch as _patch_model

__all__ = ["ZooLM", "parse_patch_args", "parse_scmoe_args"]

logger = logging.getLogger(__name__)

PatchSpec = dict[str, Any]


def _parse_scalar(text: str) -> Any:
    if "|" in text:
        return [_parse_scalar(part) for part in text.split("|") if part.strip()]
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _parse_inline(text: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        key, sep, value = item.partition(":")
        if not sep or not key.strip():
            raise InvalidOptionError(f"patch_options: expected 'key:value' pairs separated by ';', got {item!r}")
        options[key.strip()] = _parse_scalar(value.strip())
    return options


def _read_options(value: Any) -> Any:
    if value is None or isinstance(value, (dict, list)):
        return value
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise InvalidOptionError(f"patch_options must be a dict, a list, a file path or a string, got {value!r}")
    text = value.strip()
    if not text:
        return None
    path = Path(text).expanduser()
    if text.endswith((".json", ".yaml", ".yml")):
        if not path.is_file():
            raise InvalidOptionError(f"patch_options file {str(path)!r} does not exist")
        content = path.read_text(encoding="utf-8")
        return json.loads(content) if path.suffix == ".json" else yaml.safe_load(content)
    if text[0] in "{[":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise InvalidOptionError(f"patch_options is not valid JSON: {err}") from None
    return _parse_inline(text)


def parse_patch_args(patch: str | None = None, patch_options: Any = None) -> list[PatchSpec] | None:
    """Turn the `patch` / `patch_options` model arguments into `hf_attn_zoo.from_pretrained(patches=...)` specs.

    Args:
        patch (`str`, *optional*):
            A method key (e.g. `"moh"`).
        patch_options (`dict | list | str | os.PathLike`, *optional*):
            The method's options: a dict, a `.json`/`.yaml` file, a JSON string, or inline `key:value;key:value`.
            Without `patch`, a `{"method": ..., **options}` dict or a list of them.

    Returns:
        `list[dict] | None`: One `{"method": ..., **options}` dict per patch, or `None` when nothing is patched.

    Raises:
        `InvalidOptionError`: Malformed options, or options without a method.

    Example:
        >>> parse_patch_args("moh", "router:onorm;top_k:6;layers:0|1")
        [{'method': 'moh', 'router': 'onorm', 'top_k': 6, 'layers': [0, 1]}]
    """
    if isinstance(patch, str) and patch.strip().lower() in ("", "none"):
        patch = None
    options = _read_options(patch_options)
    if patch is not None:
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise InvalidOptionError(
                f"patch={patch!r} takes a dict of options; got {type(options).__name__}. Drop `patch` to pass a "
                "list of {'method': ..., **options} specs."
            )
        options.pop("method", None)
        return [{"method": str(patch), **options}]
    if options is None:
        return None
    specs = options if isinstance(options, list) else [options]
    for spec in specs:
        if not isinstance(spec, dict) or "method" not in spec:
            raise InvalidOptionError(
                f"patch_options without `patch` must give each patch's method, e.g. {{'method': 'moh', ...}}; "
                f"got {spec!r}"
            )
    return [dict(spec) for spec in specs]


class _ZooAutoModel:
    """Stands in for `AutoModelForCausalLM` inside `HFLM._create_model`, so lm-eval's own loading path is kept."""

    def __init__(self, patches: list[PatchSpec] | None):
        self.patches = patches

    def from_pretrained(self, pretrained_model_name_or_path: str, **kwargs: Any) -> torch.nn.Module:
        return _zoo_from_pretrained(pretrained_model_name_or_path, patches=self.patches, **kwargs)


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise InvalidOptionError(f"{name} must be true or false, got {value!r}")


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise InvalidOptionError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InvalidOptionError(f"{name} must be a number, got {value!r}") from None


def _as_positive_int(name: str, value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise InvalidOptionError(f"{name} must be a whole number >= 1, got {value!r}")


def parse_scmoe_args(
    scmoe: Any = False,
    scmoe_loglikelihood: Any = False,
    scmoe_alpha: Any = 0.1,
    scmoe_beta: Any = 0.5,
    scmoe_weak: Any = "rank:2",
    scmoe_ban_eos: Any = False,
) -> tuple[_scmoe.SCMoEConfig | None, bool, bool]:
    """`(config, for generate_until, for loglikelihood)` from the `scmoe*` model arguments (config None when off).

    Example:
        >>> parse_scmoe_args(scmoe="true", scmoe_beta="0.3", scmoe_weak="top1")[0].weak
        'top1'
    """
    generate = _as_bool("scmoe", scmoe)
    loglikelihood = _as_bool("scmoe_loglikelihood", scmoe_loglikelihood)
    if not (generate or loglikelihood):
        return None, False, False
    if not isinstance(scmoe_weak, str):
        raise InvalidOptionError(f"scmoe_weak must be 'rank:k', 'top1' or 'top_m:m', got {scmoe_weak!r}")
    config = _scmoe.SCMoEConfig.from_kwargs(
        alpha=_as_float("scmoe_alpha", scmoe_alpha),
        beta=_as_float("scmoe_beta", scmoe_beta),
        weak=scmoe_weak,
        ban_eos=_as_bool("scmoe_ban_eos", scmoe_ban_eos),
    )
    return config, generate, loglikelihood


def _reset_head_usage(model: torch.nn.Module) -> None:
    try:
        from hf_attn_zoo.analysis import reset_head_usage
    except ImportError:
        return
    reset_head_usage(model)


def _head_usage(model: torch.nn.Module) -> dict[str, Any] | None:
    try:
        from hf_attn_zoo.analysis import head_usage
    except ImportError:
        return None
    try:
        usage = head_usage(model)
    except Exception as err:  # noqa: BLE001  the statistic is optional; failing on it must not lose the scores
        logger.warning("hf_attn_zoo.analysis.head_usage failed: %s", err)
        return None
    if not usage.get("layers"):
        return None
    return json.loads(json.dumps(usage, default=_to_jsonable))


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "__dataclass_fields__"):
        return {name: getattr(value, name) for name in value.__dataclass_fields__}
    return str(value)


@register_model(MODEL_NAME)
class ZooLM(HFLM):
    """lm-eval's `HFLM` that loads through `hf_attn_zoo.from_pretrained` and can patch the model first.

    Checkpoints saved from a patched model are re-patched from their `config.hf_attn_zoo` record; `patch` /
    `patch_options` add patches on top (their new weights start from the method's initialisation).

    Args:
        pretrained (`str | os.PathLike | PreTrainedModel`):
            A local folder, a hub id, or an already-built (possibly patched) model.
        patch (`str`, *optional*):
            Method key to apply, e.g. `"moh"`.
        patch_options (`dict | list | str`, *optional*):
            Options of `patch`, or patch specs; see `parse_patch_args`.
        scmoe (`bool`, *optional*, defaults to `False`):
            Decode `generate_until` requests with SCMoE (`hf_attn_zoo.decoding.scmoe_decode`).
        scmoe_loglikelihood (`bool`, *optional*, defaults to `False`):
            Score log-likelihood requests with `hf_attn_zoo.decoding.scmoe_logprobs`.
        scmoe_alpha (`float`, *optional*, defaults to 0.1):
            Plausibility cutoff in (0, 1].
        scmoe_beta (`float`, *optional*, defaults to 0.5):
            Contrast strength >= 0 (0 = the model's own greedy choice).
        scmoe_weak (`str`, *optional*, defaults to `"rank:2"`):
            Weak routing: `rank:k`, `top1` or `top_m:m`.
        scmoe_ban_eos (`bool`, *optional*, defaults to `False`):
            Never generate EOS (the official SCMoE code's default).
        efficiency (`bool`, *optional*, defaults to `True`):
            Measure the model with the efficiency probe once it is built (`get_model_info()["hf_attn_zoo"]`).
        efficiency_prompt_tokens (`int`, *optional*, defaults to 128):
            The probe's prompt length.
        **kwargs:
            Every `HFLM` argument (`tokenizer`, `dtype`, `batch_size`, `device`, `max_length`, `peft`, ...).

    Example:
        >>> lm = ZooLM(pretrained="smollm2", patch="moh", patch_options={"router": "onorm"}, device="cpu")
        >>> lm = ZooLM(pretrained="mixtral-dir", scmoe=True, scmoe_beta=0.5, scmoe_weak="rank:2")
    """

    def __init__(
        self,
        pretrained: str | os.PathLike | torch.nn.Module,
        patch: str | None = None,
        patch_options: Any = None,
        scmoe: bool = False,
        scmoe_loglikelihood: bool = False,
        scmoe_alpha: float = 0.1,
        scmoe_beta: float = 0.5,
        scmoe_weak: str = "rank:2",
        scmoe_ban_eos: bool = False,
        efficiency: bool = True,
        efficiency_prompt_tokens: int = PROMPT_TOKENS,
        **kwargs: Any,
    ) -> None:
        self._zoo_scmoe, self._zoo_scmoe_generate, self._zoo_scmoe_loglikelihood = parse_scmoe_args(
            scmoe, scmoe_loglikelihood, scmoe_alpha, scmoe_beta, scmoe_weak, scmoe_ban_eos
        )
        self._zoo_patches = parse_patch_args(patch, patch_options)
        measure = _as_bool("efficiency", efficiency)
        prompt_tokens = _as_positive_int("efficiency_prompt_tokens", efficiency_prompt_tokens)
        if isinstance(pretrained, os.PathLike):
            pretrained = os.fspath(pretrained)
        if isinstance(pretrained, str):  # `default` is the embedded SmolLM2, `~/...` a local folder, as elsewhere
            pretrained = os.fspath(resolve_model(pretrained))
        if not isinstance(pretrained, str):
            for spec in self._zoo_patches or []:
                spec = dict(spec)
                _patch_model(pretrained, spec.pop("method"), **spec)
        super().__init__(pretrained=pretrained, **kwargs)
        if self._zoo_scmoe is not None:
            # a dense model or an out-of-range weak rank fails here, before any request runs
            _scmoe.check_model(self._model, self._zoo_scmoe)
        self._zoo_efficiency = self._measure_efficiency(prompt_tokens) if measure else None
        # MoH routers count head use from their creation; the report wants the counts of this evaluation only.
        _reset_head_usage(self._model)

    def _measure_efficiency(self, prompt_tokens: int) -> dict[str, Any]:
        """The probe's measurements, or `{"error": ...}`: an optional statistic must not stop the evaluation."""
        try:
            with torch.autocast(  # as `HFLM._model_call` runs the model
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ):
                found = measure_efficiency(self._model, self.tokenizer, self.device, prompt_tokens=prompt_tokens)
        except Exception as err:  # noqa: BLE001
            logger.warning("hf-attn-zoo efficiency probe failed: %s", err)
            return {"error": f"{type(err).__name__}: {err}"}
        return asdict(found)

    def _model_call(
        self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`HFLM._model_call`; with `scmoe_loglikelihood`, the SCMoE log-scores of `inps` instead of the logits.

        lm-eval applies `log_softmax` to the result, which leaves normalised log-scores unchanged.
        """
        if not self._zoo_scmoe_loglikelihood or attn_mask is not None or labels is not None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        with torch.autocast(
            device_type=self.device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        ):
            return _scmoe.scmoe_logprobs(self.model, inps, config=self._zoo_scmoe)

    def _model_generate(
        self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any
    ) -> torch.Tensor:
        """`HFLM._model_generate`; with `scmoe`, `generate` runs `scmoe_decode` as its decoding loop, so stop
        strings, `max_gen_toks`, EOS and padding are handled by the same `generate` preparation."""
        if self._zoo_scmoe_generate:
            generation_kwargs = {**generation_kwargs, "custom_generate": _scmoe.scmoe_decode, "scmoe": self._zoo_scmoe}
        return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def _create_model(self, pretrained: str, *args: Any, **kwargs: Any) -> None:
        auto_model_class = self.AUTO_MODEL_CLASS
        if self.backend != "causal":
            raise InvalidOptionError(f"hf-attn-zoo evaluates causal LMs only; {pretrained!r} is {self.backend}.")
        self.AUTO_MODEL_CLASS = _ZooAutoModel(self._zoo_patches)
        try:
            super()._create_model(pretrained, *args, **kwargs)
        finally:
            self.AUTO_MODEL_CLASS = auto_model_class

    def get_model_info(self) -> dict[str, Any]:
        """lm-eval's model info, plus the patches, the MoH head usage of this run and the efficiency probe's
        measurements under `"hf_attn_zoo"`.

        Unlike `HFLM`, no hub request is made for local folders or model objects.
        """
        model = self._model
        pretrained = self.pretrained
        if isinstance(pretrained, str) and not Path(pretrained).exists():
            info = super().get_model_info()
        else:
            info = {
                "model_num_parameters": sum(p.numel() for p in model.parameters()),
                "model_dtype": str(getattr(model, "dtype", "")),
                "model_revision": self.revision,
                "model_sha": "",
            }
        zoo_info: dict[str, Any] = {"patches": applied_patches(model)}
        if self._zoo_scmoe is not None:
            zoo_info["scmoe"] = {
                **self._zoo_scmoe.to_dict(),
                "generate_until": self._zoo_scmoe_generate,
                "loglikelihood": self._zoo_scmoe_loglikelihood,
            }
        usage = _head_usage(model)
        if usage is not None:
            zoo_info["head_usage"] = usage
        if self._zoo_efficiency is not None:
            zoo_info["efficiency"] = self._zoo_efficiency
        info["hf_attn_zoo"] = zoo_info
        return info
