"""The recipe's schema: one pydantic model per section, each rejecting unknown keys.

Sections (each documented on its class below): `model` (`ModelSection`), `patches` (`PatchSpec`), `init`
(`InitStep`), `data` (`DataSection`), `train` (`TrainSection`, with `train.lora`: `LoraSection`), `optim`
(`OptimSection`), `moe` (`MoESection`: router losses for MoE models), `distill` (`DistillSection`: self-distillation
from the unpatched model), `callbacks` (`CallbackStep`: schedules during training), `eval` (`EvalSection`),
`output_dir`, `seed`.
`docs/recipes.md` describes them in prose. The checks that need more than a type (a known corpus, method option or
optimizer, files that exist) are in `recipe_checks.py`.

A MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE, or a dense model upcycled to one) trains with its router losses like this:

```yaml
moe:
  load_balance_weight: 0.01   # Switch load balancing N sum_i f_i P_i, mean over the MoE layers
  z_loss_weight: 0.001        # router z-loss mean_t logsumexp(x_t)^2, mean over the MoE layers
train:
  what: moe                   # routers + experts (or `all`, or `lora`: routers train fully next to the adapters)
```
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag

from .recipe_yaml import SourceMap, format_loc


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Section):
    """Which checkpoint to start from.

    Args:
        path (`str`, *optional*, defaults to `"default"`):
            A local HF folder, a hub id, or `"default"` for the embedded SmolLM2-135M-Instruct (`hf_attn_zoo.assets`).
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


SOURCE_TAGS = {"corpus": "corpus_source", "files": "files_source", "hf_dataset": "hf_dataset_source"}


def _source_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        return next((tag for key, tag in SOURCE_TAGS.items() if key in value), None)
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
        num_proc (`int`, *optional*): processes for tokenization (`datasets.map`), for large hub datasets. Each
            process packs its shard of the documents, so the blocks differ a little from a run without it (other
            tails of 1,000-document chunks are dropped): compare runs with the same setting.
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
            the rest frozen: the usual choice for an upcycled model); `routers` (MoE models: the routers' weights
            and the new parameters only, e.g. to adapt the routers to a routing patch); `lora` (LoRA adapters + the
            new parameters,
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
        branch_budgets (`list[int]`, *optional*): with `optim.schedule: wsd` and `token_budget`: smaller budgets
            whose models the run writes too, each decayed from the stable phase where a run of that budget would
            start its decay (the run saves a checkpoint there), into `output_dir/branches/<budget>/` (a run folder
            of its own, with `final/`). Each equals a separate `wsd` run of that budget; together they cost the
            largest run plus the branches' decays instead of every run in full.
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

    what: Literal["new", "lora", "moe", "routers", "all"] = "all"
    lora: LoraSection | None = None
    batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    global_batch_size: int | None = Field(default=None, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    token_budget: int | None = Field(default=None, ge=1)
    branch_budgets: list[int] = Field(default_factory=list)
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
        name (`str`, *optional*, defaults to `"adamw_torch"`): a `transformers` optimizer name (`OptimizerNames`), or
            `muon`: Muon on the hidden weight matrices (and per expert on fused MoE experts), AdamW on embeddings,
            LM head, norms, biases and routers (`hf_attn_zoo/tuning/muon.py` has the rule).
        lr (`float`, *optional*, defaults to 1e-4): peak learning rate (`muon`: of the Muon matrices, before their
            `muon_adjust_lr` shape adjustment).
        min_lr (`float`, *optional*, defaults to 0.0): final learning rate of the `cosine` / `linear` / `wsd` decay.
        schedule (`str`, *optional*, defaults to `"cosine"`): `cosine`, `linear` or `constant` after the warm-up, or
            `wsd` (warm-up, stable, decay): the peak held, then the last `decay_fraction` of the steps decaying to
            `min_lr` as `1 - sqrt(progress)` (arXiv:2405.18392). With `wsd` one run can also write the models of
            smaller budgets (`train.branch_budgets`).
        decay_fraction (`float`, *optional*, defaults to 0.2): `wsd`: share of the steps that decay.
        warmup_steps (`int`, *optional*, defaults to 0): linear warm-up from 0 to `lr`.
        weight_decay (`float`, *optional*, defaults to 0.0).
        max_grad_norm (`float`, *optional*, defaults to 1.0): gradient clipping (`None` disables it).
        betas (`tuple[float, float]`, *optional*, defaults to `(0.9, 0.999)`).
        eps (`float`, *optional*, defaults to 1e-8).
        lr_scale (`dict[str, float]`, *optional*): learning-rate multipliers by parameter name: a parameter whose
            name contains a key trains at `lr x value` (the first key that matches counts), e.g.
            `{head_router: 10}` for MoH's routers. Its schedule is the same, scaled.
        adamw_lr (`float`, *optional*): `muon`: peak learning rate of the AdamW parameters (defaults to `lr`); the
            schedule is the same, scaled.
        momentum (`float`, *optional*, defaults to 0.95): `muon`: Muon's (Nesterov) momentum.
        ns_steps (`int`, *optional*, defaults to 5): `muon`: Newton-Schulz steps per update.
        muon_adjust_lr (`str`, *optional*, defaults to `"match_rms_adamw"`): `muon`: learning rate of a matrix
            `[A, B]`: `match_rms_adamw` (`lr x 0.2 sqrt(max(A, B))`, update RMS like AdamW's, so AdamW's `lr` and
            `weight_decay` carry over) or `original` (`lr x sqrt(max(1, A / B))`, Keller Jordan's, for Muon-sized
            `lr` such as 0.02).
    """

    name: str = "adamw_torch"
    lr: float = Field(default=1e-4, gt=0)
    min_lr: float = Field(default=0.0, ge=0)
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    decay_fraction: float = Field(default=0.2, gt=0, le=1)
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)
    lr_scale: dict[str, float] = Field(default_factory=dict)
    adamw_lr: float | None = Field(default=None, gt=0)
    momentum: float = Field(default=0.95, ge=0.0, lt=1.0)
    ns_steps: int = Field(default=5, ge=1, le=20)
    muon_adjust_lr: Literal["match_rms_adamw", "original"] = "match_rms_adamw"


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


class DistillSection(_Section):
    """Self-distillation: the unpatched model (the recipe's `model`, loaded again without `patches`, frozen) is the
    teacher, and `weight * T^2 * KL(teacher_T || student_T)` over every token's next-token distribution (both
    softened by the temperature `T`) is added to the loss.

    A patched model then learns to reproduce what the original model predicted, not only the next token of the
    text: a far denser signal per token, which is what a retrofit (MoH dropping heads, a sparse pattern dropping
    keys) needs to recover the original model's behaviour. Logged as `distill_loss` (the unweighted KL). A dense
    baseline with the same section gets the same extra signal (its teacher is its own starting point).
    The teacher is a full copy per process: single-process and `ddp` runs only.

    Args:
        weight (`float`, *optional*, defaults to 1.0): weight of the KL term (the LM loss keeps weight 1).
        temperature (`float`, *optional*, defaults to 1.0): softening temperature `T` of both distributions.
        teacher (`str`, *optional*): the teacher's path (folder, hub id or `default`), when the recipe's `model` is
            not the unpatched model (e.g. a patched checkpoint being tuned further).
    """

    weight: float = Field(default=1.0, ge=0.0)
    temperature: float = Field(default=1.0, gt=0.0)
    teacher: str | None = None


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


class CallbackStep(_Section):
    """A schedule run during training (a `transformers.TrainerCallback`), e.g. annealing MoH's head dropping.

    Args:
        name (`str`): a name registered in `hf_attn_zoo.tuning.callback_hooks`, or `"package.module:function"`
            (a function `(model, recipe, **options) -> TrainerCallback`).
        options (`dict`, *optional*): keyword arguments of the factory.
    """

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


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
    distill: DistillSection | None = None
    callbacks: list[CallbackStep] = Field(default_factory=list)
    eval: EvalSection | None = None
    output_dir: str | None = None
    seed: int = 0

    _source: SourceMap | None = PrivateAttr(default=None)

    def location(self, loc: Sequence[str | int]) -> str:
        """`file:line: key.path` of a key of this recipe (best effort for recipes built in code)."""
        return format_loc(self._source, tuple(loc))

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
        for section in ("moe", "distill"):
            if data.get(section) is None:
                data.pop(
                    section, None
                )  # `moe: null` in a file asks for `moe: {}` (see `recipe_checks._empty_moe_problems`)
        return yaml.safe_dump(data, sort_keys=False)
