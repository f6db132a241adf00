"""Upcycling SmolLM2-135M into 4-expert MoEs: build time, peak memory vs output size, forward tokens/s vs dense.

Each build runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own; the RSS of the interpreter with torch
and transformers imported is measured the same way and subtracted. Experts come from the pipeline's specialists
when they are cached (`hf-attn-zoo upcycle-study --stage specialists`), otherwise from copies of the seed (same
tensor traffic). Forward throughput: batch 4 x 256 tokens, median of 5 runs after a warm-up, all models in this run.

Usage: python benchmarks/upcycle_cost.py [--skip-build] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

_CHILD = r"""
import json, resource, sys, time
import torch, transformers, hf_attn_zoo
from hf_attn_zoo.upcycling import upcycle
mode, out, experts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if mode == "imports":
    print(json.dumps({"peak_kib": base})); sys.exit()
start = time.perf_counter()
model = upcycle("default", [] if mode == "sparse" else experts, mode=mode, num_experts=4 if mode == "sparse" else None,
                top_k=1, output_dir=out)
seconds = time.perf_counter() - start
size = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"seconds": seconds, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "output_bytes": size}))
"""


def _experts() -> list[str]:
    from hf_attn_zoo.upcycling.pipeline import pipeline_root

    root = pipeline_root() / "specialists"
    found = [str(p / "final") for p in sorted(root.glob("*")) if (p / "final" / "config.json").is_file()]
    return found[:3] if len(found) >= 3 else ["default"] * 3


def _child(mode: str, out: str, experts: list[str]) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, out, json.dumps(experts)], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@torch.no_grad()
def _tokens_per_second(model: torch.nn.Module, batch: int = 4, seq: int = 256, reps: int = 5) -> float:
    ids = torch.randint(100, 20000, (batch, seq), generator=torch.Generator().manual_seed(0))
    model(ids)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        model(ids)
        times.append(time.perf_counter() - start)
    return batch * seq / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import hf_attn_zoo

    experts = _experts()
    print(
        f"SmolLM2-135M-Instruct seed + {'cached specialists' if experts[0] != 'default' else 'seed copies'} -> "
        f"4 experts, top-1 FFN routing, float32, {args.threads} threads\n"
    )
    # Every build runs before this process loads a model: a child inherits its parent's peak RSS on Linux (kept
    # across fork and exec), so a build started after a model was loaded here would report at least that model.
    imports = _child("imports", "", [])["peak_kib"]
    rows = ["| mode | build s | peak RSS MiB (minus imports) | output MiB | peak / output |", "|---|---|---|---|---|"]
    speed = ["| model | params M | forward tokens/s | vs dense |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        built = {mode: _child(mode, str(Path(tmp) / mode), experts) for mode in ("sparse", "btx", "bam")}
        dense, _ = hf_attn_zoo.assets.load_default_model()
        dense.eval()
        base = _tokens_per_second(dense)
        speed.append(f"| dense seed | {sum(p.numel() for p in dense.parameters()) / 1e6:.0f} | {base:.0f} | 1.00x |")
        del dense
        for mode, r in built.items():
            peak = (r["peak_kib"] - imports) / 1024
            output = r["output_bytes"] / 2**20
            rows.append(f"| {mode} | {r['seconds']:.1f} | {peak:.0f} | {output:.0f} | {peak / output:.2f} |")
            model = hf_attn_zoo.from_pretrained(Path(tmp) / mode).eval()
            tps = _tokens_per_second(model)
            params = sum(p.numel() for p in model.parameters()) / 1e6
            speed.append(f"| {mode} | {params:.0f} | {tps:.0f} | {tps / base:.2f}x |")
            del model
    print("\n".join(rows))
    print()
    print("\n".join(speed))


if __name__ == "__main__":
    main()
