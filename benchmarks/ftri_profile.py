"""Throughput of fTRI expert profiling (`profile_experts`) vs plain forward passes over the same batches.

Two behaviour classes (code = corpus:python_docs, prose = corpus:bible_kjv) are tokenized and batched exactly as
`profile_experts` batches them (longest first, right-padded). Then, in the same run, each pass goes over all of them:

- plain forward: `model(input_ids, attention_mask, use_cache=False)`, full logits;
- plain forward, last logits only: the same with `logits_to_keep=1`, which is how `profile_experts` calls the model;
- profile_experts: the whole call (tokenization, router hooks, bookkeeping).

Tokens/s counts the real (non-padding) prompt tokens; each figure is the median of `--repeats` runs after a warm-up,
the passes taking turns.
The model is the upcycled SmolLM2 BTX MoE of the upcycling study when it is cached
(`hf-attn-zoo upcycle-study`; mixture-tuned if it exists), otherwise a random Mixtral
with SmolLM2-135M widths (hidden 576, 9/3 heads, FFN 1536, 4 experts top-2) and `--layers` layers, tokenized with
the packaged SmolLM2 tokenizer.

Usage: python benchmarks/ftri_profile.py [--model DIR] [--layers 6] [--prompts-per-class 8] [--max-length 128]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from _moe import load_moe
from hf_attn_zoo.analysis import expert_profile
from hf_attn_zoo.upcycling.cli import read_prompts


def _load(args):
    return load_moe(args.model, args.layers)


def _median_seconds(passes, repeats: int) -> dict[str, float]:
    """Median wall time of each pass; the passes take turns, so a load change on the machine hits them alike."""
    for _, run in passes:
        run()
    times: dict[str, list[float]] = {name: [] for name, _ in passes}
    for _ in range(repeats):
        for name, run in passes:
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a MoE checkpoint folder (default: the BTX MoE, else random)")
    parser.add_argument("--layers", type=int, default=6, help="layers of the random Mixtral")
    parser.add_argument("--prompts-per-class", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, description = _load(args)
    model.eval()
    sets = {
        "code": read_prompts("corpus:python_docs", count=args.prompts_per_class),
        "prose": read_prompts("corpus:bible_kjv", count=args.prompts_per_class),
    }
    pad_id = expert_profile._pad_id(tokenizer)
    batches = []
    for prompts in sets.values():
        rows = expert_profile._encode(tokenizer, prompts, args.max_length)
        rows.sort(key=lambda row: -len(row[0]))
        for i in range(0, len(rows), args.batch_size):
            input_ids, attention_mask, _ = expert_profile._pad(rows[i : i + args.batch_size], pad_id)
            batches.append((input_ids, attention_mask))
    tokens = sum(int(mask.sum()) for _, mask in batches)
    positions = sum(mask.numel() for _, mask in batches)

    def plain(**kwargs):
        def run():
            with torch.no_grad():
                for input_ids, attention_mask in batches:
                    model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)

        return run

    def profile():
        expert_profile.profile_experts(
            model,
            tokenizer,
            sets,
            target="code",
            batch_size=args.batch_size,
            max_length=args.max_length,
            progress=False,
        )

    passes = [
        ("plain forward (full logits)", plain()),
        ("plain forward (logits_to_keep=1)", plain(logits_to_keep=1)),
        ("profile_experts", profile),
    ]
    seconds = _median_seconds(passes, args.repeats)
    base = seconds[passes[0][0]]
    total = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"model: {description}; {total:.1f}M parameters, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"{len(batches)} batches (batch {args.batch_size}, <= {args.max_length} tokens): {tokens} prompt tokens, "
        f"{positions} positions with padding; median of {args.repeats} after a warm-up\n"
    )
    print("| pass | seconds | prompt tokens/s | throughput vs plain forward |\n|---|---|---|---|")
    for name, _ in passes:
        print(f"| {name} | {seconds[name]:.3f} | {tokens / seconds[name]:.0f} | {base / seconds[name]:.2f}x |")


if __name__ == "__main__":
    main()
