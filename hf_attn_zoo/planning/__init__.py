"""Plan before you rent: parameters, memory per GPU, KV cache and attention kernels of a patched model, from its config.

>>> from hf_attn_zoo.planning import plan
>>> p = plan("llama3-8b", "moh", gpus=8, seq_len=4096, batch=1, train="full", sharding="fsdp")
>>> p.fits, p.memory.total / 2**30
>>> print(p.table())          # what `hf-attn-zoo plan llama3-8b moh --gpus 8` prints

The model is built on the meta device from its config (a shipped config of a well-known model, `default`, a local
folder, or a hub id) and patched with `hf_attn_zoo.patch` (or upcycled: `method="upcycle"`), so nothing is allocated
and an 8B model plans in well under a second. The arithmetic and its assumptions are in `planning/memory.py` and
`planning/figures.py`; the kernel choice in `planning/kernels.py`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from ..errors import InvalidOptionError, PlanError
from .figures import KVFigures, active_params, kv_cache, layer_activations, lora_params, param_count
from .kernels import KernelChoice, attention_kernels, experts_kernel
from .memory import (
    DTYPE_BYTES,
    GiB,
    OPTIMIZER_STATE_BYTES,
    MemoryBreakdown,
    ModelFigures,
    Setup,
    check_setup,
    fitting_gpus,
    memory_per_gpu,
)
from .models import build_plan_models, load_config, shipped_models

__all__ = ["Plan", "Setup", "plan", "shipped_models"]

DEVICES = ("cuda", "cpu")


@dataclass
class Plan:
    """What `plan()` found: parameter counts, memory per GPU, KV cache before/after, attention kernels."""

    model: str
    source: str
    architecture: str  # the planned model's class (after the patch / upcycling)
    method: str
    options: dict[str, Any]  # as recorded by the patch (validated, defaults filled in)
    layers: list[int] | None  # patched (or upcycled) layers
    setup: Setup
    gpu_memory_gib: float
    device: str
    lora_rank: int
    params_before: int
    params_after: int
    params_new: int
    params_trainable: int
    params_active: int | None  # per token, MoE models only
    memory: MemoryBreakdown
    kv_before: KVFigures
    kv_after: KVFigures
    kernels: list[KernelChoice]
    experts_kernel: str | None
    num_layers: int
    build_seconds: float
    fitting_gpus: int | None = None  # fewest GPUs (same sharding) that fit, when this plan does not
    activations_other: int | None = None  # training: activations with gradient checkpointing toggled
    assumptions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def total_gib(self) -> float:
        return self.memory.total / GiB

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.gpu_memory_gib * GiB

    def check(self) -> Plan:
        """Raise `PlanError` (with the figures) when the plan does not fit in the GPU memory; else return it."""
        if self.fits:
            return self
        parts = ", ".join(
            f"{row} {getattr(self.memory, row) / GiB:.1f}" for row in self.memory.ROWS if getattr(self.memory, row)
        )
        s = self.setup
        hints = []
        if self.fitting_gpus is not None and self.fitting_gpus > s.gpus:
            hints.append(f"--gpus {self.fitting_gpus}")
        if s.train != "none" and not s.gradient_checkpointing and self.memory.activations > 0.2 * self.memory.total:
            hints.append("--gradient-checkpointing")
        if s.sharding in ("ddp", "zero2") and s.gpus > 1:
            hints.append("--sharding fsdp")
        if s.train == "full":
            hints.append("--train lora")
        if s.batch > 1:
            hints.append("a smaller --batch with gradient accumulation")
        raise PlanError(
            f"{self.model} + {self.method} needs {self.total_gib:.1f} GiB per GPU ({parts} GiB) with {s.gpus} GPU(s), "
            f"--sharding {s.sharding}, --train {s.train}, seq {s.seq_len} x batch {s.batch}, but --gpu-memory is "
            f"{self.gpu_memory_gib:g} GiB." + (f" Try {', or '.join(hints)}." if hints else "")
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["memory"]["total"] = self.memory.total
        out["total_gib"], out["fits"] = self.total_gib, self.fits
        return out

    def table(self) -> str:
        from .cli import format_plan

        return format_plan(self)


def _assumptions(setup: Setup, lora_rank: int, device: str, moe: bool, method: str) -> list[str]:
    db = DTYPE_BYTES[setup.dtype]
    out = [
        f"weights in {setup.dtype} ({db} B/param); buffers (RoPE tables) and the CUDA context (~0.5-1 GiB) "
        "and allocator fragmentation are not counted"
    ]
    if setup.train != "none":
        state = OPTIMIZER_STATE_BYTES[setup.optimizer]
        master = 4 if setup.master_weights and db < 4 else 0
        out.append(
            f"training: gradients in {setup.dtype}; {setup.optimizer} keeps {state} B of states per trainable "
            f"parameter"
            + (f" + a {master} B fp32 master copy (mixed precision)" if master else "")
            + f": {db + state + master} B per trainable parameter besides its weight"
        )
        if setup.train == "lora":
            out.append(
                f"--train lora: LoRA r={lora_rank} on the attention projections (q, k, v, o) of every layer, "
                "plus the patch's new modules trained fully (upcycling: the routers)"
            )
        elif setup.train == "new":
            out.append(
                "--train new: only the parameters the patch created (hf_attn_zoo.new_parameters; upcycling: "
                "the MoE routers and experts); activations still flow back through every layer"
            )
        sharding = {
            "ddp": "ddp replicates weights, gradients and optimizer states",
            "zero2": "zero2 shards gradients and optimizer states over the GPUs, replicates weights",
            "fsdp": "fsdp shards weights, gradients and optimizer states (FSDP units = decoder layers + "
            "root); the root unit and 2 layers are all-gathered at a time",
            "zero3": "zero3 shards weights, gradients and optimizer states (units = decoder layers + root); "
            "the root unit and 2 layers are all-gathered at a time",
        }[setup.sharding]
        out.append(sharding)
        out.append(
            f"activations per GPU micro-batch of {setup.batch} x {setup.seq_len} tokens (global batch = "
            f"{setup.batch} x {setup.gpus} GPUs x gradient accumulation): norms, q/k/v, attention output and "
            "MLP intermediates per token and layer (planning/memory.py); fused attention kernels keep no "
            "scores"
            + ("; gradient checkpointing keeps only each layer's input" if setup.gradient_checkpointing else "")
        )
        out.append("logits + loss: vocab x (dtype + 8) B per token (fp32 copy and log-softmax for the loss)")
        if moe:
            out.append("MoE: activations assume each token reaches top_k experts (no capacity padding)")
    else:
        out.append(
            f"inference: weights + KV cache of {setup.batch} sequence(s) of {setup.seq_len} tokens + one "
            "layer's prefill activations"
        )
    out.append(
        f"attention kernels for {device}: the kernels' own `auto` rules at {setup.seq_len} tokens; the base "
        "implementation is the config's (sdpa unless set)"
    )
    return out


def plan(
    model: str | Path | PretrainedConfig,
    method: str = "none",
    options: dict[str, Any] | None = None,
    *,
    layers: Any = "all",
    gpus: int = 1,
    sharding: str = "fsdp",
    dtype: str = "bf16",
    seq_len: int = 4096,
    batch: int = 1,
    train: str = "full",
    optimizer: str = "adamw",
    master_weights: bool = True,
    gradient_checkpointing: bool = False,
    gpu_memory_gib: float = 80.0,
    lora_rank: int = 16,
    device: str = "cuda",
) -> Plan:
    """Plan a run of `model` patched with `method` (or `"none"`, or `"upcycle"`), without allocating any weight.

    Args:
        model: a shipped config name (`llama3-8b`, `llama3-70b`, `mixtral-8x7b`, `qwen3-30b-a3b`, `deepseek-v3`),
            `default` (SmolLM2-135M-Instruct), a local folder with a config.json, a hub id, or a `PretrainedConfig`.
        method: a registered method, `none`, or `upcycle` (options `mode`, `num_experts`, `top_k`, `layers`,
            `bam_options`).
        options: the method's options (a bad one raises the patch's own error).
        layers: which layers the patch covers (as `hf_attn_zoo.patch`).
        gpus, sharding (`ddp`, `fsdp`, `zero2`, `zero3`), dtype (`bf16`, `fp16`, `fp32`), seq_len, batch (per GPU),
        train (`full`, `lora`, `new`, `none` = inference), optimizer (`adamw`, `adamw_8bit`, `sgd`), master_weights
        (an fp32 master copy in mixed precision), gradient_checkpointing, gpu_memory_gib (per GPU), lora_rank,
        device (`cuda` or `cpu`, for the kernel choice).

    Returns:
        A `Plan`; `plan.fits` says whether it fits `gpu_memory_gib`, `plan.check()` raises `PlanError` if not.
        Impossible sharding (more GPUs than FSDP units) raises `PlanError` right away.
    """
    if device not in DEVICES:
        raise InvalidOptionError(f"device={device!r} is not one of {', '.join(DEVICES)}.")
    if not isinstance(lora_rank, int) or lora_rank < 1:
        raise InvalidOptionError(f"lora_rank={lora_rank!r} must be a positive integer.")
    if not gpu_memory_gib > 0:
        raise InvalidOptionError(f"gpu_memory_gib={gpu_memory_gib!r} must be positive.")
    setup = Setup(
        gpus=gpus,
        sharding=sharding,
        dtype=dtype,
        train=train,
        optimizer=optimizer,
        master_weights=master_weights,
        gradient_checkpointing=gradient_checkpointing,
        seq_len=seq_len,
        batch=batch,
    )
    config, source = load_config(model)
    check_setup(setup, config.num_hidden_layers)
    started = time.perf_counter()
    built = build_plan_models(config, method, dict(options or {}), layers, dtype)
    build_seconds = time.perf_counter() - started
    after, family = built.after, built.family_after
    db = DTYPE_BYTES[dtype]

    params_after = param_count(after)
    adapters = lora_params(after, family, lora_rank) if train == "lora" else 0
    trainable = {"full": params_after, "new": built.new_params, "none": 0, "lora": adapters + built.lora_full_params}[
        train
    ]
    decoder = family.decoder_layers(after)
    layer_params = [param_count(layer) for layer in decoder]
    training = train != "none"
    kernels = attention_kernels(after, seq_len, device, training)
    scores = [0] * len(decoder)
    for choice in kernels:
        for index in choice.layers:
            scores[index] = choice.score_keys * family.head_layout(after.config).num_heads
    kv_before = kv_cache(built.before, built.family_before, [], seq_len, db)
    kv_after = kv_cache(after, family, built.records, seq_len, db)
    figures = ModelFigures(
        params=params_after + adapters,
        trainable=trainable,
        num_layers=len(decoder),
        root_params=params_after - sum(layer_params),
        largest_layer_params=max(layer_params),
        hidden_size=after.config.hidden_size,
        vocab_size=after.config.vocab_size,
        layer_activations=layer_activations(after, family, built.records),
        layer_scores=tuple(scores),
        kv_cache_bytes=kv_after.bytes_at_seq_len,
    )
    memory = memory_per_gpu(figures, setup)
    moe = bool(family.moe_layers(after))
    record = built.records[-1] if built.records and method != "upcycle" else None
    warnings = []
    limit = getattr(after.config, "max_position_embeddings", None)
    if limit and seq_len > limit:
        warnings.append(f"--seq-len {seq_len} exceeds the model's max_position_embeddings ({limit}).")
    if train == "new" and not built.new_params:
        warnings.append(f"--train new: {method} creates no parameters, so nothing would train.")
    if built.non_meta:
        names = ", ".join(sorted(built.non_meta)[:5])
        warnings.append(
            f"the patch allocated {sum(built.non_meta.values()) / 2**20:.1f} MiB outside the meta device "
            f"({len(built.non_meta)} tensors: {names}); it is not meta-safe yet."
        )
    result = Plan(
        model=str(model) if not isinstance(model, PretrainedConfig) else config.model_type,
        source=source,
        architecture=type(after).__name__,
        method=method,
        options=(built.upcycle or {}) if method == "upcycle" else (record["options"] if record else {}),
        layers=(built.upcycle["layers"] if built.upcycle else (record["layers"] if record else None)),
        setup=setup,
        gpu_memory_gib=float(gpu_memory_gib),
        device=device,
        lora_rank=lora_rank,
        params_before=param_count(built.before),
        params_after=params_after,
        params_new=built.new_params,
        params_trainable=trainable,
        params_active=active_params(after, family) if moe else None,
        memory=memory,
        kv_before=kv_before,
        kv_after=kv_after,
        kernels=kernels,
        experts_kernel=experts_kernel(after),
        num_layers=len(decoder),
        build_seconds=build_seconds,
        assumptions=_assumptions(setup, lora_rank, device, moe, method),
        warnings=warnings,
    )
    if training:
        toggled = dataclasses.replace(setup, gradient_checkpointing=not gradient_checkpointing)
        result.activations_other = memory_per_gpu(figures, toggled).activations
    if not result.fits:
        result.fitting_gpus = fitting_gpus(figures, setup, gpu_memory_gib)
    return result
