"""Sink-aware streaming cache vs plain StreamingLLM at the same cache budget, on the real SmolLM2.

Variants (all `sliding_window` with `stream=True`, StreamingLLM positions past the prefill, on every layer, one window):
plain StreamingLLM (`sinks=4`), StreamingLLM with the budget spent on more initial tokens (`sinks=8`), and the
sink-aware cache (`sinks=4, extra_sinks=4`: four secondary sinks per layer kept past the window, detected online),
against the unpatched model (full attention, positions within its 8192) in the same run.

- Long-context perplexity: `--docs` windows of `--length` tokens of held-out text (`--corpus`, evenly spaced); token
  NLL over the positions from `--window` + 8 on (where the variants differ from full attention). The streaming variants
  run a prefill of `--window` tokens, then decode in calls of `--chunk` tokens through the cache: exactly StreamingLLM's
  token-by-token evaluation (`eval_long_ppl`, position shift) because every split of a sequence into calls gives the
  same outputs (tested in tests/kernels/test_sink_cache.py; the script checks it again on the first document: chunked
  vs token-by-token logits over `--window` + 64 tokens).
- Passkey retrieval: `--passkeys` prompts of `--passkey-length` tokens (`hf_attn_zoo.eval_harness.tasks.long_context`,
  the `zoo_passkey` format, needle at 10%..90% depth), prefilled the same way, then greedy decoding of up to 10 tokens;
  exact match of the first number.

Printed: a markdown table with perplexity, its ratio to the full model and to plain StreamingLLM, passkey accuracy
and the cache budget per layer (sinks + extras + window). The issue asks that sink-aware vs plain streaming be
measured; there is no target.

Usage: OMP_NUM_THREADS=1 python benchmarks/sink_streaming.py [--window 256] [--length 2048] [--docs 4] [--json PATH]
       python benchmarks/sink_streaming.py --smoke   (window 32, 2 short documents, 2 passkeys: checks the script)
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import hf_attn_zoo
from hf_attn_zoo.eval_harness.tasks.long_context import corpus_stream, passkey_docs
from hf_attn_zoo.wrappers import cache_kwargs

FULL = "full attention"
PLAIN = "StreamingLLM sinks=4"


def variants(window: int) -> dict[str, dict | None]:
    return {
        FULL: None,
        PLAIN: {"window": window, "sinks": 4, "stream": True},
        "StreamingLLM sinks=8": {"window": window, "sinks": 8, "stream": True},
        "sink-aware sinks=4 + extra 4": {"window": window, "sinks": 4, "extra_sinks": 4, "stream": True},
    }


def documents(tokenizer, corpus: str, length: int, count: int) -> list[torch.Tensor]:
    ids = tokenizer(corpus_stream(corpus), add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() < length:
        raise SystemExit(f"corpus {corpus} holds {ids.numel()} held-out tokens, fewer than --length {length}")
    room = ids.numel() - length
    return [ids[round(i * room / max(count - 1, 1)) :][:length][None] for i in range(count)]


@torch.no_grad()
def chunked_logits(model, ids: torch.Tensor, prefill: int, chunk: int) -> tuple[torch.Tensor, DynamicCache]:
    """Logits of `ids` fed through one cache: `prefill` tokens, then calls of `chunk` tokens."""
    cache = DynamicCache(config=model.config)
    kv = cache_kwargs(model, cache)
    bounds = [0, *range(min(prefill, ids.shape[1]), ids.shape[1], chunk), ids.shape[1]]
    out = [model(ids[:, a:b], **kv, use_cache=True).logits for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return torch.cat(out, dim=1), cache


def nll(logits: torch.Tensor, ids: torch.Tensor, start: int) -> tuple[float, int]:
    """Summed next-token NLL of the targets at positions `start + 1 ..` and their count."""
    logp = torch.log_softmax(logits[0, start:-1].float(), dim=-1)
    targets = ids[0, start + 1 :]
    return float(-logp.gather(1, targets[:, None]).sum()), targets.numel()


@torch.no_grad()
def passkey(model, tokenizer, doc: dict, streaming: bool, prefill: int, chunk: int) -> bool:
    ids = tokenizer(doc["prompt"], return_tensors="pt").input_ids
    if streaming:
        logits, cache = chunked_logits(model, ids, prefill, chunk)
        kv = cache_kwargs(model, cache)
    else:
        kv = cache_kwargs(model, DynamicCache(config=model.config))
        logits = model(ids, **kv, use_cache=True).logits
    text = ""
    for _ in range(10):
        token = logits[:, -1:].argmax(-1)
        piece = tokenizer.decode(token[0])
        text += piece
        if "\n" in piece or "." in piece:
            break
        logits = model(token, **kv, use_cache=True).logits
    found = re.search(r"\d+", text)
    return found is not None and found.group(0) == doc["key"]


def cache_keys(cache: DynamicCache) -> int:
    """Keys held by the first layer of a cache (both regions of a sink-aware layer)."""
    layer = cache.layers[0]
    held = layer.keys.shape[2]
    extra = getattr(layer, "extra_positions", None)
    return held + (int((extra >= 0).sum(1).max()) if extra is not None and extra.numel() else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--length", type=int, default=2048, help="tokens per perplexity document")
    parser.add_argument("--docs", type=int, default=4, help="perplexity documents")
    parser.add_argument("--corpus", default="python_docs")
    parser.add_argument("--passkeys", type=int, default=10)
    parser.add_argument("--passkey-length", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=64, help="tokens per decode call of the streaming variants")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this path")
    parser.add_argument("--smoke", action="store_true", help="window 32, 2 documents of 256 tokens, 2 passkeys")
    args = parser.parse_args()
    if args.smoke:
        args.window, args.length, args.docs, args.passkeys, args.passkey_length = 32, 256, 2, 2, 1024
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = hf_attn_zoo.assets.load_default_model()
    model.eval()
    docs = documents(tokenizer, args.corpus, args.length, args.docs)
    keys = passkey_docs(args.passkey_length, args.passkeys, corpus=args.corpus)
    start = args.window + 8  # from here on every variant has evicted something
    rows = []
    for label, options in variants(args.window).items():
        began = time.perf_counter()
        if options is not None:
            hf_attn_zoo.patch(model, "sliding_window", **options)
        try:
            total, count, kept = 0.0, 0, None
            for i, ids in enumerate(docs):
                if options is None:
                    with torch.no_grad():
                        logits = model(ids).logits
                else:
                    logits, cache = chunked_logits(model, ids, args.window, args.chunk)
                    kept = cache_keys(cache)
                    if i == 0:
                        prefix = ids[:, : args.window + 64]
                        by_token, _ = chunked_logits(model, prefix, args.window, 1)
                        gap = float((by_token - logits[:, : prefix.shape[1]]).abs().max())
                        print(f"{label}: chunked vs token-by-token decode, max |logit difference| {gap:.2e}")
                s, n = nll(logits, ids, start)
                total, count = total + s, count + n
            hits = [passkey(model, tokenizer, doc, options is not None, args.window, args.chunk) for doc in keys]
        finally:
            if options is not None:
                hf_attn_zoo.unpatch(model)
        rows.append(
            {
                "variant": label,
                "options": options,
                "ppl": math.exp(total / count),
                "tokens": count,
                "passkey": sum(hits) / len(hits),
                "cache_keys_per_layer": kept,
                "seconds": time.perf_counter() - began,
            }
        )
        print(f"{label}: ppl {rows[-1]['ppl']:.3f}, passkey {rows[-1]['passkey']:.2f} ({rows[-1]['seconds']:.0f} s)")
    full = rows[0]["ppl"]
    plain = next(r["ppl"] for r in rows if r["variant"] == PLAIN)
    print(
        f"\nSmolLM2-135M, window {args.window}, {args.docs} x {args.length} tokens of {args.corpus} (NLL from position "
        f"{start}), passkey {args.passkeys} x {args.passkey_length} tokens\n"
    )
    print("| variant | cache budget / layer | ppl | vs full | vs StreamingLLM sinks=4 | passkey |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        options = row["options"]
        budget = (
            f"{options['sinks']} + {options.get('extra_sinks', 0)} + {options['window']}" if options else "all tokens"
        )
        print(
            f"| {row['variant']} | {budget} | {row['ppl']:.3f} | {row['ppl'] / full:.4f} | {row['ppl'] / plain:.4f} "
            f"| {row['passkey']:.2f} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
