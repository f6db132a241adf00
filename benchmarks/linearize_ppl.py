"""Held-out perplexity of SmolLM2 linearized with each feature map, all layers and half the layers, against the dense
model tuned on the same tokens: does NaLaFormer's norm-aware map beat the others, as its paper claims?

Every variant runs the shipped two-stage quick recipes with overrides (`linearize/smollm2_stage1_quick`: attention
transfer, the model frozen, only the feature projections and window weights train; then
`linearize/smollm2_stage2_quick`: LoRA on q/k/v/o with the next-token loss), changing only the feature map, the
window, the layers (`all`, or `every_2nd`: softmax kept in every other layer) and where RoPE goes (`features`, the
default: NaLaFormer's placement, relative scores; `inputs`: LoLCATs', the map reads the rotated q/k). The baseline is
`dense/smollm2_quick`: the unpatched model tuned with every weight on the same token stream and steps as stage 2 (the
same `_base`); stage 1 trains no weight of the model. Each model is scored on the same `--blocks` blocks of 256
held-out tokens of the recipes' corpus (documents no run trains on); the ratio to dense is `exp(mean d)` of the
paired per-block NLL differences `d`, with its standard error. Runs are cached in `--cache` (a rerun only does what
is missing). Target (issue 16): every layer linearized within 1.25x of the dense model's perplexity.

Usage: python benchmarks/linearize_ppl.py [--variants nala:all:features,hedgehog:every_2nd:inputs,...] [--blocks 32]
                                          [--cache runs/linearize_ppl] [--json PATH] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch

import hf_attn_zoo
from hf_attn_zoo.analysis.perplexity import held_out_nll
from hf_attn_zoo.assets import load_default_model
from hf_attn_zoo.studies.moh import gap_to_dense
from hf_attn_zoo.tuning import run_recipe

CORPUS = "python_stdlib_docs"  # the quick recipes' corpus (its held-out documents are never trained on)
STAGE1, STAGE2, DENSE = "linearize/smollm2_stage1_quick", "linearize/smollm2_stage2_quick", "dense/smollm2_quick"
# every map on every layer and on every other layer, RoPE on the features; and each map with LoLCATs' placement
VARIANTS = [f"{m}:{layers}:features" for layers in ("all", "every_2nd") for m in ("nala", "hedgehog", "elu", "relu")]
VARIANTS += [f"{m}:all:inputs" for m in ("nala", "hedgehog")]


def _finished(result):
    """A finished run keeps only its `final/` model (its checkpoints would take about 1 GB each)."""
    for checkpoint in result.output_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    return result


def _score(path: Path, tokenizer, blocks: int) -> torch.Tensor:
    model = hf_attn_zoo.from_pretrained(path).eval()
    return held_out_nll(model, tokenizer, CORPUS, seq_len=256, max_blocks=blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated map:layers:rope")
    parser.add_argument("--window", type=int, default=64, help="softmax window of every variant (LoLCATs: 64)")
    parser.add_argument("--blocks", type=int, default=32, help="held-out blocks of 256 tokens")
    parser.add_argument("--cache", default="runs/linearize_ppl", help="run folders (reused by a rerun)")
    parser.add_argument("--set", nargs="*", default=[], help="recipe overrides for every run, e.g. train.max_steps=4")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--smoke", action="store_true", help="tiny check: 2 steps per stage, 2 blocks, one variant")
    args = parser.parse_args()
    variants = [tuple(v.split(":")) for v in args.variants.split(",")]
    overrides, blocks = list(args.set), args.blocks
    if args.smoke:
        variants, blocks = variants[:1], 2
        overrides += ["train.max_steps=2", "train.save_steps=2", "data.held_out_fraction=0"]
    cache = Path(args.cache)
    _, tokenizer = load_default_model()

    dense_run = _finished(run_recipe(DENSE, [*overrides, f"output_dir={cache / 'dense'}"]))
    scores = {"dense tuned": _score(dense_run.final_dir, tokenizer, blocks)}
    base, _ = load_default_model()
    scores["base (untuned)"] = held_out_nll(base.eval(), tokenizer, CORPUS, seq_len=256, max_blocks=blocks)
    stage1_scores = {}
    for name, layers, rope in variants:
        label = f"{name} / {layers} / rope on {rope}"
        folder = cache / f"{name}_{layers}_{rope}_w{args.window}"
        patch = [f"patches.0.{k}={v}" for k, v in (("feature_map", name), ("layers", layers), ("rope", rope))]
        first = _finished(
            run_recipe(STAGE1, [*overrides, *patch, f"patches.0.window={args.window}", f"output_dir={folder}/s1"])
        )
        stage1_scores[label] = _score(first.final_dir, tokenizer, blocks)
        second = _finished(run_recipe(STAGE2, [*overrides, f"model.path={first.final_dir}", f"output_dir={folder}/s2"]))
        scores[label] = _score(second.final_dir, tokenizer, blocks)

    dense = scores["dense tuned"]
    rows = []
    print(f"\nHeld-out perplexity, {CORPUS}, {blocks} x 256 tokens; ratio to the dense model tuned on the same tokens")
    print("\n| model | after stage 1 | after stage 2 | ratio to dense (± SE) |\n|---|---:|---:|---:|")
    for label, nll in scores.items():
        gap, se = gap_to_dense(nll.tolist(), dense.tolist())  # the paired per-block estimate moh-study reports
        ratio = 1 + gap
        stage1 = stage1_scores.get(label)
        first = f"{math.exp(stage1.mean().item()):.2f}" if stage1 is not None else ""
        print(f"| {label} | {first} | {math.exp(nll.mean().item()):.2f} | {ratio:.3f} ± {se:.3f} |")
        rows.append(
            {
                "model": label,
                "ppl": math.exp(nll.mean().item()),
                "ppl_after_stage1": math.exp(stage1.mean().item()) if stage1 is not None else None,
                "ratio_to_dense": ratio,
                "ratio_se": se,
            }
        )
    every = [r for r in rows if "/ all /" in r["model"]]
    if every:
        best = min(every, key=lambda r: r["ratio_to_dense"])
        verdict = "met" if best["ratio_to_dense"] <= 1.25 else "not met"
        print(
            f"\nTarget (issue 16): every layer linearized within 1.25x of dense: best {best['model']} "
            f"{best['ratio_to_dense']:.3f}x ({verdict})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"blocks": blocks, "window": args.window, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
