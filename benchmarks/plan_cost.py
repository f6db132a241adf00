"""Cost of planning: build LLaMA-3-8B on the meta device and patch it with every method; time and memory.

For each method: the wall time of building the unpatched and the patched model on meta and applying the patch
(`hf_attn_zoo.planning.models.build_plan_models`, what `hf-attn-zoo plan` runs), the growth of the process RSS and
of its peak RSS, and the bytes of tensors left outside the meta device. The target: under 2 s per method and an RSS
growth near zero, against the 29.9 GiB the model's fp32 weights would take. `mote` patches MoE routers, so it runs
on Mixtral-8x7B; `upcycle` is LLaMA-3-8B upcycled into a 4-expert BAM MoE.

Usage: python benchmarks/plan_cost.py [--model llama3-8b]
"""

from __future__ import annotations

import argparse
import gc
import resource
import time

import torch

import hf_attn_zoo
from hf_attn_zoo.planning.models import build_plan_models, load_config

CASES = {  # method -> (model, options); the defaults of each method otherwise
    "none": (None, {}),
    "bam": (None, {"num_experts": 2}),
    "mote": ("mixtral-8x7b", {"off": {"all": [0]}}),
    "upcycle": (None, {"mode": "bam", "num_experts": 4}),
}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b", help="a shipped config, folder or hub id")
    args = parser.parse_args()
    config, _ = load_config(args.model)
    build_plan_models(config, "moh", {})  # warm-up: lazy imports, first-call caches
    methods = ["none", *sorted(hf_attn_zoo.PATCHES), "upcycle"]
    fp32 = None
    rows = [
        "| method | model | build + patch s | RSS growth MiB | peak RSS growth MiB | non-meta tensors MiB | "
        "parameters |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        model_name, options = CASES.get(method, (None, {}))
        model_name = model_name or args.model
        case_config = config if model_name == args.model else load_config(model_name)[0]
        gc.collect()
        rss, peak = _rss_mib(), _peak_mib()
        started = time.perf_counter()
        try:
            built = build_plan_models(case_config, method, dict(options))
        except Exception as error:  # report and go on: a patch that is not meta-safe yet
            rows.append(f"| {method} | {model_name} | failed: {type(error).__name__}: {str(error)[:120]} | | | | |")
            continue
        elapsed = time.perf_counter() - started
        growth, peak_growth = _rss_mib() - rss, _peak_mib() - peak
        params = sum(p.numel() for p in built.after.parameters())
        if method == "none":
            fp32 = params * 4 / 2**30
        non_meta = sum(built.non_meta.values()) / 2**20
        rows.append(
            f"| {method} | {model_name} | {elapsed:.3f} | {growth:.1f} | {peak_growth:.1f} | {non_meta:.1f} | "
            f"{params / 1e9:.2f}B |"
        )
        del built
    print(f"{args.model} on the meta device, torch {torch.__version__}; its fp32 weights would take {fp32:.1f} GiB\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
