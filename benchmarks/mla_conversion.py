"""MLA conversion of the real SmolLM2: KV-cache bytes and held-out perplexity at several latent ranks, before and
after the quick continue-tuning recipe, against the original model and the dense model tuned on the same tokens.

For each RoPE selection (`norm`: each KV head keeps its `--rope-pairs` pairs with the largest query x key norm,
MHA2MLA; `rorope`: the same budget of principal components of the KV heads' pairs per frequency, TransMLA) and each
rank: the model converted from the weights alone, then calibrated on the recipe's first 8192 training tokens
(`mla_calibrate`: the pairs and the latent refitted on the actual queries, keys and values), then (for
`--tune-ranks`) continue-tuned by `mla/smollm2_quick` (30 steps of 4 x 128 tokens) beside `dense/smollm2_quick` on
the same tokens. Held-out perplexity
on the Python documentation topics tuning never sees (32 blocks of 256 tokens); KV bytes per token from the cache
after a prefill (the latent + the kept RoPE keys, against 2 x KV heads x head_dim). Decode speed at 8k:
`python benchmarks/linear_decode.py --methods "dense (sdpa),mla r128 p4" --lengths 8192`.

Target (issue 17): KV bytes <= 0.4x of the original, perplexity within 5% of the original after the quick recipe.

Usage: python benchmarks/mla_conversion.py [--ranks 64,128,192] [--selections norm,rorope] [--rope-pairs 4]
                                           [--tune-ranks 128] [--json PATH]
       python benchmarks/mla_conversion.py --smoke   (one rank, 2 blocks, 2 tuning steps: checks the script)
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from transformers import DynamicCache

import hf_attn_zoo
from hf_attn_zoo.analysis.perplexity import held_out_nll
from hf_attn_zoo.assets import load_default_model
from hf_attn_zoo.kernels.kv_cache import kv_cache_bytes
from hf_attn_zoo.wrappers import cache_kwargs
from hf_attn_zoo.patches.mla import calibrate
from hf_attn_zoo.tuning import load_recipe, run_recipe
from hf_attn_zoo.tuning.data import build_datasets
from hf_attn_zoo.tuning.init_hooks import _first_blocks
from linearize_ppl import _finished  # benchmarks/ is on the path of a script run from it

CORPUS, RECIPE, DENSE = "python_stdlib_docs", "mla/smollm2_quick", "dense/smollm2_quick"


def _ppl(model, tokenizer, blocks: int) -> float:
    return math.exp(held_out_nll(model.eval(), tokenizer, CORPUS, seq_len=256, max_blocks=blocks).mean().item())


def _kv_bytes_per_token(model, tokenizer) -> float:
    ids = tokenizer("def f(x):\n    return x + 1\n" * 8, return_tensors="pt").input_ids
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
    return kv_cache_bytes(cache) / ids.shape[1]


def _tuned(recipe: str, overrides: list[str], folder: Path) -> Path:
    """The final model of `recipe` run into `folder` (its checkpoints removed, as linearize_ppl does)."""
    return _finished(run_recipe(recipe, [*overrides, f"output_dir={folder}"])).final_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="64,128,192", help="comma-separated latent ranks")
    parser.add_argument("--rope-pairs", type=int, default=4, help="RoPE pairs each KV head keeps")
    parser.add_argument("--selections", default="norm,rorope", help="comma-separated rope_selection values")
    parser.add_argument("--tune-ranks", default="128", help="ranks also continue-tuned by the quick recipe")
    parser.add_argument("--blocks", type=int, default=32, help="held-out blocks of 256 tokens")
    parser.add_argument("--cache", default="runs/mla_conversion", help="tuning run folders (reused by a rerun)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--smoke", action="store_true", help="tiny check: rank 64, 2 blocks, 2 tuning steps")
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    tune = {int(r) for r in args.tune_ranks.split(",") if r}
    overrides, calibration_overrides, blocks, calibration_tokens = [], [], args.blocks, 8192
    if args.smoke:
        ranks, tune, blocks, calibration_tokens = [64], {64}, 2, 256
        overrides = ["train.max_steps=2", "train.save_steps=2", "data.held_out_fraction=0"]
        calibration_overrides = ["init.0.options.tokens=256"]
    cache = Path(args.cache)

    base, tokenizer = load_default_model()
    rows = [{"model": "SmolLM2 (original)", "ppl": _ppl(base, tokenizer, blocks)}]
    original_bytes = _kv_bytes_per_token(base, tokenizer)
    rows[0]["kv_bytes_per_token"] = original_bytes
    train, _ = build_datasets(load_recipe(RECIPE), tokenizer)
    batches = _first_blocks(base, train, calibration_tokens, 8)
    for selection in args.selections.split(","):
        for rank in ranks:
            model, _ = load_default_model()
            hf_attn_zoo.patch(model, "mla", rank=rank, rope_pairs=args.rope_pairs, rope_selection=selection)
            kv = _kv_bytes_per_token(model, tokenizer)
            label = f"mla {selection} r{rank} p{args.rope_pairs}"
            row = {"kv_bytes_per_token": kv, "selection": selection, "rank": rank}
            rows.append({"model": f"{label}, weights only", "ppl": _ppl(model, tokenizer, blocks), **row})
            calibrate(model, batches)
            rows.append({"model": f"{label}, calibrated", "ppl": _ppl(model, tokenizer, blocks), **row})
            del model
            if rank in tune:
                recipe = [
                    *overrides,
                    *calibration_overrides,
                    f"patches.0.rank={rank}",
                    f"patches.0.rope_pairs={args.rope_pairs}",
                    f"patches.0.rope_selection={selection}",
                ]
                final = _tuned(RECIPE, recipe, cache / f"{selection}_r{rank}_p{args.rope_pairs}")
                tuned = hf_attn_zoo.from_pretrained(final)
                rows.append({"model": f"{label}, tuned", "ppl": _ppl(tuned, tokenizer, blocks), **row})
    if tune:
        dense = hf_attn_zoo.from_pretrained(_tuned(DENSE, overrides, cache / "dense"))
        rows.append({"model": "dense, tuned (same tokens)", "ppl": _ppl(dense, tokenizer, blocks)})

    reference = rows[0]["ppl"]
    print(f"\nSmolLM2-135M, held-out perplexity on {CORPUS} ({blocks} x 256 tokens), KV cache per token (fp32)")
    print("\n| model | KV bytes / token | vs original | perplexity | vs original |\n|---|---:|---:|---:|---:|")
    for row in rows:
        kv = row.get("kv_bytes_per_token")
        kv_cells = f"{kv:.0f} | {kv / original_bytes:.2f}x" if kv else " | "
        print(f"| {row['model']} | {kv_cells} | {row['ppl']:.2f} | {row['ppl'] / reference:.3f}x |")
    tuned_rows = [r for r in rows if r["model"].endswith(", tuned") and r["model"].startswith("mla")]
    for row in tuned_rows:
        kv_ok = row["kv_bytes_per_token"] / original_bytes <= 0.4
        ppl_ok = row["ppl"] / reference <= 1.05
        print(
            f"\nTarget (issue 17): {row['model']}: KV {row['kv_bytes_per_token'] / original_bytes:.2f}x "
            f"({'met' if kv_ok else 'not met'}), perplexity {row['ppl'] / reference:.3f}x of the original "
            f"({'met' if ppl_ok else 'not met'})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"blocks": blocks, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
