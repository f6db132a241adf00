"""`hf-attn-zoo moa profile | search | apply`: MoA's profile -> search -> apply pipeline (arXiv:2406.14909)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["main"]

_USAGE = """usage: hf-attn-zoo moa <step> [args]    (hf-attn-zoo moa <step> --help: the step's options)

steps:
  profile --model default --lengths 512,1024 --samples 4 --out prof.pt     attention influence on held-out text
  search  --profile prof.pt --density 0.5 --out plan.json                  MILP plan under a density budget
          (an existing --out is refused; --overwrite replaces it)
  apply   --model default --plan plan.json                                 held-out perplexity: dense, plan, uniform
"""


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _load(model: str):
    from transformers import AutoTokenizer

    from ..assets import resolve_model
    from ..loading import from_pretrained

    path = resolve_model(model)
    return from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def profile_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-attn-zoo moa profile", description="MoA attention-influence profile on held-out corpus text."
    )
    parser.add_argument("--model", default="default", help="local folder, hub id, or 'default' (SmolLM2-135M-Instruct)")
    parser.add_argument(
        "--lengths",
        type=_ints,
        default=[512, 1024],
        help="comma-separated profiled lengths (CPU: 512,1024; GPU: MoA's 2048,4096,8192)",
    )
    parser.add_argument("--samples", type=int, default=4, help="calibration sequences per length")
    parser.add_argument("--block-size", type=int, default=64, help="tile size of the influence sums (MoA: 64)")
    parser.add_argument("--corpus", default="python_docs", help="corpus whose held-out split is the calibration text")
    parser.add_argument("--out", type=Path, default=Path("moa_profile.pt"), help="the profile file (torch.save)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_intermixed_args(argv)
    from ..outputs import atomic_output, check_output
    from .profile import profile_model

    check_output(args.out, args.overwrite, "profile file")

    model, tokenizer = _load(args.model)
    profile = profile_model(model, tokenizer, tuple(args.lengths), args.samples, args.block_size, args.corpus)
    profile.metadata["model_arg"] = args.model
    with atomic_output(args.out, args.overwrite, is_file=True, what="profile file") as tmp:
        profile.save(tmp)
    losses = ", ".join(f"{n}: {v:.3f}" for n, v in profile.metadata["loss"].items())
    print(
        f"profiled {profile.model['num_layers']} layers x {profile.model['num_heads']} heads at lengths "
        f"{profile.lengths} (mean loss {losses}) -> {args.out}"
    )
    return 0


def search_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hf-attn-zoo moa search", description="MoA plan search (MILP).")
    parser.add_argument("--profile", type=Path, required=True, help="a file written by `moa profile`")
    parser.add_argument("--density", type=float, default=0.5, help="mean density budget (MoA: 0.5)")
    parser.add_argument("--sinks", type=int, default=64, help="sink tokens per rule (MoA: 64)")
    parser.add_argument("--alpha-step", type=int, default=None, help="grid step of alpha (default: min length / 8)")
    parser.add_argument("--max-rules-per-layer", type=int, default=2, help="distinct rules per layer (0: no limit)")
    parser.add_argument(
        "--granularity", choices=["kv_head", "head"], default="kv_head", help="one rule per KV group or per head"
    )
    parser.add_argument(
        "--group-reduce", choices=["sum", "max"], default="sum", help="how a KV head's query heads' influence combine"
    )
    parser.add_argument("--gap", type=float, default=0.01, help="MILP relative optimality gap")
    parser.add_argument("--time-limit", type=float, default=30.0, help="seconds per MILP")
    parser.add_argument("--out", type=Path, default=Path("moa_plan.json"), help="the plan (JSON) `moa apply` reads")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_intermixed_args(argv)
    from ..outputs import atomic_output, check_output
    from .profile import AttentionProfile
    from .search import search_plan

    check_output(args.out, args.overwrite, "plan file")

    result = search_plan(
        AttentionProfile.load(args.profile),
        args.density,
        args.sinks,
        args.alpha_step,
        args.max_rules_per_layer or None,
        args.granularity,
        args.group_reduce,
        args.time_limit,
        args.gap,
        str(args.profile),
    )
    for plan in result.plans:
        p = plan.provenance
        print(f"primary length {p['primary_length']}: loss {json.dumps(p['loss'])}, density {json.dumps(p['density'])}")
    with atomic_output(args.out, args.overwrite, is_file=True, what="plan file") as tmp:
        result.chosen.save(tmp)
    print(
        f"chose primary length {result.chosen.provenance['primary_length']} ({result.chosen.provenance['choice']})"
        f" -> {args.out}"
    )
    return 0


def apply_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-attn-zoo moa apply",
        description="Held-out perplexity of the dense model, the MoA plan, and the "
        "uniform StreamingLLM rule (alpha=0) at the plan's density.",
    )
    parser.add_argument("--model", default="default", help="local folder, hub id, or 'default' (SmolLM2-135M-Instruct)")
    parser.add_argument("--plan", type=Path, required=True, help="a plan written by `moa search`")
    parser.add_argument(
        "--corpus",
        default="python_stdlib_docs",
        help="held-out text to measure on (use another corpus than the profile's)",
    )
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per block (default: the plan's length)")
    parser.add_argument("--blocks", type=int, default=4, help="held-out blocks of --seq-len tokens to score")
    args = parser.parse_intermixed_args(argv)
    from ..analysis.perplexity import held_out_perplexity
    from ..patching import patch, unpatch
    from .plan import load_plan
    from .search import rule_stats, uniform_beta

    plan, _ = load_plan(args.plan)
    model, tokenizer = _load(args.model)
    seq_len = args.seq_len or plan.length or 1024
    length = plan.length or seq_len

    def ppl() -> float:
        return held_out_perplexity(model, tokenizer, args.corpus, seq_len=seq_len, max_blocks=args.blocks, batch_size=1)

    rows = [("dense", 1.0, ppl())]
    rules = [(a, b) for ra, rb in zip(plan.alphas, plan.betas) for a, b in zip(ra, rb)]
    density = sum(rule_stats(a, b, length, plan.sinks, length)[1] for a, b in rules) / len(rules)
    patch(model, "moa", plan=str(args.plan))
    rows.append(("moa plan", density, ppl()))
    unpatch(model)
    beta = uniform_beta(density, length, plan.sinks)
    patch(model, "moa", alpha=0.0, beta=beta, sinks=plan.sinks, length=length)
    rows.append((f"uniform (alpha=0, beta={beta:.3f})", rule_stats(0.0, beta, length, plan.sinks, length)[1], ppl()))
    unpatch(model)
    print(f"held-out perplexity on {args.corpus}, {args.blocks} blocks of {seq_len} tokens (N={length}):")
    print("| attention | density at N | perplexity |\n|---|---|---|")
    for name, dens, value in rows:
        print(f"| {name} | {dens:.3f} | {value:.3f} |")
    return 0


_STEPS = {"profile": profile_main, "search": search_main, "apply": apply_main}


def main(argv: list[str]) -> int:
    """Run one MoA step; `argv` excludes the `moa` command itself."""
    if not argv or argv[0] not in _STEPS:
        print(_USAGE)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return _STEPS[argv[0]](argv[1:])
