"""`hf-attn-zoo plan MODEL METHOD [key=value ...]`: the plan as tables (or JSON); exit code 2 when it cannot run."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .kernels import layer_ranges
from .memory import DTYPE_BYTES, GiB, OPTIMIZER_STATE_BYTES, SHARDINGS, TRAIN_MODES

__all__ = ["format_plan", "plan_main"]


def _count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _options(options: dict[str, Any]) -> str:
    shown = {k: v for k, v in options.items() if k not in ("layers",)}
    text = ", ".join(
        f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
        for k, v in shown.items()
        if not (k == "plan" and isinstance(v, dict))
    )
    if isinstance(options.get("plan"), dict):
        text += ", plan=<inline MoA plan>"
    return text or "defaults"


_MEMORY_ROWS = {
    "weights": "weights",
    "gradients": "gradients",
    "optimizer": "optimizer states",
    "gathered": "all-gathered FSDP units",
    "activations": "activations",
    "logits": "logits + loss",
    "kv_cache": "KV cache",
}


def format_plan(plan) -> str:
    """The plan as markdown tables with a header and the assumptions."""
    s = plan.setup
    lines = [f"hf-attn-zoo plan: {plan.model} ({plan.source}) -> {plan.architecture}, method {plan.method}"]
    if plan.method != "none":
        layers = f" on layers {layer_ranges(plan.layers)}" if plan.layers is not None else ""
        lines.append(f"  options: {_options(plan.options)}{layers}")
    train = "inference" if s.train == "none" else f"train {s.train}, {s.optimizer}"
    lines.append(
        f"  {s.gpus} x {plan.gpu_memory_gib:g} GiB GPU ({plan.device}), {s.dtype}, {s.sharding}, {train}, "
        f"seq {s.seq_len} x batch {s.batch} per GPU, gradient checkpointing "
        f"{'on' if s.gradient_checkpointing else 'off'}"
    )
    lines.append(
        f"  built{' and patched' if plan.method != 'none' else ''} on the meta device in "
        f"{plan.build_seconds:.2f} s, no weight allocated"
    )
    word = "upcycling" if plan.method == "upcycle" else "patch"
    rows = [
        ("before the " + word, plan.params_before),
        ("after the " + word, plan.params_after),
        ("new (created by the " + word + ")", plan.params_new),
        (f"trainable (--train {s.train})", plan.params_trainable),
    ]
    if plan.params_active is not None:
        rows.append(("active per token (MoE)", plan.params_active))
    lines += ["", "| parameters | count |", "|---|---|"] + [f"| {name} | {_count(n)} |" for name, n in rows]

    m = plan.memory
    lines += ["", "| memory per GPU | GiB | how |", "|---|---|---|"]
    for row, label in _MEMORY_ROWS.items():
        value = getattr(m, row)
        if value or row in ("weights", "activations") or (row in ("gradients", "optimizer") and s.train != "none"):
            how = m.how.get(row, "")
            if row == "activations" and plan.activations_other is not None:
                how += (
                    f"; {'without' if s.gradient_checkpointing else 'with'} gradient checkpointing: "
                    f"{plan.activations_other / GiB:.2f} GiB"
                )
            lines.append(f"| {label} | {value / GiB:.2f} | {how} |")
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(
        f"| **total** | **{plan.total_gib:.2f}** | of {plan.gpu_memory_gib:g} GiB: {verdict} "
        f"({100 * plan.total_gib / plan.gpu_memory_gib:.0f}%) |"
    )
    if not plan.fits and plan.fitting_gpus is not None:
        lines.append(f"| | | fits with {plan.fitting_gpus} GPUs ({s.sharding}) |")

    kb, ka = plan.kv_before, plan.kv_after
    lines += [
        "",
        f"| KV cache (inference, {s.dtype}) | before | after |",
        "|---|---|---|",
        f"| per token, all layers (before any bound) | {_bytes(kb.bytes_per_token)} | {_bytes(ka.bytes_per_token)} |",
        f"| one sequence of {s.seq_len} tokens | {_bytes(kb.bytes_at_seq_len)} | {_bytes(ka.bytes_at_seq_len)} |",
        f"| mean per token at {s.seq_len} tokens | {_bytes(kb.bytes_at_seq_len / s.seq_len)} | "
        f"{_bytes(ka.bytes_at_seq_len / s.seq_len)} |",
    ]
    if s.batch > 1:
        lines.append(
            f"| batch of {s.batch} at {s.seq_len} tokens | {_bytes(kb.bytes_at_seq_len * s.batch)} | "
            f"{_bytes(ka.bytes_at_seq_len * s.batch)} |"
        )
    lines.append(f"| layers whose cache stops growing before {s.seq_len} | {kb.bounded_layers} | {ka.bounded_layers} |")

    lines += [
        "",
        f"| attention ({plan.device}) | method | training / prefill at {s.seq_len} tokens | decode |",
        "|---|---|---|---|",
    ]
    for choice in plan.kernels:
        layers = layer_ranges(choice.layers)
        lines.append(f"| layers {layers} | {choice.method} | {choice.train_prefill} | {choice.decode} |")
    if plan.experts_kernel:
        experts, _, text = plan.experts_kernel.partition(": ")
        lines.append(f"| {experts} | - | {text} | same |")
    lines += ["", "assumptions:"] + [f"- {a}" for a in plan.assumptions]
    if plan.warnings:
        lines += ["", "warnings:"] + [f"- {w}" for w in plan.warnings]
    return "\n".join(lines)


def _layers(text: str) -> Any:
    if "," in text or text.lstrip("-").isdigit():
        return [int(i) for i in text.split(",")]
    return text


def plan_main(argv: list[str]) -> int:
    from ..cli_args import parse_options
    from . import plan, shipped_models

    parser = argparse.ArgumentParser(
        prog="hf-attn-zoo plan",
        description="Plan before you rent: parameters, memory per GPU, KV cache and attention kernels of a patched "
        "(or upcycled) model, computed on the meta device from its config. Exit code 2 when the plan "
        "cannot run (impossible sharding, memory that does not fit, bad input).",
    )
    parser.add_argument(
        "model", help=f"a shipped config ({', '.join(shipped_models())}), a folder with a config.json, or a hub id"
    )
    parser.add_argument(
        "method",
        help="a method (see `hf-attn-zoo methods`), 'none' (the unpatched model) or "
        "'upcycle' (options mode=sparse|btx|bam num_experts=N top_k=K bam_options=...)",
    )
    parser.add_argument("options", nargs="*", help="method options as key=value (e.g. router=onorm top_k=7)")
    parser.add_argument("--layers", default="all", help="'all', 'every_2nd', or a comma-separated list of indices")
    parser.add_argument("--gpus", type=int, default=1, help="number of GPUs (default 1)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    parser.add_argument("--sharding", choices=SHARDINGS, default="fsdp", help="default fsdp")
    parser.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="bf16", help="default bf16")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default 4096)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per GPU micro-batch (default 1)")
    parser.add_argument(
        "--train",
        choices=TRAIN_MODES,
        default="full",
        help="full, lora (r=--lora-rank on q/k/v/o + the patch's new modules), new (only the "
        "patch's parameters), none (inference); default full",
    )
    parser.add_argument("--optimizer", choices=tuple(OPTIMIZER_STATE_BYTES), default="adamw", help="default adamw")
    parser.add_argument(
        "--no-master-weights",
        action="store_true",
        help="no fp32 master copy in bf16/fp16 training (pure low-precision optimizer)",
    )
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="plan activations with gradient checkpointing"
    )
    parser.add_argument("--lora-rank", type=int, default=16, help="LoRA rank r for --train lora")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="for the kernel choice")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_intermixed_args(argv)
    result = plan(
        args.model,
        args.method,
        parse_options(args.options),
        layers=_layers(args.layers),
        gpus=args.gpus,
        sharding=args.sharding,
        dtype=args.dtype,
        seq_len=args.seq_len,
        batch=args.batch,
        train=args.train,
        optimizer=args.optimizer,
        master_weights=not args.no_master_weights,
        gradient_checkpointing=args.gradient_checkpointing,
        gpu_memory_gib=args.gpu_memory,
        lora_rank=args.lora_rank,
        device=args.device,
    )
    print(json.dumps(result.to_dict(), indent=1, default=str) if args.json else format_plan(result), flush=True)
    result.check()  # PlanError (exit code 2) with the figures when it does not fit
    return 0
