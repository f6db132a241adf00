"""Graph-of-tokens routing (arXiv:2505.00792) on a real MoE: routing entropy, flip rate and held-out perplexity of
the original routing, Similarity-Aware and Attention-Aware routing, training-free and after router-only tuning.

Model: the upcycled SmolLM2 BTX MoE of the upcycling study (30 MoE layers x 4 experts, top-1): `tuned/btx/final`
when it exists, else the untuned `moe/btx` (`hf_attn_zoo.upcycling.pipeline.moe_checkpoint("btx", tuned=False)`
builds it), or `--model DIR`; with none cached, a random Mixtral of SmolLM2's widths (`benchmarks/_moe.py`).

Variants: `original` (no patch); `similarity` (`graph_routing mode=similarity`, fixed cosine similarity,
`--strength`, `--temperature`); `attention` (`mode=attention`, the layer's head-averaged attention probabilities,
`--strength`). Each is measured training-free, then after router-only tuning (`+ tuned`): the routers' weights of
every MoE layer (nothing else; the original routing gets the same tuning, so the baseline sees the same tokens)
trained with AdamW (`--lr`, constant) for `--steps` steps of `--batch` x `--seq-len` tokens of the training split
of python_docs, bible_kjv and shakespeare (the same blocks, in the same order, for every variant). The shipped
recipe `graph_routing/smollm2_moe_quick` does the same through `hf-attn-zoo tune` (routers at the full lr, experts
at lr x 0.001, since the recipe schema has no router-only selection).

Metrics (`hf_attn_zoo.analysis.routing_stability`, on `--stability-blocks` held-out blocks of python_docs,
bible_kjv and shakespeare): gate entropy (mean per-token entropy of the distribution the top-k acts on: the mixed
one for graph routing), expert-selection entropy (of the experts' share of all selections; log 4 = 1.386 is an even
load), flip rate (fraction of top-k selections that change under Gaussian noise of `--noise` x RMS on the input
embeddings); mean over the MoE layers. Held-out perplexity (`held_out_nll`) on the first `--blocks` blocks of
`--seq-len` tokens of each of the three corpora, and their mean NLL as one perplexity.

Writes the results as JSON (`--out`) and the per-layer stability plot next to it (PNG).

Usage: OMP_NUM_THREADS=1 python benchmarks/graph_routing.py [--model DIR] [--steps 20] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

import hf_attn_zoo
from hf_attn_zoo.analysis.perplexity import held_out_nll
from hf_attn_zoo.analysis.routing_stability import held_out_batches, plot_routing_stability, routing_stability
from hf_attn_zoo.assets.corpora import corpus_texts
from hf_attn_zoo.moe.overrides import routing_target

from _moe import load_moe  # noqa: I001  (benchmarks/ is on sys.path when run as a script)

DOMAINS = ("python_docs", "bible_kjv", "shakespeare")


def _train_blocks(tokenizer, seq_len: int, count: int, seed: int) -> list[torch.Tensor]:
    """`count` blocks of `seq_len` training tokens, taken in turn from each domain, then shuffled (fixed seed)."""
    blocks = []
    for domain in DOMAINS:
        text = "\n\n".join(corpus_texts(domain, split="train")[:400])
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
        per = -(-count // len(DOMAINS))
        usable = ids[: (ids.numel() // seq_len) * seq_len].view(-1, seq_len)
        picks = random.Random(f"{seed}-{domain}").sample(range(usable.shape[0]), min(per, usable.shape[0]))
        blocks += [usable[i] for i in picks]
    random.Random(seed).shuffle(blocks)
    return blocks[:count]


def _tune_routers(model, blocks: list[torch.Tensor], batch: int, lr: float) -> float:
    """Router-only tuning: AdamW on every MoE router's weight; returns the wall time."""
    target = routing_target(model)
    routers = [p for router in target.routers.values() for p in router.parameters()]
    for param in model.parameters():
        param.requires_grad_(False)
    for param in routers:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(routers, lr=lr, weight_decay=0.0)
    model.train()
    started = time.perf_counter()
    for start in range(0, len(blocks), batch):
        ids = torch.stack(blocks[start : start + batch])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(routers, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return time.perf_counter() - started


def _measure(model, tokenizer, args, stability_batches) -> dict:
    nll = {d: held_out_nll(model, tokenizer, d, args.seq_len, args.blocks, args.blocks) for d in DOMAINS}
    stability = routing_stability(model, stability_batches, scale=args.noise)
    return {
        "ppl": {d: math.exp(v.mean().item()) for d, v in nll.items()},
        "ppl_mean": math.exp(torch.cat(list(nll.values())).mean().item()),
        "stability": stability,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a MoE folder (default: the study's BTX MoE)")
    parser.add_argument("--layers", type=int, default=4, help="layers of the random fallback Mixtral")
    parser.add_argument("--strength", type=float, default=0.5, help="graph_routing strength a")
    parser.add_argument("--temperature", type=float, default=0.1, help="similarity mode temperature")
    parser.add_argument("--steps", type=int, default=20, help="router-tuning steps")
    parser.add_argument("--batch", type=int, default=4, help="blocks per tuning step")
    parser.add_argument("--lr", type=float, default=1e-2, help="router-tuning learning rate (AdamW, constant)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=4, help="held-out perplexity blocks per corpus")
    parser.add_argument("--stability-blocks", type=int, default=2, help="held-out stability blocks per corpus")
    parser.add_argument("--noise", type=float, default=0.05, help="flip-rate noise, relative to the embedding RMS")
    parser.add_argument("--out", type=Path, default=Path("graph_routing.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    base, tokenizer, description = load_moe(args.model, args.layers)
    base.eval()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    stability_batches = [
        b for d in DOMAINS for b in held_out_batches(tokenizer, d, args.seq_len, args.stability_blocks, batch_size=8)
    ]
    train = _train_blocks(tokenizer, args.seq_len, args.steps * args.batch, seed=0)
    variants = {
        "original": None,
        "similarity": {"mode": "similarity", "strength": args.strength, "temperature": args.temperature},
        "attention": {"mode": "attention", "strength": args.strength},
    }
    results: dict[str, dict] = {}
    started = time.perf_counter()
    for name, options in variants.items():
        for tuned in (False, True):
            base.load_state_dict(state)
            model = base if options is None else hf_attn_zoo.patch(base, "graph_routing", **options)
            label = f"{name} + tuned" if tuned else name
            seconds = _tune_routers(model, train, args.batch, args.lr) if tuned else 0.0
            with torch.no_grad():
                results[label] = {
                    "options": options,
                    "tuning_seconds": seconds,
                    **_measure(model, tokenizer, args, stability_batches),
                }
            if options is not None:
                hf_attn_zoo.unpatch(model)
            print(f"{label}: done ({time.perf_counter() - started:.0f} s)", flush=True)
    base.load_state_dict(state)
    tokens = args.steps * args.batch * args.seq_len
    print(
        f"\nmodel: {description}; router tuning: {args.steps} steps x {args.batch} x {args.seq_len} = {tokens} "
        f"tokens, lr {args.lr}; strength {args.strength}, temperature {args.temperature}; flip noise {args.noise}\n"
    )
    print(
        "| routing | ppl python_docs | ppl bible_kjv | ppl shakespeare | ppl (all) | gate entropy | "
        "selection entropy | flip rate |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, r in results.items():
        s = r["stability"]["mean"]
        ppl = r["ppl"]
        print(
            f"| {label} | {ppl['python_docs']:.2f} | {ppl['bible_kjv']:.2f} | {ppl['shakespeare']:.2f} | "
            f"{r['ppl_mean']:.2f} | {s['gate_entropy']:.3f} | {s['selection_entropy']:.3f} | {s['flip_rate']:.4f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.write_text(
        json.dumps({"model": description, "settings": settings, "tuning_tokens": tokens, "results": results}, indent=2)
        + "\n"
    )
    plot = plot_routing_stability(
        {label: r["stability"] for label, r in results.items()}, args.out.with_suffix(".png"), "graph routing"
    )
    print(f"\nwrote {args.out} and {plot} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
