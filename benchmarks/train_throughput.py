"""Training throughput of the MoH quick recipe vs its same-data dense baseline, as a ratio measured in one run.

Both recipes train every weight of SmolLM2-135M on the same data, batch and optimizer; they are run alternately
(dense, MoH, dense, MoH ...) so that load on the machine hits both alike, and the median tokens/s is reported.

Usage: python benchmarks/train_throughput.py [--steps 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from hf_attn_zoo.tuning import run_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    speeds: dict[str, list[float]] = {"dense/smollm2_quick": [], "moh/smollm2_quick": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for recipe in speeds:
                result = run_recipe(
                    recipe,
                    overrides=[
                        f"output_dir={tmp}/{recipe}-{round_}",
                        f"train.max_steps={args.steps}",
                        f"train.save_steps={args.steps * 10}",
                        "eval=null",
                        "init=[]",
                        "data.held_out_fraction=0",
                    ],
                )
                speeds[recipe].append(result.train_tokens_per_second)
    dense, moh = (statistics.median(v) for v in speeds.values())
    print(
        f"\nSmolLM2-135M, every weight trained, {args.steps} steps x {args.rounds} rounds, torch {torch.__version__}\n"
    )
    print("| recipe | train tokens/s (median) | vs dense |\n|---|---|---|")
    print(f"| dense/smollm2_quick | {dense:.0f} | 1.00x |")
    print(f"| moh/smollm2_quick | {moh:.0f} | {moh / dense:.2f}x |")


if __name__ == "__main__":
    main()
