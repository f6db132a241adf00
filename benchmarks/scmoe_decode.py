"""SCMoE decode speed vs greedy `generate` on the same model, as ratios measured in one run (never a timed test).

Passes, taking turns so that a load change on the machine hits them alike (median of `--repeats` after a warm-up):

- greedy: `model.generate(do_sample=False)` on the B prompts;
- greedy 2B: the same on the duplicated batch `[x; x]` (what SCMoE's forward costs without the weak routing);
- SCMoE: `scmoe_generate` (alpha 0.1, beta 0.5, weak rank-2): one forward of 2B rows per step, rows B..2B-1 under
  the weak routing override;
- sequential two passes: greedy plus greedy under the weak routing, timed apart and added up: the cost of the
  official code's shape (a strong and a weak pass one after the other), without its contrast step, so a lower bound.

Every pass generates exactly `--new-tokens` tokens per row (EOS disabled); tokens/s counts the B rows' new tokens,
prefill included. Prompts are left-padded (lengths differ) pieces of the held-out Python-docs corpus.
The model is the upcycled SmolLM2 BTX MoE of the upcycling study when cached (the tuned one,
`~/.cache/hf_attn_zoo/upcycling/smollm2_quick/tuned/btx/final`, else the untuned `.../moe/btx`), otherwise a random
Mixtral with SmolLM2-135M widths (hidden 576, 9/3 heads, FFN 1536, 4 experts top-2) and `--layers` layers.

Usage: python benchmarks/scmoe_decode.py [--model DIR] [--batches 1 4] [--new-tokens 64] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from _moe import load_moe
from hf_attn_zoo.decoding import SCMoEConfig, scmoe_generate
from hf_attn_zoo.moe import routing_override


def _load(args):
    return load_moe(args.model, args.layers)


def _prompts(tokenizer, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    from hf_attn_zoo.assets.corpora import corpus_texts

    texts = [t for t in corpus_texts("python_stdlib_docs") if len(t) > 4 * length][:batch]
    rows = [tokenizer(t).input_ids[: length - 3 * i] for i, t in enumerate(texts)]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((batch, width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a MoE checkpoint folder (default: the BTX MoE, else random)")
    parser.add_argument("--layers", type=int, default=6, help="layers of the random Mixtral")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-length", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, description = _load(args)
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # no EOS: every pass generates exactly new_tokens tokens per row
    common = dict(max_new_tokens=args.new_tokens, eos_token_id=[], pad_token_id=pad)
    total = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"model: {description}; {total:.1f}M parameters, {model.config.model_type}, "
        f"top-{model.config.num_experts_per_tok} of {model.config.num_local_experts} experts, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"{args.new_tokens} new tokens per row, prompts <= {args.prompt_length} tokens (left-padded), "
        f"median of {args.repeats} after a warm-up\n"
    )
    print("| batch | pass | seconds | new tokens/s | vs greedy |\n|---|---|---|---|---|")
    for batch in args.batches:
        ids, mask = _prompts(tokenizer, batch, args.prompt_length)
        doubled = (torch.cat([ids, ids]), torch.cat([mask, mask]))

        def greedy(ids=ids, mask=mask):
            with torch.no_grad():
                return model.generate(ids, attention_mask=mask, do_sample=False, **common)

        def greedy_2b():
            with torch.no_grad():
                return model.generate(doubled[0], attention_mask=doubled[1], do_sample=False, **common)

        def scmoe(ids=ids, mask=mask):
            return scmoe_generate(model, ids, mask, alpha=0.1, beta=0.5, weak="rank:2", **common)

        def greedy_weak(ids=ids, mask=mask):
            with routing_override(model, SCMoEConfig(weak="rank", weak_rank=2).weak_override()):
                return greedy(ids, mask)

        passes = [
            ("greedy", greedy),
            ("greedy 2B (no routing override)", greedy_2b),
            ("SCMoE", scmoe),
            ("greedy under the weak routing", greedy_weak),
        ]
        for _, run in passes:
            out = run()
            assert out.shape[1] == ids.shape[1] + args.new_tokens
        times: dict[str, list[float]] = {name: [] for name, _ in passes}
        for _ in range(args.repeats):
            for name, run in passes:
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        seconds = {name: statistics.median(values) for name, values in times.items()}
        sequential = "sequential two passes (greedy + weak greedy)"
        seconds[sequential] = seconds["greedy"] + seconds.pop("greedy under the weak routing")
        passes = passes[:3] + [(sequential, None)]
        for name, _ in passes:
            rate = batch * args.new_tokens / seconds[name]
            print(
                f"| {batch} | {name} | {seconds[name]:.2f} | {rate:.1f} | {seconds['greedy'] / seconds[name]:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
