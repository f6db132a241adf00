"""Cost of patching SmolLM2-135M: wall time, memory growth vs the new parameters, and proof that no weight moved.

Usage: python benchmarks/patch_cost.py
"""

from __future__ import annotations

import gc
import resource
import time

import torch

import hf_attn_zoo


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    model, _ = hf_attn_zoo.assets.load_default_model()
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    rows = [
        "| variant | patch time s | RSS growth MiB | new parameters MiB | weights copied |",
        "|---|---|---|---|---|",
    ]
    for label, options in (
        ("learned router (defaults)", {}),
        ("query-norm router", {"router": "qnorm"}),
        ("output-norm router", {"router": "onorm"}),
        ("learned, group routing", {"granularity": "group"}),
    ):
        gc.collect()
        before = _rss_mib()
        start = time.perf_counter()
        hf_attn_zoo.patch(model, "moh", **options)
        elapsed = time.perf_counter() - start
        growth = _rss_mib() - before
        new = sum(p.numel() * p.element_size() for p in hf_attn_zoo.new_parameters(model).values()) / 2**20
        moved = sum(1 for name, p in model.named_parameters() if name in pointers and p.data_ptr() != pointers[name])
        rows.append(f"| {label} | {elapsed:.3f} | {growth:.2f} | {new:.2f} | {moved} |")
        hf_attn_zoo.unpatch(model)
    print(
        f"SmolLM2-135M, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, torch {torch.__version__}\n"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
