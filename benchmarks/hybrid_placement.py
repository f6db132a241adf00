"""Hybrid placements: where should a model keep its standard softmax layers when the others run a relaxed method?

"Deconstructing Attention" (arXiv 2510.11602) finds that relaxed attention variants which fail in every layer work
once some layers keep standard attention. This benchmark patches the embedded SmolLM2-135M with one method
(`--method`, default: a 32-token sliding window without sinks, i.e. purely local token mixing) on every layer *except*
a placement of standard layers, with `hf_attn_zoo.patch_plan` and the `except_*` layer selectors, training-free:

- `none` (the method everywhere), `every_2nd` / `every_3rd` / `every_5th` / `every_10th` (softmax kept in every N-th
  layer: layers N-1, 2N-1, ...);
- `first_6`, `middle_6`, `last_6`: the same count as `every_5th` (6 of 30), in one contiguous run, so the table
  separates *how many* standard layers from *where* they sit.

With `--recipe NAME` each placement is continue-tuned instead, by the recipe with its first patch's `layers` set to
the placement's complement (e.g. `linearize/smollm2_stage1_quick`: Hedgehog linear attention + a softmax window,
attention transfer; `--method`/`--set` are then ignored, the recipe's patch is used), runs cached in `--out`.

Each model is scored on the same `--blocks` blocks of `--seq-len` held-out tokens; the gap to the unpatched model is
`exp(mean d) - 1` of the paired per-block NLL differences `d`, with its standard error. Prints a Markdown table and
writes JSON and a plot (perplexity against the number of softmax layers).

Usage: python benchmarks/hybrid_placement.py [--method sliding_window] [--set window=32 sinks=0] [--blocks 16]
                                             [--seq-len 512] [--placements none,every_2nd,...] [--out DIR]
                                             [--recipe NAME [--recipe-set k=v ...]] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


import hf_attn_zoo
from hf_attn_zoo.analysis.perplexity import held_out_nll
from hf_attn_zoo.assets import load_default_model
from hf_attn_zoo.cli_args import parse_options
from hf_attn_zoo.families import resolve_family
from hf_attn_zoo.layers import resolve_layers
from hf_attn_zoo.studies.moh import gap_to_dense

CORPUS = "python_stdlib_docs"
PLACEMENTS = ["none", "every_10th", "every_5th", "every_3rd", "every_2nd", "first_6", "middle_6", "last_6"]


def softmax_layers(placement: str, num_layers: int) -> list[int]:
    """The layers that keep standard attention under `placement`."""
    if placement == "none":
        return []
    if placement.startswith(("first_", "middle_", "last_")):
        where, count = placement.rsplit("_", 1)
        n = int(count)
        start = {"first": 0, "middle": (num_layers - n) // 2, "last": num_layers - n}[where]
        return list(range(start, start + n))
    return resolve_layers(placement, num_layers)


def relaxed_layers(placement: str, num_layers: int) -> str | list[int]:
    """The layers the method patches: an `except_*` selector where one exists, else the explicit complement."""
    if placement == "none":
        return "all"
    if placement.startswith("every_"):
        return f"except_{placement}"
    kept = set(softmax_layers(placement, num_layers))
    return [index for index in range(num_layers) if index not in kept]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="sliding_window", help="the relaxed method on the non-standard layers")
    parser.add_argument("--set", nargs="*", default=["window=32", "sinks=0"], help="the method's options, key=value")
    parser.add_argument("--placements", default=",".join(PLACEMENTS), help="comma-separated placements")
    parser.add_argument("--blocks", type=int, default=16, help="held-out blocks")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per block")
    parser.add_argument("--out", default="runs/hybrid_placement", help="JSON, plot and tuned runs folder")
    parser.add_argument("--recipe", default=None, help="tune each placement with this recipe (its first patch)")
    parser.add_argument("--recipe-set", nargs="*", default=[], help="overrides for every tuning run")
    parser.add_argument("--smoke", action="store_true", help="2 blocks of 64 tokens, 3 placements (a quick check)")
    args = parser.parse_args()
    placements = args.placements.split(",")
    if args.smoke:
        args.blocks, args.seq_len, placements = 2, 64, ["none", "every_2nd", "first_6"]
        args.recipe_set += ["train.max_steps=2", "train.save_steps=2", "data.held_out_fraction=0"]
    options = parse_options(args.set)

    model, tokenizer = load_default_model()
    num_layers = len(resolve_family(model.config).decoder_layers(model))
    dense = held_out_nll(model, tokenizer, CORPUS, seq_len=args.seq_len, max_blocks=args.blocks).tolist()
    rows = []
    out = Path(args.out)
    for placement in placements:
        layers = relaxed_layers(placement, num_layers)
        if args.recipe:
            nll = _tuned_nll(args.recipe, [*args.recipe_set, f"patches.0.layers={json.dumps(layers)}"], out / placement)
            nll = nll(tokenizer, args.seq_len, args.blocks)
        else:
            hf_attn_zoo.patch_plan(model, [{"method": args.method, "layers": layers, **options}])
            try:
                nll = held_out_nll(model, tokenizer, CORPUS, seq_len=args.seq_len, max_blocks=args.blocks).tolist()
            finally:
                hf_attn_zoo.unpatch(model)
        gap, se = gap_to_dense(nll, dense)
        kept = softmax_layers(placement, num_layers)
        rows.append({"placement": placement, "softmax_layers": kept, "ppl": math.exp(sum(nll) / len(nll))})
        rows[-1].update(gap=gap, se=se)
        print(f"{placement}: softmax in {len(kept)} layers, gap {gap:+.1%} ± {se:.1%}", flush=True)

    dense_ppl = math.exp(sum(dense) / len(dense))
    described = f"{args.recipe} (tuned)" if args.recipe else f"{args.method} ({' '.join(args.set)}), training-free"
    print(f"\n{described} on every layer but the standard ones; SmolLM2-135M, ")
    print(f"{args.blocks} x {args.seq_len} held-out tokens of {CORPUS}; unpatched ppl {dense_ppl:.2f}\n")
    print("| placement | softmax layers | ppl | gap to unpatched |\n|---|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['placement']} | {len(row['softmax_layers'])} | {row['ppl']:.2f} | "
            f"{row['gap']:+.1%} ± {row['se']:.1%} |"
        )
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "method": args.recipe or args.method,
        "options": args.recipe_set if args.recipe else options,
        "blocks": args.blocks,
        "seq_len": args.seq_len,
        "dense_ppl": dense_ppl,
        "rows": rows,
    }
    (out / "hybrid_placement.json").write_text(json.dumps(result, indent=2))
    print(
        f"\nwrote {out / 'hybrid_placement.json'} and {plot(rows, dense_ppl, described, out / 'hybrid_placement.png')}"
    )


def _tuned_nll(recipe: str, overrides: list[str], folder: Path):
    """Tune (or reuse the cached run in `folder`) and return a scorer of its final model; checkpoints are dropped."""
    import shutil

    from hf_attn_zoo.tuning import run_recipe

    final = folder / "final"
    if not (final / "config.json").is_file():
        result = run_recipe(recipe, [*overrides, f"output_dir={folder}"])
        for checkpoint in result.output_dir.glob("checkpoint-*"):
            shutil.rmtree(checkpoint)
        final = result.final_dir

    def score(tokenizer, seq_len: int, blocks: int) -> list[float]:
        tuned = hf_attn_zoo.from_pretrained(final).eval()
        return held_out_nll(tuned, tokenizer, CORPUS, seq_len=seq_len, max_blocks=blocks).tolist()

    return score


def plot(rows: list[dict], dense_ppl: float, described: str, path: Path) -> Path:
    """Perplexity of each placement (bars with their standard error), spread and contiguous placements apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 0.9 + 0.42 * len(rows)))
    for index, row in enumerate(rows):
        contiguous = row["placement"].startswith(("first_", "middle_", "last_"))
        ax.barh(
            index,
            row["ppl"],
            xerr=row["ppl"] * row["se"] / (1 + row["gap"]),
            color="tab:orange" if contiguous else "tab:blue",
            capsize=3,
        )
    labels = [f"{r['placement']} ({len(r['softmax_layers'])})" for r in rows]
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.axvline(dense_ppl, color="gray", linestyle="--", label=f"unpatched ({dense_ppl:.2f})")
    ax.set_xlabel("held-out perplexity")
    ax.set_ylabel("softmax layers kept (count)")
    ax.set_title(f"Hybrid placements: softmax kept in some layers,\n{described} in the others", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
