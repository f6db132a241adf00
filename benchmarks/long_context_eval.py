"""Long-context evaluation of the dense model and patched variants: passkey retrieval and long-context perplexity.

Runs `zoo_passkey_<len>` (exact match of the key, higher is better) and `zoo_long_ppl_<len>` (token perplexity of
256 tokens after a long context, lower is better; 2k and up) through `hf_attn_zoo.eval_harness.evaluate`, once per
method, then writes the side-by-side report (`report.md`, `report.json`, `report.png`, as `hf-attn-zoo report`) in
`--out` and prints its table. Names that are not a patch of `hf_attn_zoo.methods()` are skipped with a printed line.

Usage:
    python benchmarks/long_context_eval.py --limit 2 --lengths 1k,2k
    python benchmarks/long_context_eval.py --methods none 'sliding_window={"window": 512, "sinks": 4}' moh
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

import hf_attn_zoo
from hf_attn_zoo.assets.corpora import corpus_names
from hf_attn_zoo.assets.model import resolve_model
from hf_attn_zoo.errors import ZooError
from hf_attn_zoo.eval_harness import evaluate, write_report
from hf_attn_zoo.eval_harness.tasks.long_context import LENGTHS, LONG_PPL_LENGTHS

DENSE = "none"
DEFAULT_METHODS = [
    DENSE,
    'sliding_window={"window": 1024, "sinks": 4}',
    "power_attention",
    "moba",
    'moa={"alpha": 0, "beta": 0.125, "sinks": 64}',
    'hyper_attention={"min_seq_len": 1024}',
    # untrained linear retrofits (identity projections): a floor, what the two-stage recipe starts from
    'linearize={"feature_map": "hedgehog", "window": 64}',
    "nalaformer",
]

MethodSpec = tuple[str, str, dict[str, Any]]


def parse_method(text: str) -> tuple[str, dict[str, Any]]:
    """`NAME` or `NAME={"option": value, ...}` -> `(name, options)`."""
    name, sep, options = text.partition("=")
    name = name.strip()
    if not name:
        raise argparse.ArgumentTypeError(f"method spec {text!r} has no name; write NAME or NAME={{...}}")
    if not sep:
        return name, {}
    try:
        parsed = json.loads(options)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"options of {name!r} are not valid JSON ({err}): {options!r}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"options of {name!r} must be a JSON object, got {options!r}")
    return name, parsed


def parse_lengths(text: str) -> list[str]:
    """`"1k,2k"` -> `["1k", "2k"]`, checked against the task lengths."""
    lengths = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [length for length in lengths if length not in LENGTHS]
    if not lengths or unknown:
        raise argparse.ArgumentTypeError(f"lengths must be among {', '.join(LENGTHS)}, got {text!r}")
    return sorted(set(lengths), key=list(LENGTHS).index)


def task_names(lengths: list[str]) -> list[str]:
    """Passkey tasks of every length, long-perplexity tasks of the lengths that have one."""
    passkey = [f"zoo_passkey_{length}" for length in lengths]
    long_ppl = [f"zoo_long_ppl_{length}" for length in lengths if length in LONG_PPL_LENGTHS]
    return passkey + long_ppl


def runnable(methods: list[tuple[str, dict[str, Any]]]) -> list[MethodSpec]:
    """`(label, method, options)` of the methods that can run now; prints a line for each one skipped."""
    # patches only: a decoding method (SCMoE) is no patch `evaluate` can apply
    known = {info.name for info in hf_attn_zoo.methods() if info.kind == "patch"}
    runs: list[MethodSpec] = []
    labels: set[str] = set()
    for name, options in methods:
        if name != DENSE and name not in known:
            print(f"skip {name}: not a registered patch (known: {', '.join(sorted(known))})")
            continue
        base = "dense" if name == DENSE else name
        label, n = base, 2
        while label in labels:
            label, n = f"{base}-{n}", n + 1
        labels.add(label)
        runs.append((label, name, options))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="Checkpoint folder (default: the embedded SmolLM2-135M).")
    parser.add_argument(
        "--methods",
        nargs="+",
        type=parse_method,
        default=[parse_method(m) for m in DEFAULT_METHODS],
        help="NAME or NAME={JSON options}; 'none' is the unpatched model, reported as 'dense' "
        f"(default: {' '.join(DEFAULT_METHODS)}).",
    )
    parser.add_argument(
        "--lengths",
        type=parse_lengths,
        default=list(LENGTHS),
        help=f"Comma-separated subset of {','.join(LENGTHS)} (default: all).",
    )
    parser.add_argument("--limit", type=int, default=None, help="Documents per task (default: every document).")
    parser.add_argument(
        "--corpus",
        choices=corpus_names(),
        default=None,
        help="Haystack and perplexity corpus (default: the tasks' python_stdlib_docs).",
    )
    parser.add_argument("--batch_size", default="1", help="lm-eval batch size, or 'auto' (default: 1).")
    parser.add_argument("--device", default=None, help="Default: CUDA when available, else CPU.")
    parser.add_argument("--dtype", default="auto", help="Model dtype, as lm-eval's HFLM takes it (default: auto).")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("long_context_report"),
        help="Output folder: one lm-eval results folder per method, and the report.",
    )
    args = parser.parse_args(argv)

    model = resolve_model(args.model)
    tasks = task_names(args.lengths)
    # HFLM would cut contexts longer than its max_length from the left; the longest task must fit whole
    model_args = {"max_length": max(LENGTHS[length] for length in args.lengths), "dtype": args.dtype}
    metadata = {} if args.corpus is None else {"zoo_passkey_corpus": args.corpus, "zoo_long_ppl_corpus": args.corpus}
    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)

    runs = runnable(args.methods)
    if not runs:
        print("nothing to run: none of the methods is registered", file=sys.stderr)
        return 1
    print(f"model {model}; tasks {', '.join(tasks)}; limit {args.limit}; methods {', '.join(r[0] for r in runs)}")
    results: dict[str, dict[str, Any]] = {}
    failed = []
    for label, name, options in tqdm(runs, desc="methods", unit="model"):
        patches = None if name == DENSE else [{"method": name, **options}]
        start = time.perf_counter()
        try:
            results[label] = evaluate(
                model,
                tasks,
                limit=args.limit,
                batch_size=batch_size,
                patches=patches,
                device=args.device,
                model_args=model_args,
                metadata=metadata,
                output_path=args.out / label,
            )
        except ZooError as err:
            tqdm.write(f"{label}: failed with {type(err).__name__}: {err}")
            failed.append(label)
            continue
        tqdm.write(f"{label}: done in {time.perf_counter() - start:.0f} s")
    if not results:
        return 1
    paths = write_report(results, args.out)
    print()
    print(paths["md"].read_text(encoding="utf-8"))
    print("\n".join(str(path) for path in paths.values()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
