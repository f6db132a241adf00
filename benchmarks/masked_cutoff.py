"""Where `sparse_attention`'s `auto` should stop running one masked SDPA call: masked vs gathered blocks per length.

`auto` runs the `masked` backend (one SDPA call with the pattern as a boolean mask) up to `MASKED_MAX_PAIRS_CPU`
query x key pairs on CPU, and the `blocks` backend past it. This prints, for a few patterns and lengths, the time of
both backends on one attention call (SmolLM2's shapes: 9 query / 3 KV heads, head dim 64, batch 1, fp32, forward
only), as `blocks / masked` from the same run: below 1 the blocks win, so the cutoff belongs below that length.

Usage: python benchmarks/masked_cutoff.py [--lengths 128,256,512,1024,2048] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from hf_attn_zoo.kernels.sparse_attention import MASKED_MAX_PAIRS_CPU, AttentionPattern, sparse_attention
from hf_attn_zoo.patches.power_attention import PowerPattern
from hf_attn_zoo.patches.sliding_window import SinkWindowPattern

PATTERNS: dict[str, AttentionPattern] = {
    "sliding window 64": SinkWindowPattern(64, 0),
    "sliding window 256 + 4 sinks": SinkWindowPattern(256, 4),
    "sliding window 1024 + 4 sinks": SinkWindowPattern(1024, 4),
    "power_attention 64 x 4": PowerPattern(64, 4, 1),
    "power_attention 256 x 5": PowerPattern(256, 5, 1),
}


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: builds and caches the blocks plan, as the first layer of a forward does
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="128,256,512,1024,2048", help="comma-separated sequence lengths")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per backend (the median is reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    side = int(MASKED_MAX_PAIRS_CPU**0.5)
    print(f"auto runs masked up to {side} x {side} pairs on CPU; {args.threads} threads, fp32, batch 1\n")
    print("| pattern | length | masked ms | blocks ms | blocks / masked |\n|---|---|---|---|---|")
    for length in (int(n) for n in args.lengths.split(",")):
        q, k, v = torch.randn(1, 9, length, 64), torch.randn(1, 3, length, 64), torch.randn(1, 3, length, 64)
        for name, pattern in PATTERNS.items():
            seconds = {
                backend: _median_seconds(
                    lambda b=backend: sparse_attention(q, k, v, pattern, scaling=0.125, backend=b), args.repeats
                )
                for backend in ("masked", "blocks")
            }
            ratio = seconds["blocks"] / seconds["masked"]
            print(
                f"| {name} | {length} | {seconds['masked'] * 1e3:.1f} | {seconds['blocks'] * 1e3:.1f} | {ratio:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
