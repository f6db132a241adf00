"""End to end at long context on the real SmolLM2: prefill tokens/s, KV-cache bytes and decode tokens/s per method.

For each method the model is patched on every layer and run on the same prompt of `--length - --decode` tokens (real
held-out text, tiled if needed; the decoded tokens fill the context to `--length`): one prefill forward
(`logits_to_keep=1`, cache on), then `--decode` greedy steps from that cache. Ratios are against the unpatched model
(SDPA) in the same run. KV bytes are what the cache holds after the prefill (a method with a bounded cache keeps
less: sliding window, MoA, and linearize / nalaformer, whose layers hold a fixed-size state plus the window's recent
keys). The linear patches run untrained (identity projections): their speed and memory are those of a trained model,
their outputs are not. The MoA paper reports 1.2-1.4x less memory and 5.5-6.7x decode throughput at 7B on a GPU.

Usage: python benchmarks/long_context_speed.py [--length 8192] [--decode 32] [--methods sliding_window,moa]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import DynamicCache

import hf_attn_zoo
from hf_attn_zoo.assets.corpora import held_out_texts
from hf_attn_zoo.kernels.kv_cache import kv_cache_bytes
from hf_attn_zoo.wrappers import cache_kwargs

METHODS: dict[str, dict] = {
    "sliding_window": {"window": 1024, "sinks": 4},
    "power_attention": {},
    "moba": {},
    "moa": {"alpha": 0, "beta": 0.125, "sinks": 64},
    "hyper_attention": {},
    "routing_attention": {},
    "linearize": {"feature_map": "hedgehog", "window": 64},  # LoLCATs' hybrid: state + 63 recent keys
    "nalaformer": {},  # nala map, window 0: a fixed-size state only
}


def _prompt(tokenizer, length: int) -> torch.Tensor:
    text = "\n\n".join(held_out_texts("python_stdlib_docs"))
    ids = tokenizer(text, return_tensors="pt").input_ids
    while ids.shape[1] < length:
        ids = torch.cat([ids, ids], dim=1)
    return ids[:, :length]


def run(model, ids: torch.Tensor, decode: int) -> dict[str, float]:
    """Prefill `ids` into a fresh cache (`logits_to_keep=1`), then `decode` greedy steps: times and cache bytes."""
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        kv_args = cache_kwargs(model, cache)
        start = time.perf_counter()
        out = model(ids, **kv_args, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - start
        kv = kv_cache_bytes(cache)
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(decode):
            token = model(token, **kv_args, use_cache=True).logits[:, -1:].argmax(-1)
        steps = time.perf_counter() - start
    return {
        "prefill_s": prefill,
        "prefill_tok_s": ids.shape[1] / prefill,
        "cache_bytes": kv,
        "kv_mib": kv / 2**20,
        "cache_bytes_after_decode": kv_cache_bytes(cache),
        "decode_tok_s": decode / steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--options", default=None, help="JSON {method: options} overriding the defaults")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    options = {**METHODS, **(json.loads(args.options) if args.options else {})}
    model, tokenizer = hf_attn_zoo.assets.load_default_model()
    model.eval()
    ids = _prompt(tokenizer, args.length - args.decode)  # the decoded tokens fill the context to --length
    run(model, ids[:, :512], 2)  # warm-up
    dense = run(model, ids, args.decode)
    rows = [("dense (sdpa)", dense)]
    for name in args.methods.split(","):
        if name not in hf_attn_zoo.registry.PATCHES:
            print(f"skip {name}: not registered")
            continue
        hf_attn_zoo.patch(model, name, **options.get(name, {}))
        run(model, ids[:, :512], 2)  # warm-up: compile, masks
        rows.append((name, run(model, ids, args.decode)))
        hf_attn_zoo.unpatch(model)
    print(
        f"SmolLM2-135M, fp32, prefill {ids.shape[1]} tokens, {args.decode} decode steps to {args.length}, "
        f"threads={torch.get_num_threads()}"
    )
    print("| method | prefill tok/s | vs dense | KV cache MiB | vs dense | decode tok/s | vs dense |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(
            f"| {name} | {r['prefill_tok_s']:.0f} | {r['prefill_tok_s'] / dense['prefill_tok_s']:.2f}x | "
            f"{r['kv_mib']:.1f} | {dense['kv_mib'] / r['kv_mib']:.2f}x less | {r['decode_tok_s']:.1f} | "
            f"{r['decode_tok_s'] / dense['decode_tok_s']:.2f}x |"
        )


if __name__ == "__main__":
    main()
