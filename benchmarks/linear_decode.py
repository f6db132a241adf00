"""Decode memory and speed of the linear-attention retrofits against context length, on the real SmolLM2.

For each context length (1k, 2k, 4k, 8k by default) and each method, the unpatched model (SDPA), `linearize` (hedgehog
map, exact softmax window of 64: LoLCATs' hybrid) and `nalaformer` (nala map, window 0: pure linear attention), both
on every layer: the model is patched, warmed up on a short prompt, then prefills the context (real held-out text,
tiled if needed) into a fresh `DynamicCache` in one forward (`logits_to_keep=1`) and runs `--decode` greedy
single-token steps from that cache. Reported: the cache bytes after the prefill (`kv_cache_bytes`: a linear layer
counts its fixed-size state, the last `window - 1` raw keys and values and their features), decode tokens/s, and as
ratios from the same run, each against the same method at the smallest length (how memory and speed grow with the
context) and against the unpatched model at the same length. The context plus the decoded tokens stays within the
model's position range (8192): a length over `8192 - --decode` prefills that many tokens instead. The linear patches
run untrained (identity projections): their speed and memory are those of a trained model, their outputs are not.
Timings on a shared machine are noisy; compare the ratios of one run, never assert on them.

Target (issue 16, linear attention retrofits): the linear methods' cache stays flat with the context, within 5% from
the smallest length to the largest (state + window do not grow), where the dense cache grows linearly.

Usage: python benchmarks/linear_decode.py [--lengths 1024,2048,4096,8192] [--decode 16] [--threads N] [--json PATH]
       python benchmarks/linear_decode.py --smoke   (lengths 256,512, 4 decode steps: checks the script)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import hf_attn_zoo
from long_context_speed import _prompt, run  # benchmarks/ is on the path of a script run from it
from hf_attn_zoo.kernels.pattern_handler import max_positions

DENSE = "dense (sdpa)"
METHODS: dict[str, tuple[str | None, dict]] = {  # label: (patch, options)
    DENSE: (None, {}),
    "linearize hedgehog w64": ("linearize", {"feature_map": "hedgehog", "window": 64}),
    "nalaformer": ("nalaformer", {}),
    "mla r128 p4": ("mla", {"rank": 128, "rope_pairs": 4}),  # latent attention (issue 17): not in the defaults
}
LINEAR = ["linearize hedgehog w64", "nalaformer"]
FLAT_TOLERANCE = 0.05  # the linear caches' growth from the smallest to the largest length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="1024,2048,4096,8192", help="comma-separated context lengths")
    parser.add_argument("--decode", type=int, default=16, help="greedy decode steps timed after each prefill")
    parser.add_argument(
        "--methods", default=",".join([DENSE, *LINEAR]), help=f"comma-separated subset of {list(METHODS)}"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON to this path")
    parser.add_argument("--smoke", action="store_true", help="tiny run to check the script: lengths 256,512, decode 4")
    args = parser.parse_args()
    if args.smoke:
        args.lengths, args.decode = "256,512", 4
    if args.threads:
        torch.set_num_threads(args.threads)
    labels = [label.strip() for label in args.methods.split(",") if label.strip()]
    unknown = [label for label in labels if label not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose among {list(METHODS)}")
    if DENSE not in labels:
        labels.insert(0, DENSE)  # the reference of every "vs dense" ratio

    model, tokenizer = hf_attn_zoo.assets.load_default_model()
    model.eval()
    limit = max_positions(model.config) - args.decode  # context + decoded tokens within the position range
    lengths = sorted(int(n) for n in args.lengths.split(","))
    ids = _prompt(tokenizer, min(max(lengths), limit))
    warm = ids[:, : min(256, ids.shape[1])]

    results: dict[tuple[str, int], dict] = {}
    for length in lengths:  # methods alternate within a length: the "vs dense" ratios share the machine's state
        context = min(length, limit)
        for label in labels:
            patch, options = METHODS[label]
            if patch is not None:
                hf_attn_zoo.patch(model, patch, **options)
            try:
                run(model, warm, 2)  # warm-up
                results[label, length] = {"context": context, **run(model, ids[:, :context], args.decode)}
            finally:
                if patch is not None:
                    hf_attn_zoo.unpatch(model)

    rows = []
    smallest = lengths[0]
    for label in labels:
        patch, options = METHODS[label]
        first = results[label, smallest]
        for length in lengths:
            r, dense = results[label, length], results[DENSE, length]
            rows.append(
                {
                    "method": label,
                    "patch": patch,
                    "options": options,
                    "length": length,
                    "decode": args.decode,
                    **r,
                    "cache_vs_smallest": r["cache_bytes"] / first["cache_bytes"],
                    "cache_vs_dense": r["cache_bytes"] / dense["cache_bytes"],
                    "decode_vs_smallest": r["decode_tok_s"] / first["decode_tok_s"],
                    "decode_vs_dense": r["decode_tok_s"] / dense["decode_tok_s"],
                }
            )

    print(
        f"SmolLM2-135M, fp32, batch 1, every layer patched, {args.decode} greedy decode steps after each prefill, "
        f"threads={torch.get_num_threads()}"
    )
    print(
        "| method | context | cache MiB | vs same method at smallest | vs dense | decode tok/s | "
        "vs same method at smallest | vs dense |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['method']} | {row['context']} | {row['cache_bytes'] / 2**20:.2f} | "
            f"{row['cache_vs_smallest']:.2f}x | {1 / row['cache_vs_dense']:.1f}x less | {row['decode_tok_s']:.1f} | "
            f"{row['decode_vs_smallest']:.2f}x | {row['decode_vs_dense']:.2f}x |"
        )
    first_context, last_context = results[DENSE, smallest]["context"], results[DENSE, lengths[-1]]["context"]
    if any(label in LINEAR for label in labels):
        print(
            f"\nTarget (issue 16): the linear caches flat within {FLAT_TOLERANCE:.0%} from {first_context} to "
            f"{last_context} tokens."
        )
    for label in labels:
        if label in LINEAR:
            growth = results[label, lengths[-1]]["cache_bytes"] / results[label, smallest]["cache_bytes"]
            verdict = "met" if abs(growth - 1) <= FLAT_TOLERANCE else "NOT met"
            print(f"- {label}: cache x{growth:.3f} ({verdict})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
        print(f"rows written to {args.json}")


if __name__ == "__main__":
    main()
