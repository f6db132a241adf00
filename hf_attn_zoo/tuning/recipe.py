"""The continue-tuning recipe: a pydantic schema, and a YAML loader whose errors name the file, key and line.

A recipe is one YAML file (see `hf_attn_zoo/recipes/`). Every section rejects unknown keys. `load_recipe` turns any
problem (invalid YAML, an unknown key, a wrong type, an unknown corpus or method option, a missing data file) into a
single `RecipeError` whose message lists `file:line: key.path: what is wrong` for each problem found.

Sections (each documented on its class below): `model` (`ModelSection`), `patches` (`PatchSpec`), `init`
(`InitStep`), `data` (`DataSection`), `train` (`TrainSection`, with `train.lora`: `LoraSection`), `optim`
(`OptimSection`), `moe` (`MoESection`: router losses for MoE models), `eval` (`EvalSection`), `output_dir`, `seed`.
`docs/recipes.md` describes them in prose.

A MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE, or a dense model upcycled to one) trains with its router losses like this:

```yaml
moe:
  load_balance_weight: 0.01   # Switch load balancing N sum_i f_i P_i, mean over the MoE layers
  z_loss_weight: 0.001        # router z-loss mean_t logsumexp(x_t)^2, mean over the MoE layers
train:
  what: moe                   # routers + experts (or `all`, or `lora`: routers train fully next to the adapters)
```

Example:

```python
>>> from hf_attn_zoo.tuning.recipe import load_recipe
>>> recipe = load_recipe("moh/smollm2_quick", overrides=["optim.lr=1e-4", "train.what=all"])
>>> recipe.train.max_steps
40
```
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import re
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
)

from ..errors import InvalidOptionError, RecipeError

__all__ = [
    "CorpusSource",
    "DataSection",
    "DistributedSection",
    "EvalSection",
    "FilesSource",
    "HFDatasetSource",
    "InitStep",
    "LoraSection",
    "MoESection",
    "ModelSection",
    "OptimSection",
    "PatchSpec",
    "Recipe",
    "TrainSection",
    "apply_overrides",
    "find_recipe",
    "load_recipe",
    "recipes_dir",
    "shipped_recipes",
    "validate_recipe",
]

Loc = tuple[str | int, ...]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Section):
    """Which checkpoint to start from.

    Args:
        path (`str`, *optional*, defaults to `"default"`):
            A local HF folder, a hub id, or `"default"` for the embedded SmolLM2-135M (`hf_attn_zoo.assets`).
        dtype (`str`, *optional*, defaults to `"float32"`):
            Dtype the weights are loaded in: `float32`, `bfloat16`, `float16` or `auto` (the checkpoint's).
        attn_implementation (`str`, *optional*):
            Passed to `from_pretrained` (e.g. `sdpa`, `flash_attention_2`).
        revision (`str`, *optional*):
            Hub revision.
    """

    path: str = "default"
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    attn_implementation: str | None = None
    revision: str | None = None


class PatchSpec(BaseModel):
    """One `hf_attn_zoo.patch(model, method, layers, **options)` call; every key besides these two is an option.

    Args:
        method (`str`): registered method key, e.g. `moh`.
        layers (`str | int | list[int]`, *optional*, defaults to `"all"`): layer selector.
    """

    model_config = ConfigDict(extra="allow")

    method: str
    layers: str | int | list[int] = "all"

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class CorpusSource(_Section):
    """Documents of a corpus from `hf_attn_zoo.assets.corpora` (its held-out documents are never used).

    Args:
        corpus (`str`): one of `corpus_names()`.
        max_docs (`int`, *optional*): use only the first `max_docs` documents (in the corpus's fixed order).
    """

    corpus: str
    max_docs: int | None = Field(default=None, ge=1)


class FilesSource(_Section):
    """Local files: one document per `text` file, or one per line of a `jsonl` file.

    Args:
        files (`list[str]`): paths, relative to the recipe file's folder unless absolute.
        format (`str`, *optional*, defaults to `"text"`): `text` or `jsonl`.
        text_field (`str`, *optional*, defaults to `"text"`): field of each JSON line holding the text.
    """

    files: list[str] = Field(min_length=1)
    format: Literal["text", "jsonl"] = "text"
    text_field: str = "text"


class HFDatasetSource(_Section):
    """A `datasets.load_dataset(hf_dataset, config, split=split)` dataset (must be cached when offline).

    Args:
        hf_dataset (`str`): dataset id or loader name (`json`, `text` ...).
        config (`str`, *optional*): dataset configuration name.
        split (`str`, *optional*, defaults to `"train"`): split to read.
        text_field (`str`, *optional*, defaults to `"text"`): column holding the text.
        max_docs (`int`, *optional*): use only the first `max_docs` rows.
    """

    hf_dataset: str
    config: str | None = None
    split: str = "train"
    text_field: str = "text"
    max_docs: int | None = Field(default=None, ge=1)


_SOURCE_TAGS = {"corpus": "corpus_source", "files": "files_source", "hf_dataset": "hf_dataset_source"}


def _source_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        return next((tag for key, tag in _SOURCE_TAGS.items() if key in value), None)
    return {CorpusSource: "corpus_source", FilesSource: "files_source", HFDatasetSource: "hf_dataset_source"}.get(
        type(value)
    )


DataSource = Annotated[
    Annotated[CorpusSource, Tag("corpus_source")]
    | Annotated[FilesSource, Tag("files_source")]
    | Annotated[HFDatasetSource, Tag("hf_dataset_source")],
    Discriminator(
        _source_kind,
        custom_error_type="data_source",
        custom_error_message="a data source needs one of the keys `corpus`, `files` or `hf_dataset`",
    ),
]


class DataSection(_Section):
    """Training text: documents from every source are tokenized, joined with EOS and packed into `seq_len` blocks.

    Args:
        sources (`list`, *optional*, defaults to `[{corpus: python_stdlib_docs}]`):
            `{corpus: name}`, `{files: [...], format, text_field}` or `{hf_dataset: id, config, split, text_field}`.
        seq_len (`int`, *optional*, defaults to 256): tokens per training block.
        held_out_fraction (`float`, *optional*, defaults to 0.0):
            share of the documents (document-level, deterministic) kept apart to report an eval loss.
        num_proc (`int`, *optional*): processes for tokenization (`datasets.map`), for large hub datasets.
    """

    sources: list[DataSource] = Field(default_factory=lambda: [CorpusSource(corpus="python_stdlib_docs")], min_length=1)
    seq_len: int = Field(default=256, ge=8)
    held_out_fraction: float = Field(default=0.0, ge=0.0, lt=0.5)
    num_proc: int | None = Field(default=None, ge=1)


class LoraSection(_Section):
    """LoRA adapters (peft). Parameters created by the patches are trained fully through `modules_to_save`, and so
    are the routers of a MoE model (`mlp.gate`).

    Args:
        r (`int`, *optional*, defaults to 8): rank.
        alpha (`float`, *optional*, defaults to 16): scaling numerator (`lora_alpha`).
        dropout (`float`, *optional*, defaults to 0.0): dropout on the LoRA input.
        target_modules (`list[str]`, *optional*, defaults to the attention projections): module names to adapt.
        target_parameters (`list[str]`, *optional*, defaults to none): parameters to adapt that are not in a
            `Linear` (peft `target_parameters`), e.g. `[experts.gate_up_proj, experts.down_proj]` for LoRA on the
            fused experts of a MoE model.
    """

    r: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)
    target_parameters: list[str] = Field(default_factory=list)


class DistributedSection(_Section):
    """How the processes of a multi-process run share the model (`train.distributed`; one process ignores it).

    Start several processes with `hf-attn-zoo tune RECIPE --nproc N` (torchrun), `torchrun --nproc_per_node N -m
    hf_attn_zoo.tuning tune RECIPE` or `accelerate launch --multi_gpu --num_processes N -m hf_attn_zoo.tuning tune
    RECIPE` (on CPU too: it then runs over gloo).

    Args:
        strategy (`str`, *optional*, defaults to `"ddp"`):
            `ddp`: every process holds the whole model and averages gradients (DistributedDataParallel). `fsdp`:
            PyTorch FSDP2 (`fully_shard`) shards parameters, gradients and optimizer states over the processes, one
            unit per decoder layer (the model's `_no_split_modules`), so the patches' new modules (routers, experts)
            shard with their layer; on CPU it runs over gloo. `deepspeed`: DeepSpeed ZeRO through the Trainer's
            integration (needs the `deepspeed` package and GPUs).
        reshard_after_forward (`bool`, *optional*, defaults to `True`):
            fsdp: free each layer's gathered parameters after its forward (ZeRO-3-like); `False` keeps them until
            the backward (ZeRO-2-like: more memory, one all-gather less per layer).
        cpu_offload (`bool`, *optional*, defaults to `False`): fsdp / deepspeed: keep shards and optimizer states
            in CPU memory.
        zero_stage (`int`, *optional*, defaults to 3): deepspeed: ZeRO stage 2 (optimizer states and gradients
            sharded) or 3 (parameters too).
        deepspeed_config (`str`, *optional*): deepspeed: a DeepSpeed JSON file (relative to the recipe); by default
            the shipped `hf_attn_zoo/tuning/configs/deepspeed_zero{2,3}.json`, whose `auto` values the Trainer fills
            from the recipe.
    """

    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    zero_stage: Literal[2, 3] = 3
    deepspeed_config: str | None = None


class TrainSection(_Section):
    """What is trained, and for how long.

    Args:
        what (`str`, *optional*, defaults to `"all"`):
            `all` (every weight); `new` (only the parameters the patches created); `moe` (MoE models: every
            parameter of the MoE blocks (routers, experts, Qwen2-MoE's shared expert) and the new parameters,
            the rest frozen: the usual choice for an upcycled model); `lora` (LoRA adapters + the new parameters,
            and for MoE models the routers, trained fully through `modules_to_save`; `lora.target_parameters`
            adds LoRA on the fused experts). Routers are not "new" parameters (they come with the checkpoint), so
            `new` leaves them frozen.
        lora (`LoraSection`, *optional*): LoRA settings, used when `what: lora`.
        batch_size (`int`, *optional*, defaults to 8): blocks per device per micro-step.
        grad_accum (`int`, *optional*, defaults to 1): micro-steps per optimizer step.
        global_batch_size (`int`, *optional*):
            blocks per optimizer step over all processes; sets `grad_accum` to
            `global_batch_size / (batch_size * processes)` at launch, so one recipe fits any number of GPUs.
        max_steps (`int`, *optional*): optimizer steps. Exactly one of `max_steps` and `token_budget` is given.
        token_budget (`int`, *optional*): training tokens; steps = ceil(budget / (global batch * seq_len)).
        save_steps (`int`, *optional*): checkpoint interval in steps (`None`: no intermediate checkpoints).
        save_total_limit (`int`, *optional*, defaults to 2): checkpoints kept.
        logging_steps (`int`, *optional*, defaults to 1): loss logging interval.
        eval_steps (`int`, *optional*): held-out eval interval (needs `data.held_out_fraction` > 0).
        mixed_precision (`str`, *optional*, defaults to `"no"`): `no`, `bf16` or `fp16` autocast.
        gradient_checkpointing (`bool`, *optional*, defaults to `False`).
        resume (`bool`, *optional*, defaults to `True`): continue from the last checkpoint in `output_dir`.
            A finished run (`result.json` and `final/`) of the same recipe is never retrained or overwritten: a rerun
            trains nothing and returns its stored result (`hf-attn-zoo tune --overwrite` starts over).
        allow_recipe_change (`bool`, *optional*, defaults to `False`): continue (or retrain) a run in `output_dir`
            whose `recipe.yaml` differs from this recipe. Without it such a run is refused, naming the changed
            keys. Changes that do not alter what is trained never count: `name`, `description`, `output_dir`,
            `train.resume`, `train.allow_recipe_change`, `train.logging_steps`, `train.save_steps`,
            `train.save_total_limit`, `train.eval_steps`, `eval`, and `init` when resuming from a checkpoint (the
            init hooks do not run then).
        distributed (`DistributedSection`, *optional*): `ddp`, `fsdp` or `deepspeed` for multi-process runs.
        trainer_args (`dict`, *optional*): extra `transformers.TrainingArguments` (not `fsdp` / `deepspeed`: those
            come from `distributed`).
    """

    what: Literal["new", "lora", "moe", "all"] = "all"
    lora: LoraSection | None = None
    batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    global_batch_size: int | None = Field(default=None, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    token_budget: int | None = Field(default=None, ge=1)
    save_steps: int | None = Field(default=None, ge=1)
    save_total_limit: int | None = Field(default=2, ge=1)
    logging_steps: int = Field(default=1, ge=1)
    eval_steps: int | None = Field(default=None, ge=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    resume: bool = True
    allow_recipe_change: bool = False
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    trainer_args: dict[str, Any] = Field(default_factory=dict)


class OptimSection(_Section):
    """Optimizer and learning-rate schedule.

    Args:
        name (`str`, *optional*, defaults to `"adamw_torch"`): a `transformers` optimizer name (`OptimizerNames`).
        lr (`float`, *optional*, defaults to 1e-4): peak learning rate.
        min_lr (`float`, *optional*, defaults to 0.0): final learning rate of the `cosine` / `linear` decay.
        schedule (`str`, *optional*, defaults to `"cosine"`): `cosine`, `linear` or `constant`, after the warm-up.
        warmup_steps (`int`, *optional*, defaults to 0): linear warm-up from 0 to `lr`.
        weight_decay (`float`, *optional*, defaults to 0.0).
        max_grad_norm (`float`, *optional*, defaults to 1.0): gradient clipping (`None` disables it).
        betas (`tuple[float, float]`, *optional*, defaults to `(0.9, 0.999)`).
        eps (`float`, *optional*, defaults to 1e-8).
    """

    name: str = "adamw_torch"
    lr: float = Field(default=1e-4, gt=0)
    min_lr: float = Field(default=0.0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)


class MoESection(_Section):
    """Router losses for training a MoE model (`hf_attn_zoo.install_router_losses`), added to the LM loss.

    Each is computed per MoE layer from the router logits and averaged over the MoE layers (as transformers' Mixtral
    loss and MoH's balance loss do; BAM, arXiv 2408.08274 Sec. 4, sums them: multiply by the number of MoE layers to
    match it). Padding tokens (attention mask 0) do not count. They are logged as `aux_loss` (weighted sum, next to
    `lm_loss`), `moe_load_balance_loss` and `moe_z_loss` (unweighted). With the section present, transformers' own
    Mixtral-style loss (`output_router_logits`) is off during training, so the balance loss counts once. The model
    (after the patches) must have MoE layers.

    Args:
        load_balance_weight (`float`, *optional*, defaults to 0.01):
            weight of the Switch load-balancing loss `N sum_i f_i P_i` (f_i: share of tokens with expert i in their
            top-k, P_i: mean router probability of expert i; `k` when perfectly balanced).
        z_loss_weight (`float`, *optional*, defaults to 0.001):
            weight of the router z-loss `mean_t (logsumexp_j x_tj)^2` (ST-MoE), which keeps router logits small.
    """

    load_balance_weight: float = Field(default=0.01, ge=0.0)
    z_loss_weight: float = Field(default=0.001, ge=0.0)


class EvalSection(_Section):
    """Benchmarks run on the final model with `hf_attn_zoo.eval_harness.evaluate(model, tasks, limit)`.

    Args:
        tasks (`list[str]`): task names.
        limit (`int | float`, *optional*): examples per task (or a fraction).
    """

    tasks: list[str] = Field(min_length=1)
    limit: int | float | None = None


class InitStep(_Section):
    """A preparation step run after patching and before training, e.g. router distillation.

    Args:
        name (`str`): a name registered in `hf_attn_zoo.tuning.init_hooks`, or `"package.module:function"`.
        options (`dict`, *optional*): keyword arguments of the hook.
    """

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class _SourceMap:
    """Where each key of a loaded recipe was written: `loc -> (file, line, column)` (1-based), or an override."""

    def __init__(self, file: str, base_dir: Path):
        self.file = file
        self.base_dir = base_dir
        self.marks: dict[Loc, tuple[str, int, int]] = {}

    def find(self, loc: Loc) -> tuple[str, int, int] | None:
        for end in range(len(loc), -1, -1):
            if loc[:end] in self.marks:
                return self.marks[loc[:end]]
        return None


class Recipe(_Section):
    """A continue-tuning recipe. See the module docstring and `hf_attn_zoo/recipes/` for examples."""

    name: str | None = None
    description: str | None = None
    model: ModelSection = Field(default_factory=ModelSection)
    patches: list[PatchSpec] = Field(default_factory=list)
    init: list[InitStep] = Field(default_factory=list)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    moe: MoESection | None = None
    eval: EvalSection | None = None
    output_dir: str | None = None
    seed: int = 0

    _source: _SourceMap | None = PrivateAttr(default=None)

    def location(self, loc: Sequence[str | int]) -> str:
        """`file:line: key.path` of a key of this recipe (best effort for recipes built in code)."""
        return _format_loc(self._source, tuple(loc))

    def resolved_output_dir(self) -> Path:
        """`output_dir`, or `runs/<name>` when it is not set."""
        if self.output_dir:
            return Path(self.output_dir)
        return Path("runs") / (self.name or "recipe")

    @property
    def base_dir(self) -> Path:
        """Folder that relative data paths are resolved against (the recipe file's, else the working directory)."""
        return self._source.base_dir if self._source is not None else Path.cwd()

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json")
        if data.get("moe") is None:
            data.pop("moe", None)  # `moe: null` in a file asks for `moe: {}` (see `_empty_moe_problems`)
        return yaml.safe_dump(data, sort_keys=False)


def _format_key(loc: Loc) -> str:
    return ".".join(str(part) for part in loc) or "<top level>"


def _format_loc(source: _SourceMap | None, loc: Loc) -> str:
    mark = source.find(loc) if source is not None else None
    if mark is None:
        return f"{source.file if source else '<recipe>'}: {_format_key(loc)}"
    file, line, column = mark
    where = f"{file}:{line}" if line > 0 else file
    return f"{where}: {_format_key(loc)}"


class _Loader(yaml.SafeLoader):
    """YAML 1.1 safe loader that also reads `1e-4` (no dot) as a float, as YAML 1.2 and people do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_with_marks(text: str, file: str) -> tuple[Any, dict[Loc, tuple[str, int, int]]]:
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark is not None else file
        problem = getattr(exc, "problem", None) or str(exc)
        context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and context_mark is not None:
            context += f" started at line {context_mark.line + 1}"
        raise RecipeError(f"{where}: invalid YAML: {problem}" + (f" ({context})" if context else "")) from None
    marks: dict[Loc, tuple[str, int, int]] = {}
    duplicates: list[str] = []

    def walk(current: yaml.Node, loc: Loc) -> None:
        if isinstance(current, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in current.value:
                key = key_node.value
                if key in seen:
                    line = key_node.start_mark.line + 1
                    duplicates.append(f"{file}:{line}: {_format_key(loc + (key,))}: duplicate key")
                seen.add(key)
                marks[loc + (key,)] = (file, key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                walk(value_node, loc + (key,))
        elif isinstance(current, yaml.SequenceNode):
            for index, item in enumerate(current.value):
                marks[loc + (index,)] = (file, item.start_mark.line + 1, item.start_mark.column + 1)
                walk(item, loc + (index,))

    if node is not None:
        marks[()] = (file, node.start_mark.line + 1, node.start_mark.column + 1)
        walk(node, ())
    if duplicates:
        raise RecipeError("\n".join(duplicates) if len(duplicates) == 1 else _many(file, duplicates))
    return data, marks


def _many(file: str, problems: list[str]) -> str:
    return f"{len(problems)} problems in recipe {file}:\n  " + "\n  ".join(problems)


def _merge(base: dict, base_marks: dict, child: dict, child_marks: dict, loc: Loc = ()) -> tuple[dict, dict]:
    merged = dict(base)
    marks = {k: v for k, v in base_marks.items() if k[: len(loc)] == loc}
    for key, value in child.items():
        key_loc = loc + (key,)
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key], sub = _merge(merged[key], marks, value, child_marks, key_loc)
            marks = {k: v for k, v in marks.items() if k[: len(key_loc)] != key_loc}
            marks.update(sub)
        else:
            merged[key] = value
            marks = {k: v for k, v in marks.items() if k[: len(key_loc)] != key_loc}
            marks.update({k: v for k, v in child_marks.items() if k[: len(key_loc)] == key_loc})
    return merged, marks


def _load_tree(path: Path, display: str, chain: tuple[Path, ...] = ()) -> tuple[dict, dict]:
    if path.resolve() in chain:
        raise RecipeError(f"{display}: `_base` includes form a cycle: {' -> '.join(str(p) for p in chain + (path,))}")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"{display}: cannot read recipe: {exc.strerror or exc}") from None
    data, marks = _yaml_with_marks(text, display)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{display}:1: a recipe must be a mapping of sections, got {type(data).__name__}")
    bases = data.pop("_base", None)
    if bases is None:
        return data, marks
    base_list = [bases] if isinstance(bases, str) else bases
    if not isinstance(base_list, list) or not all(isinstance(b, str) for b in base_list):
        raise RecipeError(f"{_format_loc(_map(display, marks), ('_base',))}: must be a path or a list of paths")
    merged: dict = {}
    merged_marks: dict = {}
    for index, base in enumerate(base_list):
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        if not base_path.is_file():
            loc = ("_base",) if isinstance(bases, str) else ("_base", index)
            raise RecipeError(f"{_format_loc(_map(display, marks), loc)}: base recipe {str(base_path)!r} not found")
        base_display = _display_path(base_path)
        base_data, base_marks = _load_tree(base_path, base_display, chain + (path.resolve(),))
        merged, merged_marks = _merge(merged, merged_marks, base_data, base_marks)
    marks = {k: v for k, v in marks.items() if k[:1] != ("_base",)}
    return _merge(merged, merged_marks, data, marks)


def _map(display: str, marks: dict) -> _SourceMap:
    source = _SourceMap(display, Path.cwd())
    source.marks = marks
    return source


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def apply_overrides(data: dict, overrides: Iterable[str], marks: dict | None = None) -> dict:
    """Apply dotted command-line overrides (`train.what=all`, `patches.0.top_k=4`) to a recipe's raw mapping.

    Values are parsed as YAML (`1e-4`, `[q_proj, v_proj]`, `null`); missing intermediate mappings are created.

    Raises:
        `RecipeError`: an override without `=`, or one that indexes past a list or into a scalar.
    """
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"override {override!r} must look like key.path=value (e.g. optim.lr=1e-4)")
        try:
            value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parts: list[str | int] = []
        node: Any = data
        segments = key.strip().split(".")
        for position, segment in enumerate(segments):
            last = position == len(segments) - 1
            if isinstance(node, list):
                if not segment.lstrip("-").isdigit() or not -len(node) <= int(segment) < len(node):
                    raise RecipeError(
                        f"override {override!r}: {_format_key(tuple(parts))} is a list of {len(node)} items; "
                        f"{segment!r} is not an index of it"
                    )
                index = int(segment) % len(node)
                parts.append(index)
                if last:
                    node[index] = value
                else:
                    node = node[index]
            elif isinstance(node, dict):
                parts.append(segment)
                if last:
                    node[segment] = value
                else:
                    if not isinstance(node.get(segment), (dict, list)):
                        node[segment] = {}
                    node = node[segment]
            else:
                raise RecipeError(f"override {override!r}: {_format_key(tuple(parts))} is not a mapping")
        if marks is not None:
            loc = tuple(parts)
            for k in [k for k in marks if k[: len(loc)] == loc]:
                del marks[k]
            marks[loc] = (f"override {override!r}", 0, 0)
    return data


def recipes_dir() -> Path:
    """The folder of the recipes shipped with the package (`hf_attn_zoo/recipes`)."""
    return Path(__file__).resolve().parent.parent / "recipes"


def shipped_recipes() -> list[Path]:
    """Every shipped recipe (recursive; files under `_base/` folders are fragments and are left out)."""
    root = recipes_dir()
    return sorted(p for p in root.rglob("*.yaml") if "_base" not in p.relative_to(root).parts)


def find_recipe(name_or_path: str | Path) -> Path:
    """Resolve a recipe argument: an existing path, else a shipped recipe by name (`moh/smollm2_quick`).

    Raises:
        `RecipeError`: nothing matches, or a bare name matches several shipped recipes.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    root = recipes_dir()
    stem = str(name_or_path).removesuffix(".yaml").removesuffix(".yml")
    names = {str(p.relative_to(root).with_suffix("")): p for p in shipped_recipes()}
    if stem in names:
        return names[stem]
    matches = [p for n, p in names.items() if n.endswith("/" + stem) or n == stem]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        options = ", ".join(str(p.relative_to(root).with_suffix("")) for p in matches)
        raise RecipeError(f"recipe name {str(name_or_path)!r} is ambiguous: {options}")
    close = difflib.get_close_matches(stem, list(names), n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else f" Shipped recipes: {', '.join(sorted(names))}."
    raise RecipeError(f"recipe {str(name_or_path)!r} is neither a file nor a shipped recipe.{hint}")


def load_recipe(path_or_name: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Read, merge (`_base` includes), override and validate a recipe.

    Args:
        path_or_name (`str | Path`):
            A YAML file, or the name of a shipped recipe (`moh/smollm2_quick`).
        overrides (`Iterable[str]`, *optional*):
            Dotted `key=value` overrides applied after loading, e.g. `["train.what=all", "optim.lr=1e-4"]`.

    Returns:
        `Recipe`: the validated recipe; `recipe.location(loc)` gives `file:line` of a key.

    Raises:
        `RecipeError`: every problem found, in one error, each as `file:line: key.path: message`.
    """
    path = find_recipe(path_or_name)
    display = _display_path(path)
    data, marks = _load_tree(path, display)
    apply_overrides(data, overrides, marks)
    source = _SourceMap(display, path.resolve().parent)
    source.marks = marks
    if "name" not in data:
        try:
            data["name"] = str(path.resolve().relative_to(recipes_dir()).with_suffix(""))
        except ValueError:
            data["name"] = path.stem
    return validate_recipe(data, source)


def validate_recipe(data: dict | Recipe, source: _SourceMap | None = None) -> Recipe:
    """Validate a raw mapping (or re-check a `Recipe`), raising one `RecipeError` that lists every problem."""
    if isinstance(data, Recipe):
        source = source or data._source
        data = data.model_dump(mode="python", exclude_unset=False)
    problems: list[tuple[Loc, str]] = []
    recipe: Recipe | None = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems = [_pydantic_problem(err, data) for err in exc.errors()]
    if recipe is not None:
        recipe._source = source
        problems = _semantic_problems(recipe)
    problems += _empty_moe_problems(data, source)
    if problems:
        file = source.file if source is not None else "<recipe>"
        lines = [f"{_format_loc(source, loc)}: {message}" for loc, message in _sorted(problems, source)]
        raise RecipeError(lines[0] if len(lines) == 1 else _many(file, lines))
    return recipe


def _empty_moe_problems(data: Any, source: _SourceMap | None) -> list[tuple[Loc, str]]:
    """A bare `moe:` in a file is YAML null, which would mean "no router losses": say how to get the defaults."""
    mark = source.marks.get(("moe",)) if source is not None else None
    if isinstance(data, dict) and "moe" in data and data["moe"] is None and mark is not None and mark[1] > 0:
        return [(("moe",), "the section is empty (null); write `moe: {}` for the default weights, or remove it")]
    return []


def _sorted(problems: list[tuple[Loc, str]], source: _SourceMap | None) -> list[tuple[Loc, str]]:
    def line(item: tuple[Loc, str]) -> int:
        mark = source.find(item[0]) if source else None
        return mark[1] if mark else 0

    return sorted(dict.fromkeys(problems), key=line)


_TAGS = set(_SOURCE_TAGS.values())


def _pydantic_problem(err: dict, data: Any) -> tuple[Loc, str]:
    raw_loc = tuple(err["loc"])
    loc = tuple(part for part in raw_loc if part not in _TAGS)
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(raw_loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return loc, f"unknown key{hint} (allowed here: {', '.join(allowed)})" if allowed else "unknown key"
    if kind == "missing":
        return loc, "required key is missing"
    message = err["msg"]
    value = err.get("input")
    if kind == "data_source" and isinstance(value, dict):
        message += f" (got keys: {', '.join(map(str, value)) or 'none'})"
    elif not isinstance(value, (dict, list)) and kind != "data_source":
        message += f" (got {value!r})"
    return loc, message


def _unwrap(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for arg in typing.get_args(annotation) for t in _unwrap(arg)]
    return [annotation]


def _allowed_keys(loc: Loc) -> list[str]:
    """Field names of the schema model found at `loc` (tags in `loc` pick the data-source type)."""
    current: list[Any] = [Recipe]
    for part in loc:
        if part in _TAGS:
            kind = {v: k for k, v in _SOURCE_TAGS.items()}[part]
            current = [t for t in current if isinstance(t, type) and kind in getattr(t, "model_fields", {})]
            continue
        following: list[Any] = []
        for candidate in current:
            if isinstance(part, int):
                if typing.get_origin(candidate) in (list, tuple):
                    following += _unwrap(typing.get_args(candidate)[0])
            elif isinstance(candidate, type) and issubclass(candidate, BaseModel) and part in candidate.model_fields:
                following += _unwrap(candidate.model_fields[part].annotation)
        current = following
    models = [c for c in current if isinstance(c, type) and issubclass(c, BaseModel)]
    return list(models[0].model_fields) if len(models) == 1 else []


def _semantic_problems(recipe: Recipe) -> list[tuple[Loc, str]]:
    problems: list[tuple[Loc, str]] = []
    problems += _data_problems(recipe)
    problems += _patch_problems(recipe)
    train = recipe.train
    if (train.max_steps is None) == (train.token_budget is None):
        problems.append((("train", "max_steps"), "give exactly one of train.max_steps and train.token_budget"))
    if train.global_batch_size is not None and "grad_accum" in train.model_fields_set and train.grad_accum != 1:
        problems.append((("train", "grad_accum"), "give train.grad_accum or train.global_batch_size, not both"))
    if train.global_batch_size is not None and train.global_batch_size % train.batch_size:
        problems.append(
            (("train", "global_batch_size"), f"must be a multiple of train.batch_size={train.batch_size}")
        )
    if train.what == "new" and not recipe.patches:
        problems.append((("train", "what"), "'new' trains only the parameters patches create, but `patches` is empty"))
    if train.eval_steps is not None and recipe.data.held_out_fraction == 0:
        problems.append((("train", "eval_steps"), "needs data.held_out_fraction > 0 (nothing to evaluate on)"))
    if recipe.optim.min_lr > recipe.optim.lr:
        problems.append((("optim", "min_lr"), f"min_lr={recipe.optim.min_lr} is above lr={recipe.optim.lr}"))
    problems += _optimizer_problems(recipe)
    problems += _trainer_args_problems(recipe)
    problems += _init_problems(recipe)
    from .distributed import sharding_problems

    problems += sharding_problems(recipe)
    return problems


def _data_problems(recipe: Recipe) -> list[tuple[Loc, str]]:
    from ..assets.corpora import corpus_names

    problems: list[tuple[Loc, str]] = []
    for index, source in enumerate(recipe.data.sources):
        loc: Loc = ("data", "sources", index)
        if isinstance(source, CorpusSource) and source.corpus not in corpus_names():
            close = difflib.get_close_matches(source.corpus, corpus_names(), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(
                (loc + ("corpus",), f"unknown corpus {source.corpus!r}; {hint}known: {', '.join(corpus_names())}")
            )
        if isinstance(source, FilesSource):
            for file_index, file in enumerate(source.files):
                resolved = Path(file) if Path(file).is_absolute() else recipe.base_dir / file
                if not resolved.is_file():
                    problems.append((loc + ("files", file_index), f"data file {str(resolved)!r} does not exist"))
    return problems


def _patch_problems(recipe: Recipe) -> list[tuple[Loc, str]]:
    if not recipe.patches:
        return []
    try:
        importlib.import_module("hf_attn_zoo.patches")
        from ..layers import resolve_layers
        from ..options import check_bounds
        from ..registry import PATCHES
    except ImportError:
        return []
    problems: list[tuple[Loc, str]] = []
    for index, spec in enumerate(recipe.patches):
        loc: Loc = ("patches", index)
        try:
            if not resolve_layers(spec.layers, 1024):
                problems.append((loc + ("layers",), f"layers={spec.layers!r} selects no layer"))
        except ValueError as exc:
            problems.append((loc + ("layers",), str(exc)))
        patch_cls = PATCHES.get(spec.method)
        if patch_cls is None:
            close = difflib.get_close_matches(spec.method, list(PATCHES), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            known = ", ".join(sorted(PATCHES))
            problems.append((loc + ("method",), f"unknown method {spec.method!r}; {hint}known: {known}"))
            continue
        known = [f.name for f in dataclasses.fields(patch_cls.config_class)]
        options = spec.options
        for option in options:
            if option not in known:
                close = difflib.get_close_matches(option, known, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                problems.append((loc + (option,), f"unknown {spec.method} option; {hint}known: {', '.join(known)}"))
        try:  # types and the bounds that need no model; the rest is checked when the model is patched
            config = patch_cls.config_class.from_options(spec.method, {k: v for k, v in options.items() if k in known})
            check_bounds(spec.method, config)
        except InvalidOptionError as exc:
            problems.append((loc + ((exc.option,) if exc.option else ()), str(exc)))
    return problems


def _optimizer_problems(recipe: Recipe) -> list[tuple[Loc, str]]:
    from transformers.training_args import OptimizerNames

    names = [o.value for o in OptimizerNames]
    if recipe.optim.name in names:
        return []
    close = difflib.get_close_matches(recipe.optim.name, names, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "see transformers.training_args.OptimizerNames"
    return [(("optim", "name"), f"unknown optimizer {recipe.optim.name!r}; {hint}")]


# TrainingArguments fields that recipe keys already set: one place to write each setting.
_OWNED_ARGS = {
    "output_dir": "output_dir", "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum / train.global_batch_size",
    "max_steps": "train.max_steps / train.token_budget",
    "learning_rate": "optim.lr", "lr_scheduler_type": "optim.schedule", "warmup_steps": "optim.warmup_steps",
    "optim": "optim.name", "weight_decay": "optim.weight_decay", "adam_beta1": "optim.betas",
    "adam_beta2": "optim.betas", "adam_epsilon": "optim.eps", "max_grad_norm": "optim.max_grad_norm",
    "bf16": "train.mixed_precision", "fp16": "train.mixed_precision", "save_steps": "train.save_steps",
    "save_total_limit": "train.save_total_limit", "logging_steps": "train.logging_steps",
    "eval_steps": "train.eval_steps", "seed": "seed", "gradient_checkpointing": "train.gradient_checkpointing",
    "activation_checkpointing": "train.gradient_checkpointing",
    "resume_from_checkpoint": "train.resume",
    "fsdp": "train.distributed.strategy", "fsdp_config": "train.distributed",
    "deepspeed": "train.distributed.strategy (and deepspeed_config)",
}


def _trainer_args_problems(recipe: Recipe) -> list[tuple[Loc, str]]:
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    problems: list[tuple[Loc, str]] = []
    for key in recipe.train.trainer_args:
        loc: Loc = ("train", "trainer_args", key)
        if key in _OWNED_ARGS:
            problems.append((loc, f"set it with `{_OWNED_ARGS[key]}` instead"))
        elif key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append((loc, f"not a transformers.TrainingArguments field{hint}"))
    return problems


def _init_problems(recipe: Recipe) -> list[tuple[Loc, str]]:
    from .init_hooks import get_init_hook

    problems: list[tuple[Loc, str]] = []
    for index, step in enumerate(recipe.init):
        try:
            get_init_hook(step.name)
        except RecipeError as exc:
            problems.append((("init", index, "name"), str(exc)))
    return problems
