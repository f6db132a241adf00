"""`hf-attn-zoo upcycle`: build an MoE from dense checkpoints (or from a mergekit-moe YAML) and save it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..cli_args import parse_options, read_prompts

# read_prompts lives in hf_attn_zoo.cli_args; its old home here stays importable (benchmarks use it)
__all__ = ["read_prompts", "upcycle_main"]


def upcycle_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-attn-zoo upcycle",
        description="Upcycle dense checkpoints into an MoE: sparse (seed copies), btx (FFN experts from several "
        "models) or bam (FFN and attention experts).",
    )
    parser.add_argument("seed", nargs="?", help="seed model: folder, hub id or 'default' (SmolLM2-135M-Instruct)")
    parser.add_argument("experts", nargs="*", help="expert models (btx/bam), after the seed")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already holds something")
    parser.add_argument(
        "--mode",
        choices=["sparse", "btx", "bam"],
        default="btx",
        help="sparse: copies of SEED; btx: one expert per EXPERT (FFNs); bam: FFN and attention experts",
    )
    parser.add_argument("--mergekit", type=Path, help="build what a mergekit-moe YAML describes instead")
    parser.add_argument("--num-experts", type=int, help="sparse: number of seed copies (default 4)")
    parser.add_argument("--top-k", type=int, help="FFN experts per token (default 2; 1 for bam)")
    parser.add_argument("--layers", default="all", help="'all' or comma-separated layer indices")
    parser.add_argument(
        "--router-init",
        choices=["random", "hidden", "embed"],
        default="random",
        help="router rows: random, or the mean hidden state / embedding of each expert's --prompts",
    )
    parser.add_argument(
        "--prompts",
        action="append",
        default=[],
        help="one per expert (in order, seed first): a prompt file or corpus:NAME",
    )
    parser.add_argument("--noise", type=float, default=0.0, help="relative noise on expert copies")
    parser.add_argument("--shared", choices=["average", "seed"], help="non-expert weights: average or seed's")
    parser.add_argument("--no-seed-expert", action="store_true", help="btx/bam: the seed is not an expert")
    parser.add_argument("--dtype", default="auto", help="dtype of the MoE (auto: the seed's; or float32, bfloat16 ...)")
    parser.add_argument(
        "--bam",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="bam patch options, e.g. kv=shared routing=top_k top_k=2 parallel_block=true",
    )
    args = parser.parse_intermixed_args(argv)
    from .build import upcycle
    from .mergekit import mergekit_upcycle_kwargs

    if args.mergekit:
        kwargs: dict[str, Any] = mergekit_upcycle_kwargs(args.mergekit)
    else:
        if not args.seed:
            parser.error("give a seed model or --mergekit FILE")
        layers: Any = args.layers if args.layers == "all" else [int(i) for i in args.layers.split(",")]
        kwargs = dict(
            seed=args.seed,
            experts=args.experts,
            mode=args.mode,
            num_experts=args.num_experts,
            top_k=args.top_k,
            layers=layers,
            router_init=args.router_init,
            noise=args.noise,
            shared=args.shared,
            include_seed=not args.no_seed_expert,
            dtype=args.dtype,
            prompts=[read_prompts(p) for p in args.prompts] or None,
            bam_options=parse_options(args.bam) or None,
        )
    model = upcycle(**kwargs, output_dir=args.out, overwrite=args.overwrite)
    record = model.config.hf_attn_zoo_upcycling
    total = sum(p.numel() for p in model.parameters())
    print(
        f"{record['mode']}: {len(record['experts'])} experts (top-{record['top_k']}) on {len(record['layers'])} "
        f"layers, {type(model).__name__}, {total / 1e6:.1f}M parameters -> {args.out}"
    )
    loader = "hf_attn_zoo.from_pretrained" if record["mode"] == "bam" else "AutoModelForCausalLM.from_pretrained"
    print(f"load it with {loader}({str(args.out)!r})")
    return 0
