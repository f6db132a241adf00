"""Prefill attention time of each sparse-attention method vs dense SDPA (causal), as ratios from one run.

One attention call with SmolLM2's shapes (9 query heads, 3 KV heads, head dim 64, batch 1, fp32) at 4k, 8k and 16k
tokens, forward only (`torch.no_grad`), each method through the kernel its patch runs in inference (`backend="auto"`:
on CPU the gathered-blocks kernel for the static patterns), and the static patterns also through compiled
FlexAttention (`(flex)`). Compilation, BlockMask and gather-plan building happen in an untimed warm-up call (they are
cached per shape and reused by every layer); the table reports the median of the timed calls and
`speedup = SDPA time / method time`.

The linear-attention rows (`nalaformer`: nala map, pure linear, window 0; `linearize hedgehog w64`: hedgehog map with
an exact softmax window over the 64 most recent keys, LoLCATs' hybrid) time what a patched layer runs in inference
with its defaults (`rope="features"`, learned projection, `chunk=64`): undoing RoPE on the (rotated) q and k, the
per-head projection (identity at patch time, still an einsum), the feature map, RoPE on each feature block for the
numerator (the un-rotated features are the normaliser's, a second tensor), then `hybrid_attention(..., chunk=64)`.
The RoPE cos/sin tables are built once per length, untimed (the model builds them once per forward for all layers).

The Combiner rows (`combiner fixed`, `combiner logsparse`: 64-token blocks, max pooling, one direct block) time
`combiner_attention`, the blockwise kernel a patched layer runs (fp32 logits; no target in the issue).

Targets (CPU, 16k): issue 5: sliding window 1024 + sinks >= 4.5x, PowerAttention >= 4x, MoBA > 1x; issue 16
(linear attention retrofits): prefill >= 3x SDPA for both linear rows.

Usage: python benchmarks/sparse_prefill.py [--lengths 4096,8192,16384] [--repeats 3] [--threads N]
       [--methods "sliding_window,nalaformer,linearize hedgehog w64"]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from hf_attn_zoo.kernels.sparse_attention import sparse_attention
from hf_attn_zoo.patches.power_attention import PowerPattern
from hf_attn_zoo.patches.sliding_window import SinkWindowPattern

HEADS, KV_HEADS, DIM = 9, 3, 64
SCALE = DIM**-0.5
ROPE_THETA = 100000.0  # SmolLM2-135M's
TARGETS = {
    "sliding_window": 4.5,
    "power_attention": 4.0,
    "moba": 1.0,
    "nalaformer": 3.0,
    "linearize hedgehog w64": 3.0,
}

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def dense(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE, enable_gqa=True)


def _pattern(pattern, backend: str = "auto") -> Attention:
    return lambda q, k, v: sparse_attention(q, k, v, pattern, scaling=SCALE, backend=backend)


def _linear(feature_map: str, window: int) -> Attention:
    """One linearized layer's inference path (see the module docstring): the patch's own `_features`, then the
    chunked kernel."""
    from types import SimpleNamespace

    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from hf_attn_zoo.kernels.feature_maps import FEATURE_MAPS
    from hf_attn_zoo.kernels.linear_attention import hybrid_attention
    from hf_attn_zoo.patches.linearize import _ROPE_ATTR, LinearizeConfig, LinearMaps, _features

    config = LinearizeConfig(feature_map=feature_map, window=window)
    maps = LinearMaps(FEATURE_MAPS[feature_map], HEADS, KV_HEADS, DIM, config, device="cpu", dtype=torch.float32)
    maps.eval()
    module = SimpleNamespace()  # stands in for the attention module: `_features` pops the captured (cos, sin)
    tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def rope_tables(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if n not in tables:
            inv_freq = ROPE_THETA ** -(torch.arange(0, DIM, 2, dtype=torch.float) / DIM)
            angles = torch.outer(torch.arange(n, dtype=torch.float), inv_freq)
            angles = torch.cat([angles, angles], dim=-1)[None]  # [1, n, DIM]
            tables[n] = (angles.cos(), angles.sin())
        return tables[n]

    def attention(q, k, v):
        module.__dict__[_ROPE_ATTR] = rope_tables(q.shape[2])
        features = _features(maps, q, k, module, apply_rotary_pos_emb)
        return hybrid_attention(
            q, k, v, features, window=window, window_weight=maps.window_weight, scaling=SCALE, chunk=config.chunk
        )

    return attention


def _methods() -> dict[str, Callable[[], Attention]]:
    """Factories, so a method whose module is missing is reported and skipped, not fatal."""

    def moba():
        from hf_attn_zoo.kernels.moba import moba_attention

        return lambda q, k, v: moba_attention(q, k, v, block_size=512, top_k=3, scaling=SCALE)

    def moa(backend="auto"):
        from hf_attn_zoo.moa.cache import MoAPattern

        # heterogeneous spans of 512 to 16384 keys (64 of them sinks), one per KV head, as a searched plan of the
        # default kv_head granularity has them (GQA: the 3 query heads of a KV head share its cache)
        spans = [512] * 3 + [2048] * 3 + [16384] * 3
        return _pattern(MoAPattern([64] * HEADS, [span - 64 for span in spans]), backend)

    def hyper():
        from hf_attn_zoo.kernels.hyper_attention import hyper_attention

        return lambda q, k, v: hyper_attention(
            q, k, v, scaling=SCALE, block_size=256, sample_size=256, lsh_num_projs=7, min_seq_len=4096, seed=0
        )

    def routing():
        from hf_attn_zoo.kernels.routing_attention import routing_attention_benchmark

        return routing_attention_benchmark(num_clusters=16, window=256, scaling=SCALE)

    def combiner(factorisation):
        from hf_attn_zoo.kernels.combiner import combiner_attention

        # 64-token blocks (~ sqrt L at 4k), max pooling, the query's own block direct: the patch's inference path
        return lambda q, k, v: combiner_attention(q, k, v, factorisation=factorisation, block_size=64, scaling=SCALE)

    return {
        "sliding_window": lambda: _pattern(SinkWindowPattern(1024, 4)),
        "sliding_window (flex)": lambda: _pattern(SinkWindowPattern(1024, 4), "flex"),
        "power_attention": lambda: _pattern(PowerPattern(256, 5, 1)),
        "power_attention (flex)": lambda: _pattern(PowerPattern(256, 5, 1), "flex"),
        "moba": moba,
        "moa": moa,
        "moa (flex)": lambda: moa("flex"),
        "hyper_attention": hyper,
        "routing_attention": routing,
        "combiner fixed": lambda: combiner("fixed"),
        "combiner logsparse": lambda: combiner("logsparse"),
        "nalaformer": lambda: _linear("nala", 0),
        "linearize hedgehog w64": lambda: _linear("hedgehog", 64),
    }


def _time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: compilation, BlockMask
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="4096,8192,16384")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--methods", default=None, help="comma-separated subset")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [int(n) for n in args.lengths.split(",")]
    factories = _methods()
    wanted = args.methods.split(",") if args.methods else list(factories)
    methods: dict[str, Attention] = {}
    for name in wanted:
        try:
            methods[name] = factories[name]()
        except ImportError as error:
            print(f"skip {name}: {error}")
    print(f"threads={torch.get_num_threads()} heads={HEADS}/{KV_HEADS} dim={DIM} fp32, median of {args.repeats}")
    labels = [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths]
    print(f"| method | {' | '.join(labels)} | target at 16k |")
    print(f"|---|{'---|' * len(lengths)}---|")
    rows = {name: [] for name in ["sdpa (s)", *methods]}
    generator = torch.Generator().manual_seed(0)
    for n in lengths:
        q = torch.randn(1, HEADS, n, DIM, generator=generator)
        k = torch.randn(1, KV_HEADS, n, DIM, generator=generator)
        v = torch.randn(1, KV_HEADS, n, DIM, generator=generator)
        with torch.no_grad():
            base = _time(lambda: dense(q, k, v), args.repeats)
            rows["sdpa (s)"].append(f"{base:.3f}")
            for name, fn in methods.items():
                rows[name].append(f"{base / _time(lambda: fn(q, k, v), args.repeats):.2f}x")
    for name, cells in rows.items():
        target = f">= {TARGETS[name]}x" if name in TARGETS else ""
        print(f"| {name} | {' | '.join(cells)} | {target} |")


if __name__ == "__main__":
    main()
