"""Memory per GPU of a training (or inference) run: plain arithmetic on parameter and activation counts.

Everything here is a documented estimate, in bytes per GPU. The conventions (ZeRO paper, Rajbhandari et al. 2020,
and the activation analysis of Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", adapted to SwiGLU / GQA / MoE decoders with fused attention kernels):

- **weights**: every parameter in `--dtype` (2 bytes in bf16/fp16, 4 in fp32).
- **gradients**: every *trainable* parameter, in `--dtype`.
- **optimizer states**: per trainable parameter, AdamW keeps two fp32 moments (8 bytes; `adamw_8bit` 2 bytes,
  `sgd` one fp32 momentum, 4 bytes), plus an fp32 master copy (4 bytes) when training in bf16/fp16 mixed precision:
  12 bytes per trainable parameter for AdamW in bf16 (the ZeRO paper's "K = 12").
- **sharding** over N GPUs: `ddp` replicates everything; `zero2` shards gradients and optimizer states; `fsdp` and
  `zero3` shard weights, gradients and optimizer states. FSDP units are the decoder layers (plus the root unit:
  embeddings, final norm, LM head), so N may not exceed the number of decoder layers. While a unit computes, its
  weights are all-gathered: the root unit stays gathered for the whole step and two decoder layers are gathered at a
  time (the one computing and the one prefetched), in `--dtype`.
- **activations** (kept for the backward, per GPU micro-batch of `batch x seq_len` tokens): per token and decoder
  layer, in `--dtype` elements: both RMSNorms' fp32 inputs and outputs (6h); the attention block's projection
  outputs (q, k, v: kept by the attention kernel) and twice the attention output (the kernel's output and the
  output projection's input); a dense SwiGLU MLP's gate, up, act(gate) and product (4 x intermediate); an MoE
  block's router logits (fp32) and, per routed expert, the token's copy, its 4 x expert-intermediate and its
  output; shared experts as dense MLPs (details and a check against autograd's saved tensors: `figures.py`).
  Fused kernels (SDPA flash / memory-efficient, FlexAttention) keep no attention scores; paths that run plain
  PyTorch attention in training keep fp32 scores and probabilities (8 bytes per query head and attended key).
  With gradient checkpointing each decoder layer keeps only its input (h per token) and one layer at a time is
  recomputed with its full activations.
- **logits + loss**: per token, the vocabulary-sized logits in `--dtype`, their fp32 copy for the loss and the
  fp32 log-softmax the cross entropy keeps (transformers computes the loss in fp32): `vocab x (dtype + 8)` bytes.
- **inference** (`train="none"`): weights (sharded as above), the KV cache of `batch` sequences of `seq_len` tokens,
  and the transient activations of one layer for the prefill; no gradients, no optimizer states.

Not counted: the CUDA context and kernels (about 0.5-1 GiB), allocator fragmentation, communication buckets
(DDP's gradient buckets, about 25 MiB each), and the temporaries of compiled kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InvalidOptionError, PlanError

__all__ = [
    "DTYPE_BYTES",
    "GiB",
    "OPTIMIZER_STATE_BYTES",
    "SHARDINGS",
    "TRAIN_MODES",
    "MemoryBreakdown",
    "ModelFigures",
    "Setup",
    "check_setup",
    "fitting_gpus",
    "layer_activation_bytes",
    "memory_per_gpu",
]

GiB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2, "sgd": 4}
MASTER_COPY_BYTES = 4
SHARDINGS = ("ddp", "fsdp", "zero2", "zero3")
TRAIN_MODES = ("full", "lora", "new", "none")
SCORE_BYTES = 8  # fp32 scores + fp32 probabilities per (query head, attended key), non-fused attention paths only
LOSS_EXTRA_BYTES = 8  # per vocabulary entry and token: the fp32 copy of the logits and the fp32 log-softmax


@dataclass(frozen=True)
class Setup:
    """How the model runs: GPUs, sharding, precision, what trains, and the per-GPU micro-batch."""

    gpus: int = 1
    sharding: str = "fsdp"
    dtype: str = "bf16"
    train: str = "full"
    optimizer: str = "adamw"
    master_weights: bool = True
    gradient_checkpointing: bool = False
    seq_len: int = 4096
    batch: int = 1

    @property
    def tokens(self) -> int:
        return self.seq_len * self.batch

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class ModelFigures:
    """What the arithmetic needs from a model (counted on the meta device by `hf_attn_zoo.planning`)."""

    params: int  # all parameters
    trainable: int  # parameters that train under the setup's `train`
    num_layers: int  # decoder layers (= FSDP units besides the root)
    root_params: int  # parameters outside the decoder layers (embeddings, final norm, LM head)
    largest_layer_params: int
    hidden_size: int
    vocab_size: int
    layer_activations: tuple[int, ...]  # per token and decoder layer: elements kept for the backward, in dtype
    layer_scores: tuple[int, ...] = ()  # per token and decoder layer: (query head x attended key) pairs whose
    # scores a non-fused attention path keeps (0 for fused kernels)
    kv_cache_bytes: int = 0  # one sequence of seq_len tokens, all layers (inference)


def layer_activation_bytes(figures: ModelFigures, layer: int, dtype_bytes: int) -> int:
    """Bytes per token that decoder layer `layer` keeps for the backward (without checkpointing)."""
    scores = figures.layer_scores[layer] if figures.layer_scores else 0
    return figures.layer_activations[layer] * dtype_bytes + scores * SCORE_BYTES


@dataclass
class MemoryBreakdown:
    """Bytes per GPU by kind, and a one-line derivation of each."""

    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    gathered: int = 0  # FSDP / ZeRO-3 all-gathered units
    activations: int = 0
    logits: int = 0
    kv_cache: int = 0
    how: dict[str, str] = field(default_factory=dict)

    ROWS = ("weights", "gradients", "optimizer", "gathered", "activations", "logits", "kv_cache")

    @property
    def total(self) -> int:
        return sum(getattr(self, row) for row in self.ROWS)


def check_setup(setup: Setup, num_layers: int) -> None:
    """Refuse impossible setups: unknown choices, non-positive sizes, more GPUs than the sharding can use."""
    choices = {
        "sharding": (setup.sharding, SHARDINGS),
        "dtype": (setup.dtype, tuple(DTYPE_BYTES)),
        "train": (setup.train, TRAIN_MODES),
        "optimizer": (setup.optimizer, tuple(OPTIMIZER_STATE_BYTES)),
    }
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise InvalidOptionError(f"{name}={value!r} is not one of {', '.join(allowed)}.")
    for name in ("gpus", "seq_len", "batch"):
        value = getattr(setup, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidOptionError(f"{name}={value!r} must be a positive integer.")
    if setup.sharding in ("fsdp", "zero3") and setup.gpus > num_layers:
        raise PlanError(
            f"--gpus {setup.gpus} with --sharding {setup.sharding}: the FSDP units are the {num_layers} decoder layers "
            f"(plus the root unit), so at most {num_layers} GPUs can each hold a share; use --gpus <= {num_layers}, "
            "or data parallelism over groups of GPUs (--sharding zero2 or ddp)."
        )


def _fmt(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def memory_per_gpu(figures: ModelFigures, setup: Setup) -> MemoryBreakdown:
    """Bytes per GPU for `setup` (see the module docstring for every assumption)."""
    check_setup(setup, figures.num_layers)
    n, db = setup.gpus, setup.dtype_bytes
    shard_weights = setup.sharding in ("fsdp", "zero3") and n > 1
    shard_states = setup.sharding != "ddp" and n > 1
    out = MemoryBreakdown()
    w_div = n if shard_weights else 1
    out.weights = figures.params * db // w_div
    out.how["weights"] = f"{_fmt(figures.params)} params x {db} B ({setup.dtype})" + (
        f" / {n} GPUs" if w_div > 1 else ""
    )
    if shard_weights:
        unit = figures.root_params + 2 * figures.largest_layer_params
        out.gathered = unit * db
        out.how["gathered"] = (
            f"root unit {_fmt(figures.root_params)} + 2 x largest layer "
            f"{_fmt(figures.largest_layer_params)} params, all-gathered in {setup.dtype}"
        )
    tokens = setup.tokens
    if setup.train == "none":
        out.kv_cache = figures.kv_cache_bytes * setup.batch
        out.how["kv_cache"] = f"{setup.batch} x {setup.seq_len}-token sequences"
        peak = max(layer_activation_bytes(figures, i, db) for i in range(figures.num_layers))
        out.activations = peak * tokens
        out.how["activations"] = f"one layer's activations for the prefill of {tokens} tokens (nothing kept)"
        return out
    trainable = figures.trainable
    s_div = n if shard_states else 1
    out.gradients = trainable * db // s_div
    out.how["gradients"] = f"{_fmt(trainable)} trainable x {db} B" + (f" / {n} GPUs" if s_div > 1 else "")
    state = OPTIMIZER_STATE_BYTES[setup.optimizer]
    master = MASTER_COPY_BYTES if setup.master_weights and db < 4 else 0
    out.optimizer = trainable * (state + master) // s_div
    parts = f"{state} B {setup.optimizer} states" + (f" + {master} B fp32 master copy" if master else "")
    out.how["optimizer"] = f"{_fmt(trainable)} trainable x ({parts})" + (f" / {n} GPUs" if s_div > 1 else "")
    per_layer = [layer_activation_bytes(figures, i, db) for i in range(figures.num_layers)]
    if setup.gradient_checkpointing:
        out.activations = tokens * (figures.num_layers * figures.hidden_size * db + max(per_layer))
        out.how["activations"] = (
            f"{tokens} tokens x ({figures.num_layers} layer inputs x {figures.hidden_size} x "
            f"{db} B + one recomputed layer {max(per_layer) / 1024:.0f} KiB/token)"
        )
    else:
        out.activations = tokens * sum(per_layer)
        out.how["activations"] = (
            f"{tokens} tokens x {figures.num_layers} layers x "
            f"{sum(per_layer) / len(per_layer) / 1024:.0f} KiB/token/layer"
        )
    out.logits = tokens * figures.vocab_size * (db + LOSS_EXTRA_BYTES)
    out.how["logits"] = f"{tokens} tokens x {figures.vocab_size} vocab x ({db} + {LOSS_EXTRA_BYTES}) B"
    return out


def fitting_gpus(figures: ModelFigures, setup: Setup, gpu_memory_gib: float) -> int | None:
    """The fewest GPUs (same sharding) under which the plan fits in `gpu_memory_gib`, or None (up to 1024)."""
    from dataclasses import replace

    limit = {"fsdp": figures.num_layers, "zero3": figures.num_layers, "ddp": 1}.get(setup.sharding, 1024)
    for n in range(1, limit + 1):
        if memory_per_gpu(figures, replace(setup, gpus=n)).total <= gpu_memory_gib * GiB:
            return n
    return None
