"""SCMoE vs greedy decoding on the first N GSM8K problems of the offline pack (`zoo_gsm8k`), on a real MoE.

Both runs go through `hf_attn_zoo.eval_harness.evaluate` with the same model object and the same settings; the SCMoE
run adds the model arguments `scmoe=True, scmoe_alpha, scmoe_beta, scmoe_weak`. Printed: exact match (strict
`#### n` and flexible last-number extraction, lm-eval's filters), wall time, and how many completions differ.

The model is the upcycled SmolLM2 BTX MoE of the upcycling study when cached (the tuned one,
`~/.cache/hf_attn_zoo/upcycling/smollm2_quick/tuned/btx/final`, else the untuned `.../moe/btx`), or `--model`.
A 135M-based model solves almost no GSM8K problem (expect 0-5%); this is a smoke check on real data, not a
replication. To fit ~10 minutes on a loaded 2-core CPU the defaults shorten the task: 2 shots instead of 5
(`--num-fewshot 5` restores lm-eval's setting) and at most 128 new tokens (lm-eval's default is 256).

Usage: python benchmarks/scmoe_gsm8k.py [--model DIR] [--limit 30] [--num-fewshot 2] [--max-gen-toks 128]
       [--beta 0.5] [--alpha 0.1] [--weak rank:2] [--batch-size 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import hf_attn_zoo
from hf_attn_zoo.upcycling.pipeline import cached_moe
from hf_attn_zoo.eval_harness import evaluate

_TASK = "zoo_gsm8k"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a MoE checkpoint folder (default: the BTX MoE of the study)")
    parser.add_argument("--limit", type=int, default=30, help="first N problems of the test split")
    parser.add_argument("--num-fewshot", type=int, default=2)
    parser.add_argument("--max-gen-toks", type=int, default=128)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--weak", default="rank:2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = args.model or cached_moe("btx")
    if folder is None:
        raise SystemExit("no MoE checkpoint: build one with `hf-attn-zoo upcycle-study --stage build`, or pass --model")
    from transformers import AutoTokenizer

    model = hf_attn_zoo.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    runs = {
        "greedy": {},
        f"SCMoE (alpha {args.alpha}, beta {args.beta}, weak {args.weak})": {
            "scmoe": True,
            "scmoe_alpha": args.alpha,
            "scmoe_beta": args.beta,
            "scmoe_weak": args.weak,
        },
    }
    print(
        f"model: {folder}; {model.config.model_type}, top-{model.config.num_experts_per_tok} of "
        f"{model.config.num_local_experts} experts; task {_TASK}, first {args.limit} problems, "
        f"{args.num_fewshot}-shot, max_gen_toks {args.max_gen_toks}, batch {args.batch_size}, "
        f"{args.threads} thread(s)",
        flush=True,
    )
    outputs, rows = {}, []
    for name, model_args in runs.items():
        start = time.perf_counter()
        results = evaluate(
            model,
            _TASK,
            limit=args.limit,
            batch_size=args.batch_size,
            tokenizer=tokenizer,
            device="cpu",
            num_fewshot=args.num_fewshot,
            model_args=model_args,
            gen_kwargs={"max_gen_toks": args.max_gen_toks},
            log_samples=True,
        )
        seconds = time.perf_counter() - start
        scores = results["results"][_TASK]
        # lm-eval logs each document once per filter; the raw completion is the same in each
        by_doc = {sample["doc_id"]: sample["resps"][0][0] for sample in results["samples"][_TASK]}
        outputs[name] = [by_doc[i] for i in sorted(by_doc)]
        rows.append(
            (
                name,
                scores["exact_match,strict-match"],
                scores["exact_match,flexible-extract"],
                seconds,
                results["n-samples"][_TASK]["effective"],
            )
        )
        print(f"{name}: done in {seconds:.0f} s", flush=True)
    greedy, scmoe = outputs.values()
    differ = sum(a != b for a, b in zip(greedy, scmoe))
    print("\n| decoding | N | exact match (strict) | exact match (flexible) | seconds |\n|---|---|---|---|---|")
    for name, strict, flexible, seconds, n in rows:
        print(f"| {name} | {n} | {strict:.3f} | {flexible:.3f} | {seconds:.0f} |")
    print(f"\ncompletions that differ between greedy and SCMoE: {differ} of {len(greedy)}")
    print(f"first SCMoE completion: {scmoe[0][:300]!r}")
    print(f"first greedy completion: {greedy[0][:300]!r}")


if __name__ == "__main__":
    main()
