"""MoTE expert switching on a real MoE: switch off the experts fTRI finds for code, measure per-domain perplexity.

Model: the upcycled SmolLM2 BTX MoE of the upcycling study (30 MoE layers x 4 experts, top-1; expert 0 = SmolLM2,
1 = its Python-docs specialist, 2 = KJV Bible, 3 = Shakespeare): `tuned/btx/final` when it exists, else the untuned
`moe/btx` (`hf-attn-zoo upcycle-study --stage build` builds it), or `--model DIR`.

1. fTRI (`profile_experts`): class `code` = prompts from corpus python_docs, class `prose` = prompts from bible_kjv
   and shakespeare (half each), training documents only; experts ranked by selection-frequency difference.
2. Held-out perplexity (`held_out_perplexity`, the first `--blocks` blocks of `--seq-len` tokens) on python_docs,
   bible_kjv and shakespeare: unchanged model; top-`--n` code experts switched off (`switch_experts(off=...)`:
   masked before the top-k, the next-ranked expert takes the place); `--n` random experts switched off (the paper's
   control, seeds 0..`--draws`-1, averaged). At most `num_experts - top_k` experts of one layer are taken, so every
   token keeps an expert.
3. Cost: forward tokens/s of the `mote`-patched model (same switches) vs the unpatched one, the passes taking
   turns (median of `--repeats`), plus the routing wrapper's own time measured on each router in isolation (on the
   hidden states of a real batch) as a share of the forward: end-to-end timings on a shared CPU are noisy.

The defaults keep the run to a few minutes on a loaded 2-core CPU (one torch thread): few prompts (16 per class,
<= 128 tokens) and few perplexity blocks (4 x 256 tokens per domain), so the perplexities are indicative, not precise.
`drop` rows: the same experts removed without replacement (`drop=`), the other reading of the paper's switch-off.

Usage: python benchmarks/mote_switch_ppl.py [--model DIR] [--n 10] [--blocks 4] [--draws 2] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import hf_attn_zoo
from hf_attn_zoo.analysis import held_out_perplexity, profile_experts
from hf_attn_zoo.families import resolve_family
from hf_attn_zoo.moe import experts_to_switch, random_experts, switch_experts
from hf_attn_zoo.upcycling.cli import read_prompts
from hf_attn_zoo.upcycling.pipeline import cached_moe

DOMAINS = ("python_docs", "bible_kjv", "shakespeare")


def _model_folder(given: Path | None) -> tuple[Path, str]:
    if given is not None:
        return given, "given"
    folder = cached_moe("btx")
    if folder is None:
        raise SystemExit("no BTX MoE: build it with `hf-attn-zoo upcycle-study --stage build`")
    return folder, "mixture-tuned BTX MoE" if folder.name == "final" else "untuned BTX MoE (not tuned yet)"


def _perplexities(model, tokenizer, args) -> dict[str, float]:
    return {
        d: held_out_perplexity(
            model, tokenizer, d, seq_len=args.seq_len, max_blocks=args.blocks, batch_size=args.blocks
        )
        for d in DOMAINS
    }


def _fmt(switches: dict[int, list[int]]) -> str:
    return ", ".join(f"L{layer}:{experts}" for layer, experts in switches.items())


@torch.no_grad()
def _routing_overhead(model, switches, ids, reps: int = 20) -> tuple[float, float]:
    """Seconds per forward spent in the routers, plain and with the switches installed (summed over MoE layers)."""
    family = resolve_family(model.config)
    routers = [getattr(family.mlp_module(model, i), family.mlp.router) for i in family.moe_layers(model)]
    inputs = {}
    hooks = [r.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0])) for i, r in enumerate(routers)]
    try:
        model(ids, use_cache=False, logits_to_keep=1)
    finally:
        for hook in hooks:
            hook.remove()

    def timed() -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(reps):
                for i, router in enumerate(routers):
                    router(inputs[i])
            best = min(best, (time.perf_counter() - start) / reps)
        return best

    plain = timed()
    with switch_experts(model, off=switches):
        switched = timed()
    return plain, switched


@torch.no_grad()
def _throughput(model, switches, ids, repeats: int) -> dict[str, dict[str, float]]:
    """Forward tokens/s (median wall and median process-CPU time), unpatched and mote-patched, the two taking turns
    (after one warm-up each). CPU time is what this process computed, so it is less hit by a loaded machine."""
    wall: dict[str, list[float]] = {"unpatched": [], "mote": []}
    cpu: dict[str, list[float]] = {"unpatched": [], "mote": []}
    for r in range(repeats + 1):
        for name in ("unpatched", "mote"):
            if name == "mote":
                hf_attn_zoo.patch(model, "mote", off=switches)
            start, start_cpu = time.perf_counter(), time.process_time()
            model(ids, use_cache=False)
            elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            if name == "mote":
                hf_attn_zoo.unpatch(model)
            if r:
                wall[name].append(elapsed)
                cpu[name].append(elapsed_cpu)
    tokens = ids.numel()
    return {
        name: {"wall": tokens / statistics.median(wall[name]), "cpu": tokens / statistics.median(cpu[name])}
        for name in wall
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a MoE checkpoint folder (default: the BTX MoE of the study)")
    parser.add_argument("--n", type=int, default=10, help="experts to switch off")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per fTRI class")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per fTRI prompt")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=4, help="held-out blocks per domain")
    parser.add_argument("--draws", type=int, default=2, help="random-expert draws (seeds 0..draws-1)")
    parser.add_argument("--repeats", type=int, default=7, help="timed forwards per variant")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a CPU shared with other jobs, more threads wait on each "
        "other; measured here 2 threads ran a forward 4-20x slower than 1)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    started = time.perf_counter()
    folder, what = _model_folder(args.model)
    model = hf_attn_zoo.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    print(f"model: {folder} ({what}); torch {torch.__version__}, {torch.get_num_threads()} threads")

    prose = read_prompts("corpus:bible_kjv", args.prompts // 2) + read_prompts("corpus:shakespeare", args.prompts // 2)
    sets = {"code": read_prompts("corpus:python_docs", args.prompts), "prose": prose}
    profile = profile_experts(model, tokenizer, sets, target="code", max_length=args.max_length, progress=False)
    top_k = int(model.config.num_experts_per_tok)
    per_layer = min(profile.num_experts) - top_k
    code = experts_to_switch(profile, args.n, max_per_layer=per_layer)
    scores = {(layer, expert): score for layer, expert, score in profile.top(sum(profile.num_experts))}
    print(f"fTRI: {profile.tokens} tokens; top-{args.n} code experts (layer: experts): {_fmt(code)}")
    print("  scores: " + ", ".join(f"L{layer}E{e} {scores[(layer, e)]:+.3f}" for layer, ex in code.items() for e in ex))
    draws = [random_experts(profile, args.n, seed=s, max_per_layer=per_layer) for s in range(args.draws)]
    for seed, switches in enumerate(draws):
        print(f"random draw (seed {seed}): {_fmt(switches)}")
    print(f"[{time.perf_counter() - started:.0f} s]")

    results = {"unchanged": _perplexities(model, tokenizer, args)}
    with switch_experts(model, off=code):
        results[f"top-{args.n} code experts off"] = _perplexities(model, tokenizer, args)
    random_runs = []
    for switches in draws:
        with switch_experts(model, off=switches):
            random_runs.append(_perplexities(model, tokenizer, args))
    results[f"{args.n} random experts off (mean of {args.draws})"] = {
        d: statistics.fmean(run[d] for run in random_runs) for d in DOMAINS
    }
    # the other reading of "switch off": no replacement (with top-1 routing, those tokens skip the layer's FFN)
    with switch_experts(model, drop=code):
        results[f"top-{args.n} code experts dropped"] = _perplexities(model, tokenizer, args)
    with switch_experts(model, drop=draws[0]):
        results[f"{args.n} random experts dropped (seed 0)"] = _perplexities(model, tokenizer, args)
    print(f"[{time.perf_counter() - started:.0f} s]\n")

    base = results["unchanged"]
    print(f"held-out perplexity ({args.blocks} x {args.seq_len} tokens per domain); ratio = ppl / unchanged ppl")
    print("| setting | " + " | ".join(DOMAINS) + " | " + " | ".join(f"ratio {d}" for d in DOMAINS) + " |")
    print("|---" * (1 + 2 * len(DOMAINS)) + "|")
    for name, ppl in results.items():
        cells = [f"{ppl[d]:.2f}" for d in DOMAINS] + [f"{ppl[d] / base[d]:.3f}" for d in DOMAINS]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for seed, run in enumerate(random_runs):
        print(f"  random off, seed {seed}: " + ", ".join(f"{d} {run[d]:.2f} ({run[d] / base[d]:.3f})" for d in DOMAINS))

    ids = tokenizer("\n\n".join(read_prompts("corpus:python_docs", 8)), return_tensors="pt").input_ids
    ids = ids[:, : 2 * args.seq_len].reshape(2, args.seq_len)
    speed = _throughput(model, code, ids, args.repeats)
    router_plain, router_switched = _routing_overhead(model, code, ids)
    forward = ids.numel() / speed["unpatched"]["cpu"]
    print(f"\nforward of {tuple(ids.shape)} tokens, median of {args.repeats} (taking turns):")
    for clock in ("wall", "cpu"):
        plain_tps, mote_tps = speed["unpatched"][clock], speed["mote"][clock]
        print(
            f"  {clock:4s} time: unpatched {plain_tps:.1f} tokens/s, mote ({args.n} experts off) {mote_tps:.1f} "
            f"tokens/s, ratio {mote_tps / plain_tps:.3f} (overhead {100 * (plain_tps / mote_tps - 1):+.1f} %)"
        )
    extra = router_switched - router_plain
    print(
        f"  routers alone (all {len(profile.layers)} MoE layers): plain {1e3 * router_plain:.2f} ms, switched "
        f"{1e3 * router_switched:.2f} ms per forward -> wrapper overhead {1e3 * extra:.2f} ms = "
        f"{100 * extra / forward:.2f} % of the forward ({1e3 * forward:.0f} ms)"
    )
    print(f"[total {time.perf_counter() - started:.0f} s]")


if __name__ == "__main__":
    main()
