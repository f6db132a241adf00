"""MoH decode speed vs dense, as ratios measured in one run (machines are noisy; never a timed test).

Two tables:
1. the attention block alone (one decode step, one layer): transformers' own SDPA path with GQA (each KV head read
   once) vs the head-sparse MoH kernel, for SmolLM2's shapes (9 query / 3 KV heads, d=64) and LLaMA-3-8B's
   (32 / 8, d=128), head- and group-granularity routing, 2k and 8k context, batch 1 and 16;
2. end to end: tokens/s of greedy decode steps of the real SmolLM2 (KV cache pre-filled to the context length
   with random keys/values, so no prefill is timed), dense vs MoH patched with the library's defaults.

Usage: python benchmarks/moh_decode.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import hf_attn_zoo
from hf_attn_zoo.kernels.head_sparse import head_sparse_decode_attention
from hf_attn_zoo.wrappers import cache_kwargs


class _Module:
    """The attributes transformers' SDPA function reads from an attention module."""

    def __init__(self, groups: int):
        self.num_key_value_groups = groups
        self.is_causal = True
        self.training = False


def _time(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _active(batch: int, heads: int, kv: int, fraction: float, granularity: str, generator) -> torch.Tensor:
    active = torch.zeros(batch, heads, dtype=torch.bool)
    group = heads // kv
    for b in range(batch):
        if granularity == "group":
            for g in torch.randperm(kv, generator=generator)[: round(kv * fraction)]:
                active[b, g * group : (g + 1) * group] = True
        else:
            active[b, torch.randperm(heads, generator=generator)[: round(heads * fraction)]] = True
    return active


def attention_block_table(contexts, batches, repeats: int) -> list[str]:
    rows = [
        "| shapes (H/KV, d) | batch | context | dense SDPA ms | routing | active | MoH / dense time |",
        "|---|---|---|---|---|---|---|",
    ]
    generator = torch.Generator().manual_seed(0)
    for name, heads, kv, dim in (("SmolLM2", 9, 3, 64), ("LLaMA-3-8B", 32, 8, 128)):
        for batch in batches:
            for context in contexts:
                query = torch.randn(batch, heads, 1, dim)
                key, value = torch.randn(batch, kv, context, dim), torch.randn(batch, kv, context, dim)
                module = _Module(heads // kv)
                dense = _time(
                    lambda: sdpa_attention_forward(module, query, key, value, None, scaling=dim**-0.5), repeats
                )
                cases = [
                    ("head", 0.75),
                    ("head", 0.5),
                    ("group", 2 / 3 if kv == 3 else 0.75),
                    ("group", 1 / 3 if kv == 3 else 0.5),
                ]
                for granularity, fraction in cases:
                    active = _active(batch, heads, kv, fraction, granularity, generator)
                    sparse = _time(
                        lambda: head_sparse_decode_attention(query, key, value, None, active, dim**-0.5), repeats
                    )
                    rows.append(
                        f"| {name} ({heads}/{kv}, {dim}) | {batch} | {context} | {dense * 1e3:.3f} | "
                        f"{granularity} | {active.float().mean():.0%} | {sparse / dense:.2f}x |"
                    )
    return rows


def _filled_cache(model, batch: int, context: int) -> DynamicCache:
    config = model.config
    layout = hf_attn_zoo.families.resolve_family(config).head_layout(config)
    cache = DynamicCache(config=config)
    for layer in range(config.num_hidden_layers):
        shape = (batch, layout.num_kv_heads, context, layout.head_dim)
        cache.update(torch.randn(shape) * 0.5, torch.randn(shape) * 0.5, layer)
    return cache


@torch.no_grad()
def _decode_tokens_per_second(model, batch: int, context: int, steps: int) -> float:
    cache = _filled_cache(model, batch, context)
    kv = cache_kwargs(model, cache)
    token = torch.randint(100, 1000, (batch, 1))
    mask = torch.ones(batch, context + steps + 1, dtype=torch.long)

    def step(i: int):
        position = torch.full((batch, 1), context + i)
        return model(
            token, **kv, position_ids=position, attention_mask=mask[:, : context + i + 1], use_cache=True
        ).logits

    step(0)  # warm-up
    start = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    return batch * steps / (time.perf_counter() - start)


def end_to_end_table(contexts, batches, steps: int, rounds: int) -> list[str]:
    base, _ = hf_attn_zoo.assets.load_default_model()
    base.eval()
    variants = [
        ("MoH defaults: head routing, learned, binary gates (7/9 heads)", {}),
        ("MoH head routing, learned, Eq. 5 weighted gates (7/9 heads)", {"gate": "weighted"}),
        ("MoH group routing, 2/3 KV groups (6/9 heads)", {"granularity": "group"}),
        ("MoH group routing, 1/3 KV groups (3/9 heads)", {"granularity": "group", "shared_heads": 0, "top_k": 3}),
    ]
    rows = ["| batch | context | dense tok/s | MoH variant | MoH tok/s | MoH / dense |", "|---|---|---|---|---|---|"]
    for batch in batches:
        for context in contexts:
            # dense and every variant alternate, `rounds` times: allocator and load effects hit all alike
            speeds: dict[str, list[float]] = {"dense": [], **{label: [] for label, _ in variants}}
            for _ in range(rounds):
                speeds["dense"].append(_decode_tokens_per_second(base, batch, context, steps))
                for label, options in variants:
                    hf_attn_zoo.patch(base, "moh", router="learned", **options)
                    generator = torch.Generator().manual_seed(0)
                    with torch.no_grad():
                        for param in hf_attn_zoo.new_parameters(base).values():
                            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
                    speeds[label].append(_decode_tokens_per_second(base, batch, context, steps))
                    hf_attn_zoo.unpatch(base)
            dense = statistics.median(speeds["dense"])
            for label, _ in variants:
                moh = statistics.median(speeds[label])
                rows.append(f"| {batch} | {context} | {dense:.1f} | {label} | {moh:.1f} | {moh / dense:.2f}x |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2k context, batch 1 only")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="alternating dense/MoH rounds (median reported)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    contexts = [2048] if args.quick else [2048, 8192]
    batches = [1] if args.quick else [1, 16]
    print(f"torch {torch.__version__}, {args.threads} threads\n")
    print("Attention block, one decode step (median of repeats):\n")
    print("\n".join(attention_block_table(contexts, batches, repeats=10)))
    if not args.skip_end_to_end:
        print("\nEnd to end, SmolLM2-135M greedy decode steps (KV cache pre-filled):\n")
        print("\n".join(end_to_end_table(contexts, batches, steps=4 if args.quick else 6, rounds=args.rounds)))


if __name__ == "__main__":
    main()
