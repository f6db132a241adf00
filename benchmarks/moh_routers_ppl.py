"""Held-out perplexity of SmolLM2-135M with MoH routers and no language-model training, vs dense in the same run.

Every router keeps 7 of the 9 heads per token (6 of 9 for KV-group routing); learned routers are first fitted to the
output-norm head ranking on training text (`distill_router`). Text: held-out documents of a corpus (never trained on).

Usage: python benchmarks/moh_routers_ppl.py [--corpus python_stdlib_docs] [--blocks 4] [--seq 256]
"""

from __future__ import annotations

import argparse

import torch

import hf_attn_zoo
from hf_attn_zoo.assets.corpora import corpus_texts, held_out_texts
from hf_attn_zoo.patches.moh import distill_router

VARIANTS = [
    ("output norm, 0 shared + top-7", {"router": "onorm", "shared_heads": 0, "top_k": 7}),
    ("output norm, 3 shared + top-4", {"router": "onorm", "shared_heads": 3, "top_k": 4}),
    ("query norm (MoH-LLaMA3), 4 shared + top-3", {"router": "qnorm", "shared_heads": 4, "top_k": 3}),
    ("query norm, 0 shared + top-7", {"router": "qnorm", "shared_heads": 0, "top_k": 7}),
    (
        "learned (distilled), 4 shared + top-3, binary",
        {"router": "learned", "shared_heads": 4, "top_k": 3, "gate": "binary"},
    ),
    (
        "learned (distilled), 4 shared + top-3, weighted",
        {"router": "learned", "shared_heads": 4, "top_k": 3, "gate": "weighted"},
    ),
    (
        "learned (distilled), KV groups 1 shared + top-1",
        {"router": "learned", "granularity": "group", "gate": "binary"},
    ),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="python_stdlib_docs")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    model, tokenizer = hf_attn_zoo.assets.load_default_model()
    model.eval()
    text = "\n\n".join(held_out_texts(args.corpus))
    ids = tokenizer(text, return_tensors="pt").input_ids[0][: args.blocks * args.seq].view(args.blocks, args.seq)
    train = tokenizer("\n\n".join(corpus_texts(args.corpus)), return_tensors="pt").input_ids[0][:4096]
    batches = [{"input_ids": chunk} for chunk in train.view(-1, 128).split(8)]

    def perplexity() -> float:
        with torch.no_grad():
            return torch.exp(model(ids, labels=ids).loss).item()

    dense = perplexity()
    rows = [
        "| router | active heads | perplexity | vs dense |",
        "|---|---|---|---|",
        f"| dense | 9/9 | {dense:.2f} | 1.00x |",
    ]
    for label, options in VARIANTS:
        hf_attn_zoo.patch(model, "moh", **options)
        if options["router"] == "learned":
            distill_router(model, batches, steps=200)
        hf_attn_zoo.analysis.reset_head_usage(model)
        ppl = perplexity()
        active = hf_attn_zoo.analysis.head_usage(model)["mean_active_fraction"] * 9
        rows.append(f"| {label} | {active:.0f}/9 | {ppl:.2f} | {ppl / dense:.2f}x |")
        hf_attn_zoo.unpatch(model)
    print(f"SmolLM2-135M, {args.blocks} x {args.seq} held-out tokens of {args.corpus}, no training\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
