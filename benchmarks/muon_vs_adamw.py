"""Muon vs AdamW on the same tokens: held-out loss after the same number of steps, dense, upcycled-MoE and
MLA-converted SmolLM2.

Both optimizers run the shipped recipes `dense/smollm2_quick` (AdamW) and `dense/smollm2_quick_muon` (Muon on the
hidden matrices, AdamW on embeddings and norms, `match_rms_adamw`, so the same peak learning rate) with the same data
(python_stdlib_docs, 128-token blocks, held-out topics), batch, schedule and seed; only `train.max_steps`,
`optim.lr` and the model change. The MoE is SmolLM2-135M sparse-upcycled (`hf_attn_zoo.upcycling.upcycle`, mode
`sparse`: the MLP of every `--moe-every`-th layer copied into `--experts` experts, top-2, a random router), so its
routers train with AdamW and each expert's matrices with Muon (per expert, on the fused `[E, out, in]` tensors).
The MLA model is SmolLM2 converted by the recipe itself (`mla`, rank 128, 4 RoPE pairs per KV head, calibrated by
`mla_calibrate`, as `mla/smollm2_quick`): its latent projections are plain matrices, so Muon.
MoE on a fifth of the layers keeps the default run at about 15-20 minutes on 2 CPU cores: on a CPU, Muon's
Newton-Schulz iterations (5 x three matmuls per matrix, per expert) cost about as much as the forward and backward
of the batch, so the table reports seconds per optimizer step too. `--layers` keeps only the first decoder layers
(faster, but a cut model mostly relearns the missing layers); `--smoke` runs one layer for 2 steps.

Usage: python benchmarks/muon_vs_adamw.py [--smoke] [--steps 20] [--layers 30] [--experts 4] [--moe-every 5] [--lr 3e-4]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer

import hf_attn_zoo
from hf_attn_zoo.families import resolve_family
from hf_attn_zoo.tuning import run_recipe
from hf_attn_zoo.upcycling import upcycle

RECIPES = {"adamw": "dense/smollm2_quick", "muon": "dense/smollm2_quick_muon"}


def truncated_smollm2(out: Path, layers: int) -> Path:
    """SmolLM2-135M's first `layers` decoder layers (and its embeddings, final norm and tokenizer) saved to `out`."""
    model, tokenizer = hf_attn_zoo.assets.load_default_model(dtype=torch.float32)
    del resolve_family(model.config).decoder_layers(model)[layers:]
    model.config.num_hidden_layers = layers
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = model.config.layer_types[:layers]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def sparse_moe(seed: Path, out: Path, experts: int, layers: list[int]) -> Path:
    """The `seed` sparse-upcycled: the MLP of each of `layers` copied into `experts` experts with a random top-2
    router (the other layers stay dense)."""
    upcycle(str(seed), mode="sparse", num_experts=experts, top_k=2, layers=layers, output_dir=out)
    AutoTokenizer.from_pretrained(seed).save_pretrained(out)
    return out


# the MLA-converted model: SmolLM2 patched and calibrated by the recipe itself (mla/smollm2_quick's conversion)
MLA = [
    "patches=[{method: mla, layers: all, rank: 128, rope_pairs: 4}]",
    "init=[{name: mla_calibrate, options: {tokens: 8192}}]",
]


def train(recipe: str, model: Path, out: Path, args: argparse.Namespace, extra: list[str]) -> dict[str, float]:
    overrides = [
        *extra,
        f"model.path={model}",
        f"output_dir={out}",
        f"train.max_steps={args.steps}",
        f"train.save_steps={args.steps * 10}",
        "train.logging_steps=1",
        f"optim.lr={args.lr}",
        f"optim.min_lr={args.lr / 10}",
        f"optim.warmup_steps={max(1, args.steps // 10)}",
    ]
    if args.smoke:
        overrides += [
            "data.sources=[{corpus: python_stdlib_docs, max_docs: 20}]",
            "data.seq_len=64",
            "train.batch_size=2",
        ]
    result = run_recipe(recipe, overrides=overrides)
    last = [loss for _, loss in result.loss_history[-5:]]
    return {
        "train_loss": sum(last) / len(last),
        "eval_loss": float(result.eval_loss) if result.eval_loss is not None else float("nan"),
        # the optimizer steps alone (Throughput): no loading, evaluation or saving
        "seconds_per_step": result.train_tokens / result.train_tokens_per_second / result.global_step,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run: 1 layer, 2 experts, 2 steps")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layers", type=int, default=30, help="SmolLM2-135M decoder layers kept (of 30)")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--moe-every", type=int, default=5, help="MoE on every n-th layer (0, n, 2n ...)")
    parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate of both optimizers")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--models", default="dense,moe,mla", help="comma-separated subset of dense, moe, mla")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.layers = 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dense = truncated_smollm2(root / "dense", args.layers)
        moe_layers = list(range(0, args.layers, args.moe_every))
        wanted = args.models.split(",")
        moe = sparse_moe(dense, root / "moe", args.experts, moe_layers) if "moe" in wanted else dense
        models = {
            "dense": ("dense", dense, []),
            "moe": (f"MoE: {args.experts} experts top-2 on {len(moe_layers)} of {args.layers} layers", moe, []),
            "mla": ("MLA: rank 128, 4 RoPE pairs per KV head (calibrated)", dense, MLA),
        }
        chosen = [models[key] for key in wanted]
        for index, (label, model, extra) in enumerate(chosen):
            for optimizer, recipe in RECIPES.items():
                metrics = train(recipe, model, root / "runs" / f"{index}-{optimizer}", args, extra)
                rows.append({"model": label, "optimizer": optimizer, **metrics})
    tokens = args.steps * (2 * 64 if args.smoke else 4 * 128)
    print(
        f"\nSmolLM2-135M ({args.layers} of 30 layers), python_stdlib_docs, {args.steps} steps x "
        f"{tokens // args.steps} tokens, peak lr {args.lr}, torch {torch.__version__}, {torch.get_num_threads()} "
        "thread(s)\n"
    )
    print("| model | optimizer | train loss (last 5 steps) | held-out loss | s / step |\n|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['model']} | {row['optimizer']} | {row['train_loss']:.3f} | {row['eval_loss']:.3f} | "
            f"{row['seconds_per_step']:.2f} |"
        )
    return rows


if __name__ == "__main__":
    main()
