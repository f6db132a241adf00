"""Python API: evaluate a model (a folder, a hub id or an object) on the offline task pack with lm-eval."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hf_attn_zoo.errors import InvalidOptionError
from hf_attn_zoo.eval_harness.tasks import TASKS_DIR


__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_MAX_LENGTH", "evaluate", "task_manager"]

DEFAULT_MAX_LENGTH = 2048
DEFAULT_BATCH_SIZE = 8


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: tuple[str, ...], include_defaults: bool, metadata: str) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(
        include_path=list(include_path), include_defaults=include_defaults, metadata=json.loads(metadata) or None
    )


def task_manager(
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    include_defaults: bool = False,
    metadata: dict[str, Any] | None = None,
) -> Any:
    """Return an `lm_eval.tasks.TaskManager` that knows the `zoo_*` tasks (built once per argument set).

    Args:
        include_path (`str | list[str]`, *optional*):
            More task folders to index, after the pack.
        include_defaults (`bool`, *optional*, defaults to `False`):
            Also index lm-eval's ~200 built-in task folders (slower start; they need the hub to run).
        metadata (`dict`, *optional*):
            Metadata given to every task, hence to the pack's loaders (JSON-serialisable values).
    """
    if include_path is None:
        extra = []
    elif isinstance(include_path, (str, os.PathLike)):
        extra = [include_path]
    else:
        extra = list(include_path)
    paths = (str(TASKS_DIR), *(str(Path(p)) for p in extra))
    return _task_manager(paths, include_defaults, json.dumps(metadata or {}, sort_keys=True))


def evaluate(
    model_or_path: str | os.PathLike | torch.nn.Module,
    tasks: str | Sequence[str],
    limit: int | float | None = None,
    batch_size: int | str = DEFAULT_BATCH_SIZE,
    tokenizer: Any = None,
    *,
    patches: list[dict[str, Any]] | None = None,
    num_fewshot: int | None = None,
    device: str | None = None,
    model_args: dict[str, Any] | None = None,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    include_defaults: bool = False,
    output_path: str | os.PathLike | None = None,
    log_samples: bool = False,
    metadata: dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Evaluate a model with lm-eval's `simple_evaluate` through the `hf-attn-zoo` model class.

    Args:
        model_or_path (`str | os.PathLike | PreTrainedModel | lm_eval.api.model.LM`):
            A checkpoint folder or hub id (loaded with `hf_attn_zoo.from_pretrained`, recorded patches included),
            a model object, or a ready lm-eval LM.
        tasks (`str | list[str]`):
            Task or group names, e.g. `["zoo_arc_easy", "zoo_mmlu"]` or `"zoo_suite"`.
        limit (`int | float`, *optional*):
            Documents per task (a fraction when < 1); for smoke tests.
        batch_size (`int | str`, *optional*, defaults to 8):
            lm-eval batch size, or `"auto"`.
        tokenizer (`str | PreTrainedTokenizerBase`, *optional*):
            Defaults to the checkpoint's own tokenizer.
        patches (`list[dict]`, *optional*):
            Patches applied on top, `[{"method": "moh", **options}]`.
        num_fewshot (`int`, *optional*):
            Overrides every task's default number of shots.
        device (`str`, *optional*):
            Defaults to CUDA when available, else CPU.
        model_args (`dict`, *optional*):
            More `ZooLM` / `HFLM` arguments (`dtype`, `max_length`, `peft`, `efficiency=False` to skip the
            efficiency probe, ...).
        include_path (`str | list[str]`, *optional*):
            More task folders besides the pack.
        include_defaults (`bool`, *optional*, defaults to `False`):
            Also index lm-eval's built-in tasks.
        output_path (`str | os.PathLike`, *optional*):
            Also save the results as lm-eval's CLI does (`<output_path>/<model>/results_<date>.json`).
        log_samples (`bool`, *optional*, defaults to `False`):
            Keep per-document outputs under `"samples"`.
        metadata (`dict`, *optional*):
            Task metadata read by the pack's loaders, e.g. `{"zoo_passkey_docs": 5}`. As with lm-eval's CLI, the
            loaders also see the model arguments: `pretrained` and `tokenizer` (when strings) and `max_length`.
        **kwargs:
            Passed to `lm_eval.simple_evaluate` (`gen_kwargs`, `random_seed`, `bootstrap_iters`, ...).

    Returns:
        `dict`: lm-eval's results (`"results"`, `"groups"`, `"configs"`, `"n-samples"`, `"config"`, ...); the
        model's patches, MoH head usage and efficiency (`hf_attn_zoo.eval_harness.efficiency`) are under
        `results["config"]["hf_attn_zoo"]`.

    Example:
        >>> out = evaluate("smollm2-moh", ["zoo_arc_easy", "zoo_piqa"], limit=100)
        >>> out["results"]["zoo_arc_easy"]["acc,none"]
    """
    import lm_eval
    from lm_eval.api.model import LM

    from hf_attn_zoo.eval_harness.lm_model import ZooLM

    task_list = [tasks] if isinstance(tasks, str) else list(tasks)
    task_metadata = dict(metadata or {})
    if isinstance(model_or_path, LM):
        if patches or tokenizer is not None or model_args:
            raise InvalidOptionError(
                "patches, tokenizer and model_args apply when evaluate() builds the model; "
                "pass a model or a path instead of a ready lm-eval LM."
            )
        lm = model_or_path
    else:
        args = dict(model_args or {})
        # lm-eval would use the model's whole context (8192 for SmolLM2): rolling perplexity windows of that length
        # make batch x 8192 x vocab logits (tens of GB); 2048 keeps memory bounded, pass max_length to change it
        args.setdefault("max_length", DEFAULT_MAX_LENGTH)
        if patches:
            args["patch_options"] = list(patches)
        if tokenizer is not None:
            args["tokenizer"] = tokenizer
        pretrained = os.fspath(model_or_path) if isinstance(model_or_path, os.PathLike) else model_or_path
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        lm = ZooLM(pretrained=pretrained, batch_size=batch_size, device=device, **args)
        # the long-context loaders size documents with this tokenizer and check they fit in max_length
        seen_args = {"pretrained": pretrained, "tokenizer": args.get("tokenizer"), "max_length": args["max_length"]}
        task_metadata = {**{k: v for k, v in seen_args.items() if isinstance(v, (str, int))}, **task_metadata}
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=task_list,
        num_fewshot=num_fewshot,
        limit=limit,
        log_samples=log_samples,
        task_manager=task_manager(include_path, include_defaults, task_metadata),
        **kwargs,
    )
    if results is None:
        # lm-eval returns results on rank 0 only
        return {}
    if isinstance(model_or_path, (str, os.PathLike)):
        results["config"]["model"] = os.fspath(model_or_path)
    if output_path is not None:
        _save(results, output_path)
    return results


def _save(results: dict[str, Any], output_path: str | os.PathLike) -> None:
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.utils import sanitize_model_name

    samples = results.pop("samples", None)
    tracker = EvaluationTracker(output_path=os.fspath(output_path))
    name = str(results["config"].get("model") or "model")
    tracker.general_config_tracker.model_name = name
    tracker.general_config_tracker.model_name_sanitized = sanitize_model_name(name)
    tracker.save_results_aggregated(results=results, samples=samples)
    if samples is not None:
        for task_name, task_samples in samples.items():
            tracker.save_results_samples(task_name=task_name, samples=task_samples)
        results["samples"] = samples
