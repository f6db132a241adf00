"""One-run GPU check: correctness of every method on CUDA (bf16 and fp32) and the speed tables, side by side.

Random-weight models of real shapes (no hub needed): LLaMA-3-8B (hidden 4096, 32 / 8 heads, head dim 128, FFN 14336,
vocab 128256, rope theta 500000; 2 layers for the correctness checks, 4 for the speed rows) and Mixtral-8x7B (hidden
4096, 32 / 8 heads, 8 experts top-2, FFN 14336, vocab 32000, 2 layers). Sections, each guarded (an error becomes a
row and the run goes on) and each with a time budget (cases left when it runs out are listed as skipped):

- correctness: every method's neutral setting equals the unpatched logits; cached greedy generation equals the full
  forward's argmax for every method with a KV cache (and SCMoE with beta 0); each static sparse pattern's flex and
  blocks paths equal the masked reference in forward and in the gradients of q, k, v; the linear-attention fla
  kernel equals its reference (fla's kernels vs the PyTorch path where fla-core is installed, else the chunked path vs
  the naive one; forward and gradients);
- speed: sparse prefill (sliding_window, power_attention, moba, moa) and linear attention (nalaformer, linearize) vs
  SDPA's flash kernel at 16k / 32k / 64k;
  MoH group-routing decode vs dense at 8k context (batch 1 and 16); SCMoE decode vs greedy (target >= 0.85x);
  MoH training steps/s vs dense in bf16 (target >= 0.95x); torch.compile'd patched models vs eager; the peak memory
  (`torch.cuda.max_memory_allocated`) of every row.

Writes markdown tables to stdout and `--out`, and the same results as JSON next to it (`.json`). `--smoke` runs the
same code on CPU with tiny shapes in well under a minute (tests/test_gpu_check.py runs it).

On the GPU machine (Python 3.12, no pydantic there: it travels as wheels in the git-ignored .cache/gpu_wheels, carried
with the working tree; the package is not installed, so it is imported from the repo root):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .cache/gpu_wheels/*.whl && PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
        python3 benchmarks/gpu_check.py --out $OUT/gpu_check.md

It ends within about 8 minutes (7m20s after the imports, then whatever is left is written and it exits); run it
with the device tool's `carry: [".cache/gpu_wheels"]` and a timeout of 600 s.

Fetch the wheels once, here (pydantic and what it needs, for CPython 3.12 on x86-64):

    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .cache/gpu_wheels pydantic==2.14.4 pydantic_core==2.50.5 \
        annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 fla-core==0.6.0 einops==0.8.2

(fla-core: flash-linear-attention's Triton kernels, which `linearize` / `nalaformer` use on CUDA when installed; the
linear rows of the prefill table then time them, and the neutral / cached-decoding checks run through them.)

Smoke test (CPU): python benchmarks/gpu_check.py --smoke [--out /tmp/gpu_check.md]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import inspect
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

import hf_attn_zoo
from hf_attn_zoo.families import resolve_family
from hf_attn_zoo.kernels.feature_maps import FEATURE_MAPS
from hf_attn_zoo.kernels.linear_attention import (
    LinearFeatures,
    fla_available,
    hybrid_attention,
    naive_hybrid_attention,
)
from hf_attn_zoo.kernels.moba import moba_attention
from hf_attn_zoo.kernels.sparse_attention import AttentionPattern, choose_backend, sparse_attention
from hf_attn_zoo.moa.cache import MoAPattern
from hf_attn_zoo.patches.power_attention import PowerPattern
from hf_attn_zoo.patches.sliding_window import SinkWindowPattern
from hf_attn_zoo.registry import PATCHES, get_patch

# max |patched - reference| / max |reference| allowed for the logits and attention outputs / gradients
TOL_FP32 = 1e-4
TOL_BF16 = 5e-2
# cached decoding: a generated token passes when its full-forward logit is within this share of max |logit| of the
# full forward's best; in bf16 a routing decision (MoH, MoE top-k) can flip on rounding noise, so only this share of
# the tokens must pass
GAP_TOL_FP32 = 1e-4
GAP_TOL_BF16 = 5e-2
MIN_AGREEMENT_BF16 = 0.9
SCMOE_TARGET = 0.85
TRAIN_TARGET = 0.95
# a patched model that recompiles on every call (state in Python attributes) must not eat the run's time
COMPILE_RECOMPILE_LIMIT = 2
COMPILE_TIMING_SECONDS = 20.0
NEW_PARAM_STD = 0.02  # new parameters (routers, experts) drawn like the model's own init

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", flush=True)


@dataclass(frozen=True)
class Setup:
    """Everything that differs between the GPU run and the CPU smoke run."""

    device: torch.device
    llama: dict[str, Any]
    mixtral: dict[str, Any]
    check_layers: int  # layers of the models the correctness checks use
    speed_layers: int  # layers of the LLaMA-shaped model of the speed rows
    check_batch: int
    check_len: int  # prompt length of the neutral and cache checks
    new_tokens: int
    flex_len: int
    flex_heads: tuple[int, int, int]  # query heads, KV heads, head dim of the attention-level rows
    unit: int  # pattern scale: sliding window, MoBA block = unit // 2, MoA spans in units
    prefill_lengths: tuple[int, ...]
    decode_context: int
    decode_batches: tuple[int, ...]
    decode_steps: int
    skip_min_unread_kv: int | None  # MoH decode_skip threshold (None: the library's default)
    scmoe_batches: tuple[int, ...]
    scmoe_prompt: int
    scmoe_tokens: int
    train_batch: int
    train_len: int
    train_steps: int
    compile_len: int
    compile_backend: str
    repeats: int
    rounds: int  # alternating rounds of the paired speed rows (dense / method)
    budgets: dict[str, float]  # seconds per section; unused time carries over to the next section
    time_limit: float  # the whole run: past it the results so far are written and the process exits

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def gpu_setup() -> Setup:
    llama = dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    mixtral = dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=32000,
        rope_theta=1e6,
        max_position_embeddings=4096,
        num_local_experts=8,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )
    return Setup(
        device=torch.device("cuda"),
        llama=llama,
        mixtral=mixtral,
        check_layers=2,
        speed_layers=4,
        check_batch=2,
        check_len=512,
        new_tokens=16,
        flex_len=2048,
        flex_heads=(32, 8, 128),
        unit=1024,
        prefill_lengths=(16384, 32768, 65536),
        decode_context=8192,
        decode_batches=(1, 16),
        decode_steps=16,
        skip_min_unread_kv=None,
        scmoe_batches=(1, 8),
        scmoe_prompt=128,
        scmoe_tokens=32,
        train_batch=4,
        train_len=1024,
        train_steps=5,
        compile_len=4096,
        compile_backend="inductor",
        repeats=5,
        rounds=2,
        budgets={
            "neutral": 30,
            "cache": 40,
            "moh_decode": 25,
            "scmoe": 30,
            "train": 30,
            "flex": 110,
            "linear": 15,
            "prefill": 90,
            "compile": 60,
        },
        time_limit=440,
    )


def smoke_setup() -> Setup:
    llama = dict(
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=16,
        vocab_size=512,
        rope_theta=500000.0,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    mixtral = dict(
        hidden_size=64,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=512,
        max_position_embeddings=1024,
        num_local_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )
    return Setup(
        device=torch.device("cpu"),
        llama=llama,
        mixtral=mixtral,
        check_layers=2,
        speed_layers=2,
        check_batch=2,
        check_len=48,
        new_tokens=4,
        flex_len=128,
        flex_heads=(4, 2, 16),
        unit=32,
        prefill_lengths=(256, 512),
        decode_context=128,
        decode_batches=(1, 2),
        decode_steps=2,
        skip_min_unread_kv=16,
        scmoe_batches=(1,),
        scmoe_prompt=16,
        scmoe_tokens=4,
        train_batch=2,
        train_len=64,
        train_steps=2,
        compile_len=64,
        compile_backend="eager",
        repeats=2,
        rounds=1,
        budgets={
            "neutral": 60,
            "cache": 60,
            "flex": 60,
            "linear": 60,
            "prefill": 60,
            "moh_decode": 60,
            "scmoe": 60,
            "train": 60,
            "compile": 60,
        },
        time_limit=600,
    )


@dataclass
class Table:
    """One markdown table. Every row has a `status`: `ok`, `FAIL`, `skipped: ...` or `error: ...`; `numeric` names
    the columns of a speed table that must hold finite numbers."""

    title: str
    kind: Literal["correctness", "speed"]
    columns: list[str]
    numeric: tuple[str, ...] = ()
    note: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        if self.note:
            lines += [self.note, ""]
        columns = [*self.columns, "peak GiB", "s", "status"]
        lines.append("| " + " | ".join(columns) + " |")
        lines.append("|" + "---|" * len(columns))
        for row in self.rows:
            lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
        return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value).replace("|", "/").replace("\n", " ")


@dataclass
class Report:
    header: dict[str, str]
    tables: list[Table] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def markdown(self) -> str:
        lines = ["# hf-attn-zoo GPU check", ""] + [f"- {k}: {v}" for k, v in self.header.items()]
        return "\n".join(lines + [""] + [t.markdown() + "\n" for t in self.tables])

    def write(self, out: Path | None, complete: bool) -> None:
        if out is None:
            return
        with self.lock:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(self.markdown())
            data = {
                "header": self.header,
                "complete": complete,
                "tables": [
                    {"title": t.title, "kind": t.kind, "columns": t.columns, "numeric": list(t.numeric), "rows": t.rows}
                    for t in self.tables
                ],
            }
            out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))


class Budget:
    """A section's deadline; cases started after it are recorded as skipped."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def expired(self) -> bool:
        return time.perf_counter() > self.deadline


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def add_row(
    table: Table, budget: Budget, setup: Setup, cells: dict[str, Any], measure: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """Run one case: `measure()` returns the row's measured cells (and `status` for a check, default ok); an
    exception becomes the row's status, and a case past the section's budget is not started."""
    row = dict(cells)
    table.rows.append(row)
    if budget.expired():
        row["status"] = "skipped: section time budget used up"
        return row
    if setup.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(setup.device)
    start = time.perf_counter()
    try:
        row.update(measure())
        row.setdefault("status", "ok")
    except Exception as error:  # noqa: BLE001  (a failing case is a result, the run goes on)
        row["status"] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
        traceback.print_exc()
    _sync(setup.device)
    row.setdefault("peak GiB", _peak_gib(setup.device))
    row.setdefault("s", time.perf_counter() - start)
    log(f"  {table.title[:40]} | {', '.join(f'{k}={_cell(v)}' for k, v in row.items())}")
    return row


def _check(error: float, tol: float) -> dict[str, Any]:
    return {"error": error, "tol": tol, "status": "ok" if error <= tol else "FAIL"}


def _rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in fp32."""
    actual, expected = actual.detach().float(), expected.detach().float()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def _median_seconds(
    fn: Callable[[], object], repeats: int, device: torch.device, warm_up: bool = True, max_seconds: float = math.inf
) -> float:
    """Median wall time of `fn` over `repeats` calls (fewer once they add up to `max_seconds`), after an untimed
    warm-up call (compilation, BlockMasks, gather plans, allocator)."""
    if warm_up:
        fn()
    _sync(device)
    samples: list[float] = []
    while len(samples) < repeats and sum(samples) < max_seconds:
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


class Rounds:
    """Timed variants run in alternating rounds (so load changes hit all alike), once, on the first row that asks;
    every row then reads its variant's median, peak memory and time spent (or the error the rounds stopped with)."""

    def __init__(self, variants: dict[str, Callable[[], float]], rounds: int, device: torch.device):
        self.variants, self.rounds, self.device = variants, rounds, device
        self.samples: dict[str, list[float]] = {}
        self.peak: dict[str, float | None] = {}
        self.spent: dict[str, float] = {}
        self.error: Exception | None = None

    def _run(self) -> None:
        self.samples = {name: [] for name in self.variants}
        self.spent = dict.fromkeys(self.variants, 0.0)
        for _ in range(self.rounds):
            for name, run in self.variants.items():
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.device)
                start = time.perf_counter()
                self.samples[name].append(run())
                self.spent[name] += time.perf_counter() - start
                peak = _peak_gib(self.device)
                self.peak[name] = None if peak is None else max(peak, self.peak.get(name) or 0.0)

    def median(self, name: str) -> float:
        if self.error is not None:
            raise RuntimeError(f"the alternating rounds failed: {self.error}") from self.error
        if not self.samples:
            try:
                self._run()
            except Exception as error:
                self.error = error
                raise
        return statistics.median(self.samples[name])

    def cells(self, name: str) -> dict[str, Any]:
        """The row's peak memory and seconds: its variant's, not the first row's (which ran all rounds)."""
        return {"peak GiB": self.peak.get(name), "s": self.spent.get(name)}


def build_model(setup: Setup, kind: Literal["llama", "mixtral"], dtype: torch.dtype, layers: int) -> torch.nn.Module:
    """A random-weight causal LM of the set-up's shapes, built on the device, in eval mode, without EOS (every
    generation runs to its length)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig

    config_class = LlamaConfig if kind == "llama" else MixtralConfig
    options = dict(setup.llama if kind == "llama" else setup.mixtral)
    theta = options.pop("rope_theta", None)
    if theta is not None:
        options["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    config = config_class(num_hidden_layers=layers, attn_implementation="sdpa", **options)
    torch.manual_seed(0)
    with torch.device(setup.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def randomize_new_parameters(model: torch.nn.Module, seed: int = 1) -> None:
    """Give a patch's new parameters (zero- or identity-initialised) random values, so routing is real."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in hf_attn_zoo.new_parameters(model).values():
            param.copy_(torch.randn(param.shape, generator=generator) * NEW_PARAM_STD)


def random_ids(setup: Setup, vocab: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator).to(setup.device)


def randn(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Seeded normal samples drawn on the device (gigabytes of KV cache and 64k-token q/k/v would take seconds
    to draw on the CPU)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); 5.17 on the GPU machine has the old name."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _family_of(method: str, setup: Setup) -> Literal["llama", "mixtral"] | None:
    """The model a method is checked on: the LLaMA shapes where the patch supports them, else the Mixtral ones."""
    from transformers import LlamaConfig, MixtralConfig

    patch = get_patch(method)
    for kind, config_class, options in (("llama", LlamaConfig, setup.llama), ("mixtral", MixtralConfig, setup.mixtral)):
        config = config_class(num_hidden_layers=1, **{k: v for k, v in options.items() if k != "rope_theta"})
        if patch.check(resolve_family(config), config) is None:
            return kind
    return None


def check_neutral(setup: Setup, budget: Budget) -> list[Table]:
    table = Table(
        "Neutral settings reproduce the unpatched logits",
        "correctness",
        ["method", "model", "dtype", "error", "tol"],
        note="error = max |patched - unpatched| / max |unpatched| over the logits of "
        f"{setup.check_batch} x {setup.check_len} random tokens.",
    )
    families = {method: _family_of(method, setup) for method in sorted(PATCHES)}
    for dtype_name, dtype in DTYPES.items():
        tol = TOL_FP32 if dtype == torch.float32 else TOL_BF16
        for kind in ("llama", "mixtral"):
            methods = [m for m, f in families.items() if f == kind]
            if budget.expired():
                for method in methods:
                    add_row(table, budget, setup, {"method": method, "model": kind, "dtype": dtype_name}, dict)
                continue
            if not methods:
                continue
            model = build_model(setup, kind, dtype, setup.check_layers)
            ids = random_ids(setup, model.config.vocab_size, setup.check_batch, setup.check_len)
            with torch.no_grad():
                reference = model(ids).logits
            family = resolve_family(model.config)
            for method in methods:

                def measure(method=method) -> dict[str, Any]:
                    neutral = get_patch(method).neutral_config(family, model.config)
                    if neutral is None:
                        return {"status": "FAIL: no neutral setting"}
                    hf_attn_zoo.patch(model, method, **neutral.to_dict())
                    try:
                        with torch.no_grad():
                            logits = model(ids).logits
                    finally:
                        hf_attn_zoo.unpatch(model)
                    return _check(_rel_error(logits, reference), tol)

                add_row(table, budget, setup, {"method": method, "model": kind, "dtype": dtype_name}, measure)
            model = reference = None  # release them (not `del`: the closures above read the names)
    for method in (m for m, f in families.items() if f is None):
        table.rows.append({"method": method, "status": "FAIL: supports neither model"})
    return [table]


def cache_cases(setup: Setup) -> list[tuple[str, str, dict[str, Any]]]:
    """`(label, method, options)` of the cached-decoding check: each method with a KV cache, with options that make
    the prompt longer than its window / blocks (so caches evict and blocks get selected)."""
    p, heads = setup.check_len, setup.llama["num_attention_heads"]
    options = {
        "bam": {"num_experts": 2},
        "moa": {"alpha": 0.0, "beta": 0.25, "sinks": 4, "length": p + setup.new_tokens},
        "moba": {"block_size": p // 8, "top_k": 2, "decode": "sparse"},
        "moh": {
            "router": "learned",
            "granularity": "group",
            "shared_heads": 0,
            "top_k": heads // 2,
            "decode_skip": "always",
        },
        "mote": {"off": {"all": [0]}},
        "power_attention": {"block_size": p // 16, "window_blocks": 2, "sink_blocks": 1},
        "routing_attention": {"num_clusters": 4, "window": p // 8, "sinks": 4},
        "sliding_window": {"window": p // 4, "sinks": 4},
    }
    cases = []
    for method in sorted(PATCHES):
        if PATCHES[method].capabilities.kv_cache:
            label = method + (" (group, decode_skip)" if method == "moh" else "")
            cases.append((label, method, options.get(method, {})))
    return cases


def _gaps(model: torch.nn.Module, generated: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Per generated token, (the full forward's best logit - the generated token's logit) / max |logit|: zero where
    cached decoding chose the full forward's argmax."""
    with torch.no_grad():
        logits = model(generated, use_cache=False).logits[:, prompt_len - 1 : -1].float()
    chosen = logits.gather(-1, generated[:, prompt_len:, None]).squeeze(-1)
    return (logits.max(-1).values - chosen) / logits.abs().max()


def check_cache(setup: Setup, budget: Budget) -> list[Table]:
    table = Table(
        "Cached greedy decoding equals the full forward's argmax",
        "correctness",
        ["method", "model", "dtype", "tokens within gap", "max gap", "gap tol"],
        note=f"{setup.check_batch} prompts of {setup.check_len} random tokens, {setup.new_tokens} new "
        "tokens with the KV cache; gap = (full-forward best logit - generated token's logit) / max "
        f"|logit|. bf16 passes with >= {MIN_AGREEMENT_BF16:.0%} of the tokens within the gap "
        "tolerance (routing decisions can flip on rounding noise), fp32 with all of them.",
    )
    cases = cache_cases(setup)
    for dtype_name, dtype in DTYPES.items():
        gap_tol = GAP_TOL_FP32 if dtype == torch.float32 else GAP_TOL_BF16
        needed = 1.0 if dtype == torch.float32 else MIN_AGREEMENT_BF16

        def verdict(generated: torch.Tensor, model: torch.nn.Module) -> dict[str, Any]:
            gaps = _gaps(model, generated, setup.check_len)
            share = float((gaps <= gap_tol).float().mean())
            return {
                "tokens within gap": share,
                "max gap": float(gaps.max()),
                "gap tol": gap_tol,
                "status": "ok" if share >= needed else "FAIL",
            }

        for kind in ("llama", "mixtral"):
            labels = [label for label, method, _ in cases if _family_of(method, setup) == kind]
            labels += ["scmoe (beta=0)"] if kind == "mixtral" else []
            if budget.expired():
                for label in labels:
                    add_row(table, budget, setup, {"method": label, "model": kind, "dtype": dtype_name}, dict)
                continue
            kind_cases = [case for case in cases if case[0] in labels]
            model = build_model(setup, kind, dtype, setup.check_layers)
            ids = random_ids(setup, model.config.vocab_size, setup.check_batch, setup.check_len, seed=1)
            mask = torch.ones_like(ids)
            for label, method, options in kind_cases:

                def measure(method=method, options=options) -> dict[str, Any]:
                    hf_attn_zoo.patch(model, method, **options)
                    try:
                        randomize_new_parameters(model)
                        with torch.no_grad():
                            generated = model.generate(
                                ids, attention_mask=mask, do_sample=False, max_new_tokens=setup.new_tokens
                            )
                        return verdict(generated, model)
                    finally:
                        hf_attn_zoo.unpatch(model)

                add_row(table, budget, setup, {"method": label, "model": kind, "dtype": dtype_name}, measure)
            if kind == "mixtral":

                def measure_scmoe() -> dict[str, Any]:
                    from hf_attn_zoo.decoding import scmoe_generate

                    generated = scmoe_generate(model, ids, mask, max_new_tokens=setup.new_tokens, beta=0.0)
                    return verdict(generated, model)

                add_row(
                    table,
                    budget,
                    setup,
                    {"method": "scmoe (beta=0)", "model": kind, "dtype": dtype_name},
                    measure_scmoe,
                )
            model = None  # release it (not `del`: the closures above read the name)
    return [table]


def static_patterns(setup: Setup) -> dict[str, AttentionPattern]:
    """The static sparse patterns at the set-up's scale (`unit` tokens ~ a 1024-token window on the GPU)."""
    heads, kv_heads, _ = setup.flex_heads
    unit = setup.unit
    # per KV head spans from half a unit to 16 units, as a searched MoA plan has them (GQA: a KV head's query
    # heads share its span)
    spans = [unit // 2, unit // 2, 2 * unit, 2 * unit, 4 * unit, 4 * unit, 16 * unit, 16 * unit]
    spans = [spans[i * len(spans) // kv_heads] for i in range(kv_heads)]
    sinks = max(1, unit // 16)
    per_head = [spans[h // (heads // kv_heads)] for h in range(heads)]
    return {
        "sliding_window": SinkWindowPattern(unit, 4),
        "power_attention": PowerPattern(unit // 4, 5, 1),
        "moa": MoAPattern([sinks] * heads, [span - sinks for span in per_head]),
    }


def _qkv(
    setup: Setup, length: int, dtype: torch.dtype, seed: int = 0, requires_grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    heads, kv_heads, dim = setup.flex_heads
    shapes = [(1, heads, length, dim), (1, kv_heads, length, dim), (1, kv_heads, length, dim)]
    return tuple(
        randn(shape, setup.device, dtype, seed + i).requires_grad_(requires_grad) for i, shape in enumerate(shapes)
    )


@contextlib.contextmanager
def _eager_on_cpu(setup: Setup) -> Iterator[None]:
    """`torch.compile`d code runs eagerly on CPU: there compiling takes about 30 s per FlexAttention pattern and
    minutes per model on two cores (the smoke run checks the script, the GPU run the compiled kernels)."""
    if setup.cuda:
        yield
        return
    with torch.compiler.set_stance("force_eager"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


def check_flex(setup: Setup, budget: Budget) -> list[Table]:
    table = Table(
        "Static sparse patterns: flex and blocks paths equal the masked reference",
        "correctness",
        ["pattern", "backend", "dtype", "forward error", "grad error (q,k,v)", "tol"],
        note=f"heads {setup.flex_heads[0]}/{setup.flex_heads[1]}, head dim {setup.flex_heads[2]}, "
        f"{setup.flex_len} tokens; reference: the masked path (one SDPA with the pattern as a mask) "
        "in fp32; error = max |x - ref| / max |ref|. "
        + (
            ""
            if setup.cuda
            else "CPU: FlexAttention has no backward there, so flex is checked forward only (and run eagerly)."
        ),
    )
    scaling = setup.flex_heads[2] ** -0.5
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        tol = TOL_FP32 if dtype == torch.float32 else TOL_BF16
        for name, pattern in static_patterns(setup).items():
            for backend in ("flex", "blocks"):

                def measure(pattern=pattern, backend=backend) -> dict[str, Any]:
                    q, k, v = _qkv(setup, setup.flex_len, dtype, requires_grad=True)
                    ref_q, ref_k, ref_v = (t.detach().float().requires_grad_() for t in (q, k, v))
                    reference = sparse_attention(ref_q, ref_k, ref_v, pattern, scaling=scaling, backend="masked")
                    grad_out = randn(reference.shape, setup.device, torch.float32, seed=7)
                    ref_grads = torch.autograd.grad(reference, (ref_q, ref_k, ref_v), grad_out)
                    backward = setup.cuda or backend != "flex"
                    with _eager_on_cpu(setup), torch.set_grad_enabled(backward):
                        out = sparse_attention(q, k, v, pattern, scaling=scaling, backend=backend)
                    cells = {"forward error": _rel_error(out, reference), "tol": tol}
                    errors = [cells["forward error"]]
                    if backward:
                        grads = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))
                        grad_errors = [_rel_error(g, r) for g, r in zip(grads, ref_grads)]
                        cells["grad error (q,k,v)"] = " / ".join(f"{e:.2g}" for e in grad_errors)
                        errors += grad_errors
                    else:
                        cells["grad error (q,k,v)"] = "n/a (CPU)"
                    cells["status"] = "ok" if max(errors) <= tol else "FAIL"
                    return cells

                add_row(table, budget, setup, {"pattern": name, "backend": backend, "dtype": dtype_name}, measure)
    return [table]


def check_linear(setup: Setup, budget: Budget) -> list[Table]:
    """The linear-attention kernel `linearize` / `nalaformer` run here against its reference: flash-linear-attention's
    kernels (the `fla` backend, CUDA with fla-core installed) against the PyTorch chunked path, else the chunked path
    against the naive quadratic one."""
    fla = setup.cuda and fla_available()
    table = Table(
        "Linear attention: the kernel equals its reference",
        "correctness",
        ["map", "window", "backend", "dtype", "forward error", "grad error (q,k,v)", "tol"],
        note=f"heads {setup.flex_heads[0]}/{setup.flex_heads[1]}, head dim {setup.flex_heads[2]}, {setup.flex_len} "
        "tokens; the map of q and k as features; reference: "
        + (
            "the PyTorch chunked path (fla is installed)"
            if fla
            else "the naive quadratic form (fla needs CUDA + fla-core)"
        )
        + "; error = max |x - ref| / max |ref|.",
    )
    scaling = setup.flex_heads[2] ** -0.5
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        tol = TOL_FP32 if dtype == torch.float32 else TOL_BF16
        for feature_map, window in (("nala", 0), ("hedgehog", 64)):
            fmap = FEATURE_MAPS[feature_map]

            def measure(fmap=fmap, window=window) -> dict[str, Any]:
                q, k, v = _qkv(setup, setup.flex_len, dtype, requires_grad=True)
                weight = torch.full((q.shape[1],), 0.1, device=q.device)
                outs, grads = [], []
                for kernel in (
                    functools.partial(hybrid_attention, backend="fla") if fla else hybrid_attention,
                    functools.partial(hybrid_attention, backend="torch") if fla else naive_hybrid_attention,
                ):
                    fq, fk = fmap(q, True), fmap(k, False)
                    features = LinearFeatures(fq, fk, fq, fk)
                    out = kernel(q, k, v, features, window=window, window_weight=weight, scaling=scaling)
                    outs.append(out)
                    grads.append(torch.autograd.grad(out.float().square().sum(), (q, k, v)))
                errors = [_rel_error(outs[0], outs[1])] + [_rel_error(a, b) for a, b in zip(grads[0], grads[1])]
                return {
                    "forward error": errors[0],
                    "grad error (q,k,v)": " / ".join(f"{e:.2g}" for e in errors[1:]),
                    "tol": tol,
                    "status": "ok" if max(errors) <= tol else "FAIL",
                }

            cells = {"map": feature_map, "window": window, "backend": "fla" if fla else "torch", "dtype": dtype_name}
            add_row(table, budget, setup, cells, measure)
    return [table]


def _flash(setup: Setup) -> tuple[str, Callable[..., torch.Tensor]]:
    """SDPA's flash kernel on CUDA (GQA folded in by SDPA, else the KV heads repeated beforehand), SDPA's default
    choice on CPU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    scaling = setup.flex_heads[2] ** -0.5
    if not setup.cuda:
        return "sdpa (default, CPU)", lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scaling, enable_gqa=True
        )

    def gqa(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)

    try:
        gqa(*_qkv(setup, 256, torch.bfloat16))
        return "sdpa flash (GQA)", gqa
    except RuntimeError:
        group = setup.flex_heads[0] // setup.flex_heads[1]
        # the repeat is outside the timed call: this row then times the kernel alone
        repeated: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def expanded(q, k, v):
            key = (id(k), id(v))
            if key not in repeated:
                repeated.clear()
                repeated[key] = (k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, *repeated[key], is_causal=True, scale=scaling)

        return "sdpa flash (KV repeated)", expanded


def _linear(feature_map: str, window: int, scaling: float) -> Callable[..., torch.Tensor]:
    """One linearized attention call as `linearize` runs it in inference (RoPE-free here: the map of q and k, the same
    features for numerator and normaliser), on fla's kernels when installed and on CUDA."""
    fmap = FEATURE_MAPS[feature_map]

    def attend(q, k, v):
        fq, fk = fmap(q, True), fmap(k, False)
        backend = "fla" if q.is_cuda and fla_available() else "torch"
        weight = torch.full((q.shape[1],), 0.1, device=q.device)
        features = LinearFeatures(fq, fk, fq, fk)
        return hybrid_attention(
            q, k, v, features, window=window, window_weight=weight, scaling=scaling, backend=backend
        )

    return attend


def _auto_backend(method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """What `backend="auto"` runs for these inputs (the patches' default)."""
    if method.startswith(("linearize", "nalaformer")):
        return "auto: fla" if q.is_cuda and fla_available() else "auto: torch (chunked)"
    if method == "moba":
        from hf_attn_zoo.kernels.moba import MASKED_MAX_PAIRS

        return "auto: masked" if q.shape[2] * k.shape[2] <= MASKED_MAX_PAIRS else "auto: gather"
    return f"auto: {choose_backend(q, k, v, compressed=False)}"


def speed_prefill(setup: Setup, budget: Budget) -> list[Table]:
    heads, kv_heads, dim = setup.flex_heads
    dtype = torch.bfloat16 if setup.cuda else torch.float32
    baseline_name, baseline = _flash(setup)
    table = Table(
        "Sparse prefill vs dense attention (one attention call)",
        "speed",
        ["method", "backend", "tokens", "ms", "speedup vs dense"],
        numeric=("ms", "speedup vs dense"),
        note=f"batch 1, {heads} query / {kv_heads} KV heads, head dim {dim}, {str(dtype)[6:]}, forward "
        f"only; dense = {baseline_name}; median of {setup.repeats} after an untimed warm-up "
        "(compilation, BlockMask). sliding_window: window "
        f"{setup.unit} + 4 sinks; power_attention: {setup.unit // 4}-token blocks, window 5, 1 sink "
        f"block; moba: {setup.unit // 2}-token blocks, top-3; moa: per-KV-head spans of "
        f"{setup.unit // 2}..{16 * setup.unit} tokens; nalaformer: nala map, pure linear; linearize: hedgehog "
        "map + 64-token softmax window (the feature maps included in the time).",
    )
    scaling = dim**-0.5
    patterns = static_patterns(setup)
    methods: dict[str, Callable[..., torch.Tensor]] = {
        "sliding_window": functools.partial(sparse_attention, pattern=patterns["sliding_window"], scaling=scaling),
        "power_attention": functools.partial(sparse_attention, pattern=patterns["power_attention"], scaling=scaling),
        "moba": functools.partial(moba_attention, block_size=setup.unit // 2, top_k=3, scaling=scaling),
        "moa": functools.partial(sparse_attention, pattern=patterns["moa"], scaling=scaling),
        "nalaformer": _linear("nala", 0, scaling),
        "linearize hedgehog w64": _linear("hedgehog", 64, scaling),
    }
    for length in setup.prefill_lengths:
        q, k, v = _qkv(setup, length, dtype)
        dense: dict[str, float] = {}

        def measure_dense() -> dict[str, Any]:
            with torch.no_grad():
                dense["s"] = _median_seconds(lambda: baseline(q, k, v), setup.repeats, setup.device)
            return {"ms": dense["s"] * 1e3, "speedup vs dense": 1.0}

        add_row(table, budget, setup, {"method": "dense", "backend": baseline_name, "tokens": length}, measure_dense)
        for name, fn in methods.items():

            def measure(fn=fn) -> dict[str, Any]:
                with torch.no_grad():
                    seconds = _median_seconds(lambda: fn(q, k, v), setup.repeats, setup.device)
                return {"ms": seconds * 1e3, "speedup vs dense": dense["s"] / seconds if dense else None}

            add_row(
                table,
                budget,
                setup,
                {"method": name, "backend": _auto_backend(name, q, k, v), "tokens": length},
                measure,
            )
        q = k = v = None  # release them (not `del`: the closures above read the names)
    return [table]


def _filled_cache(model: torch.nn.Module, batch: int, context: int):
    from transformers import DynamicCache

    config = model.config
    layout = resolve_family(config).head_layout(config)
    parameter = next(model.parameters())
    cache = DynamicCache(config=config)
    shape = (batch, layout.num_kv_heads, context, layout.head_dim)
    for layer in range(config.num_hidden_layers):
        key, value = (randn(shape, parameter.device, parameter.dtype, seed=2 * layer + i).mul_(0.5) for i in range(2))
        cache.update(key, value, layer)
    return cache


def _decode_seconds(model: torch.nn.Module, setup: Setup, batch: int) -> float:
    """Seconds per decode step (one token per row), the KV cache pre-filled with random keys/values."""
    context = setup.decode_context
    cache = _filled_cache(model, batch, context)
    cache_name = _cache_kwarg(model)
    token = random_ids(setup, model.config.vocab_size, batch, 1, seed=5)
    mask = torch.ones(batch, context + setup.decode_steps + 1, dtype=torch.long, device=setup.device)

    def step(i: int) -> None:
        position = torch.full((batch, 1), context + i, device=setup.device)
        model(
            token,
            position_ids=position,
            attention_mask=mask[:, : context + i + 1],
            use_cache=True,
            **{cache_name: cache},
        )

    with torch.no_grad():
        step(0)  # warm-up
        _sync(setup.device)
        start = time.perf_counter()
        for i in range(1, setup.decode_steps + 1):
            step(i)
        _sync(setup.device)
    return (time.perf_counter() - start) / setup.decode_steps


def speed_moh_decode(setup: Setup, budget: Budget) -> list[Table]:
    heads = setup.llama["num_attention_heads"]
    groups = setup.llama["num_key_value_heads"]
    extra = {} if setup.skip_min_unread_kv is None else {"skip_min_unread_kv": setup.skip_min_unread_kv}
    variants = {
        "dense": None,
        f"moh group, {groups * 3 // 4}/{groups} KV groups (defaults)": {"granularity": "group", **extra},
        f"moh group, {groups // 2}/{groups} KV groups": {
            "granularity": "group",
            "shared_heads": 0,
            "top_k": heads // 2,
            **extra,
        },
    }
    table = Table(
        "MoH group-routing decode vs dense",
        "speed",
        ["model", "batch", "context", "variant", "tokens/s", "vs dense"],
        numeric=("tokens/s", "vs dense"),
        note=f"LLaMA-3-8B shapes, {setup.speed_layers} layers, bf16 (fp32 on CPU), learned router "
        f"(random), {setup.decode_steps} decode steps after a warm-up step, KV cache pre-filled with "
        f"random keys/values; median of {setup.rounds} alternating rounds.",
    )
    dtype = torch.bfloat16 if setup.cuda else torch.float32
    model = build_model(setup, "llama", dtype, setup.speed_layers)

    def seconds_per_step(options: dict[str, Any] | None, batch: int) -> float:
        if options is None:
            return _decode_seconds(model, setup, batch)
        hf_attn_zoo.patch(model, "moh", router="learned", **options)
        try:
            randomize_new_parameters(model)
            return _decode_seconds(model, setup, batch)
        finally:
            hf_attn_zoo.unpatch(model)

    for batch in setup.decode_batches:
        rounds = Rounds(
            {name: functools.partial(seconds_per_step, options, batch) for name, options in variants.items()},
            setup.rounds,
            setup.device,
        )
        for name in variants:

            def measure(name=name, rounds=rounds, batch=batch) -> dict[str, Any]:
                rate = batch / rounds.median(name)
                return {
                    "tokens/s": rate,
                    "vs dense": rounds.median("dense") / rounds.median(name),
                    **rounds.cells(name),
                }

            add_row(
                table,
                budget,
                setup,
                {"model": "llama-8b-shaped", "batch": batch, "context": setup.decode_context, "variant": name},
                measure,
            )
    model = None  # release it (not `del`: the closures above read the name)
    return [table]


def speed_scmoe(setup: Setup, budget: Budget) -> list[Table]:
    from hf_attn_zoo.decoding import scmoe_generate

    table = Table(
        "SCMoE decode vs greedy",
        "speed",
        ["model", "batch", "pass", "tokens/s", "vs greedy", "target"],
        numeric=("tokens/s", "vs greedy"),
        note=f"Mixtral-8x7B shapes, {setup.check_layers} layers, bf16 (fp32 on CPU); prompts of "
        f"{setup.scmoe_prompt} random tokens, {setup.scmoe_tokens} new tokens per row, prefill "
        "included; SCMoE alpha 0.1, beta 0.5, weak = the rank-2 expert; median of "
        f"{setup.rounds} alternating rounds after a warm-up of each.",
    )
    dtype = torch.bfloat16 if setup.cuda else torch.float32
    model = build_model(setup, "mixtral", dtype, setup.check_layers)
    for batch in setup.scmoe_batches:
        ids = random_ids(setup, model.config.vocab_size, batch, setup.scmoe_prompt, seed=2)
        mask = torch.ones_like(ids)

        def greedy(ids=ids, mask=mask) -> torch.Tensor:
            return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=setup.scmoe_tokens)

        def scmoe(ids=ids, mask=mask) -> torch.Tensor:
            return scmoe_generate(
                model, ids, mask, max_new_tokens=setup.scmoe_tokens, alpha=0.1, beta=0.5, weak="rank:2"
            )

        def seconds(run: Callable[[], torch.Tensor], ids=ids) -> float:
            with torch.no_grad():
                out = run()
                if out.shape[1] != ids.shape[1] + setup.scmoe_tokens:
                    raise RuntimeError(f"generated {out.shape[1] - ids.shape[1]} tokens, not {setup.scmoe_tokens}")
                return _median_seconds(run, 1, setup.device, warm_up=False)

        rounds = Rounds(
            {"greedy": functools.partial(seconds, greedy), "scmoe": functools.partial(seconds, scmoe)},
            setup.rounds,
            setup.device,
        )
        for name in ("greedy", "scmoe"):

            def measure(name=name, rounds=rounds, batch=batch) -> dict[str, Any]:
                rate = batch * setup.scmoe_tokens / rounds.median(name)
                return {
                    "tokens/s": rate,
                    "vs greedy": rounds.median("greedy") / rounds.median(name),
                    **rounds.cells(name),
                }

            add_row(
                table,
                budget,
                setup,
                {
                    "model": "mixtral-8x7b-shaped",
                    "batch": batch,
                    "pass": name,
                    "target": f">= {SCMOE_TARGET}x" if name == "scmoe" else None,
                },
                measure,
            )
    model = None  # release it (not `del`: the closures above read the name)
    return [table]


def _train_seconds(model: torch.nn.Module, setup: Setup) -> float:
    """Seconds per training step (forward, backward, AdamW step) on random tokens, after a warm-up step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, foreach=True)
    ids = random_ids(setup, model.config.vocab_size, setup.train_batch, setup.train_len, seed=3)

    def step() -> None:
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    try:
        step()
        _sync(setup.device)
        start = time.perf_counter()
        for _ in range(setup.train_steps):
            step()
        _sync(setup.device)
        return (time.perf_counter() - start) / setup.train_steps
    finally:
        model.eval()


def speed_train(setup: Setup, budget: Budget) -> list[Table]:
    table = Table(
        "Training steps/s: MoH (learned router) vs dense",
        "speed",
        ["model", "variant", "steps/s", "tokens/s", "vs dense", "target"],
        numeric=("steps/s", "tokens/s", "vs dense"),
        note=f"LLaMA-3-8B shapes, {setup.speed_layers} layers, bf16 weights (fp32 on CPU), every weight "
        f"trained, AdamW; batch {setup.train_batch} x {setup.train_len} tokens; {setup.train_steps} "
        f"steps after a warm-up step; median of {setup.rounds} alternating rounds.",
    )
    dtype = torch.bfloat16 if setup.cuda else torch.float32
    model = build_model(setup, "llama", dtype, setup.speed_layers)

    def moh() -> float:
        hf_attn_zoo.patch(model, "moh", router="learned")
        try:
            randomize_new_parameters(model)
            return _train_seconds(model, setup)
        finally:
            hf_attn_zoo.unpatch(model)

    rounds = Rounds(
        {"dense": lambda: _train_seconds(model, setup), "moh (learned, defaults)": moh}, setup.rounds, setup.device
    )
    for name in rounds.variants:

        def measure(name=name) -> dict[str, Any]:
            rate = 1 / rounds.median(name)
            return {
                "steps/s": rate,
                "tokens/s": rate * setup.train_batch * setup.train_len,
                "vs dense": rounds.median("dense") / rounds.median(name),
                **rounds.cells(name),
            }

        add_row(
            table,
            budget,
            setup,
            {"model": "llama-8b-shaped", "variant": name, "target": None if name == "dense" else f">= {TRAIN_TARGET}x"},
            measure,
        )
    model = None  # release it (not `del`: the closures above read the name)
    return [table]


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def speed_compile(setup: Setup, budget: Budget) -> list[Table]:
    table = Table(
        "torch.compile'd patched model vs eager (forward)",
        "speed",
        ["model", "method", "eager ms", "compiled ms", "speedup", "compile s", "recompiles", "max rel. diff"],
        numeric=("eager ms", "compiled ms", "speedup"),
        note=f"LLaMA-3-8B shapes, {setup.speed_layers} layers, bf16 (fp32 on CPU), batch 1 x "
        f"{setup.compile_len} tokens, no grad; backend {setup.compile_backend}; compile s = the "
        "first (untimed) call; recompiles = graphs compiled during the timed calls (each frame "
        f"at most {COMPILE_RECOMPILE_LIMIT}, then dynamo runs it eagerly); max rel. diff = "
        "max |compiled - eager| / max |eager| over the logits."
        + (
            ""
            if setup.cuda
            else " CPU smoke: the compiled model runs under the force_eager stance "
            "(dynamo would take minutes on two cores)."
        ),
    )
    dtype = torch.bfloat16 if setup.cuda else torch.float32
    model = build_model(setup, "llama", dtype, setup.speed_layers)
    ids = random_ids(setup, model.config.vocab_size, 1, setup.compile_len, seed=4)
    cases = {
        "sliding_window": {"window": setup.unit, "sinks": 4},
        "moh": {"router": "learned", "granularity": "group"},
    }
    for method, options in cases.items():

        def measure(method=method, options=options) -> dict[str, Any]:
            hf_attn_zoo.patch(model, method, **options)
            torch._dynamo.reset()
            try:
                randomize_new_parameters(model)
                compiled = torch.compile(model, backend=setup.compile_backend)
                limit = torch._dynamo.config.patch(recompile_limit=COMPILE_RECOMPILE_LIMIT)
                with torch.no_grad(), _eager_on_cpu(setup), limit:
                    eager_logits = model(ids).logits
                    start = time.perf_counter()
                    compiled_logits = compiled(ids).logits
                    _sync(setup.device)
                    compile_seconds = time.perf_counter() - start
                    graphs = _compiled_graphs()
                    fast = _median_seconds(
                        lambda: compiled(ids),
                        setup.repeats,
                        setup.device,
                        warm_up=False,
                        max_seconds=COMPILE_TIMING_SECONDS,
                    )
                    recompiles = _compiled_graphs() - graphs
                    eager = _median_seconds(lambda: model(ids), setup.repeats, setup.device)
                return {
                    "eager ms": eager * 1e3,
                    "compiled ms": fast * 1e3,
                    "speedup": eager / fast,
                    "compile s": compile_seconds,
                    "recompiles": recompiles,
                    "max rel. diff": _rel_error(compiled_logits, eager_logits),
                }
            finally:
                hf_attn_zoo.unpatch(model)
                torch._dynamo.reset()

        add_row(table, budget, setup, {"model": "llama-8b-shaped", "method": method}, measure)
    model = None  # release it (not `del`: the closures above read the name)
    return [table]


# run in this order: the cheap sections first, so the compile-heavy ones (flex, prefill, compile) get what is left
SECTIONS: dict[str, Callable[[Setup, Budget], list[Table]]] = {
    "neutral": check_neutral,
    "cache": check_cache,
    "moh_decode": speed_moh_decode,
    "scmoe": speed_scmoe,
    "train": speed_train,
    "flex": check_flex,
    "linear": check_linear,
    "prefill": speed_prefill,
    "compile": speed_compile,
}


def header(setup: Setup, smoke: bool) -> dict[str, str]:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if setup.cuda:
        props = torch.cuda.get_device_properties(setup.device)
        device = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})"
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "mode": "smoke (CPU, tiny shapes)" if smoke else "GPU (real shapes)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": triton_version,
        "device": device,
    }


def _section_error(name: str, error: BaseException) -> Table:
    table = Table(f"Section {name}", "correctness", ["section"])
    table.rows.append({"section": name, "status": f"error: {type(error).__name__}: {error}"})
    return table


def _watchdog(report: Report, out: Path | None, limit: float) -> threading.Timer:
    """Past the run's time limit, write what is there and exit (a stuck compile or kernel cannot stop the run)."""

    def expire() -> None:
        log(f"time limit of {limit:.0f}s reached: writing the results so far and exiting")
        print(report.markdown(), flush=True)
        report.write(out, complete=False)
        os._exit(3)

    timer = threading.Timer(limit, expire)
    timer.daemon = True
    timer.start()
    return timer


def run(setup: Setup, sections: list[str], out: Path | None, smoke: bool) -> Report:
    report = Report(header(setup, smoke))
    for key, value in report.header.items():
        log(f"{key}: {value}")
    timer = _watchdog(report, out, setup.time_limit)
    deadline = time.perf_counter()
    for name in sections:
        deadline += setup.budgets[name]
        log(f"section {name} (until +{deadline - START:.0f}s)")
        try:
            tables = SECTIONS[name](setup, Budget(deadline))
        except Exception as error:  # noqa: BLE001  (a broken section is reported, the others still run)
            traceback.print_exc()
            tables = [_section_error(name, error)]
        with report.lock:
            report.tables.extend(tables)
        report.write(out, complete=False)
        if setup.cuda:
            torch.cuda.empty_cache()
    timer.cancel()
    report.write(out, complete=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, short sequences (under a minute)")
    parser.add_argument("--out", type=Path, help="markdown file to write (the JSON goes next to it)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {list(SECTIONS)}")
    parser.add_argument(
        "--time-limit", type=float, help="seconds for the whole run after the imports (default: 440 GPU, 600 smoke)"
    )
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; known: {list(SECTIONS)}")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --smoke on CPU")
    setup = smoke_setup() if args.smoke else gpu_setup()
    if args.time_limit:
        setup = dataclasses.replace(setup, time_limit=args.time_limit)
    torch.set_float32_matmul_precision("highest")  # fp32 checks compare fp32, not TF32
    report = run(setup, sections, args.out, args.smoke)
    print("\n" + report.markdown(), flush=True)
    failed = [r for t in report.tables for r in t.rows if r.get("status") != "ok"]
    log(f"done: {sum(len(t.rows) for t in report.tables)} rows, {len(failed)} not ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
