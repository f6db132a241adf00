"""`hf-attn-zoo`: methods | patch | push | upcycle | tune | validate | eval | report | analyze | demo."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any

from .cli_args import parse_options, read_prompts, resolve_model

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "main"]

# Exit statuses scripts can rely on (README, "Command line"): every command returns one of these.
EXIT_OK = 0  # the work is done (or was already done: a finished run is not redone)
EXIT_FAILED = 1  # the work ran and failed (an exception: its traceback is printed), or a check found failures
EXIT_USAGE = 2  # bad arguments or refused input (unknown option, output folder not empty ...): nothing was changed
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it

_USAGE = """hf-attn-zoo <command> [args]    (hf-attn-zoo --version: the installed version)

commands:
  methods   [--markdown]                     list the methods (patches, decoding methods) and their options
  families  [--markdown]                     the family files and which methods patch each family
  patch     MODEL METHOD OUT [k=v ...]       patch a checkpoint (folder, hub id or 'default') and save it
                                             (commands that write refuse a non-empty output; --overwrite)
  push      FOLDER REPO_ID [--private ...]  upload exactly the files that reload a saved model, with its model card
  tune      RECIPE [key=value ...]           continue-tune with a YAML recipe (path or shipped recipe name)
  validate  [RECIPE ...]                     validate recipes (default: every shipped recipe)
  eval      [lm-eval flags]                  lm-eval with the 'hf-attn-zoo' model and the offline task pack
  report    RESULTS... --names ... --out DIR side-by-side table (md, json) and chart (png)
  upcycle   SEED [EXPERT ...] --out DIR      dense -> MoE: --mode sparse|btx|bam, or --mergekit FILE
  mla-export MODEL OUT                       an mla-converted model as a stock DeepSeek-V3 checkpoint
  upcycle-study [--out DIR] [--stage ...]    SmolLM2 specialists -> sparse/BTX/BAM -> mixture tuning -> report
  moh-study [--variants ...] [--budgets ...] MoH variants vs dense on the same tokens, gap per budget -> report
  plan      MODEL METHOD [k=v ...] --gpus N  plan before you rent: memory per GPU, KV cache, attention kernels
                                             of a patched model on the meta device (llama3-8b, mixtral-8x7b ...)
  analyze   head-usage MODEL --out PNG       per-layer, per-head usage of a MoH model on real text
  analyze   sinks MODEL --out DIR            primary and secondary attention sinks per layer on real text
  analyze   routing MODEL --out DIR          MoE routing entropy and flip rate per layer (graph_routing k=v)
  analyze   report MODEL --out DIR           one page (md, html, json, plots): heads, experts, sinks, routing
  analyze   experts MODEL --class NAME=SRC ... --target NAME --out PNG
                                             fTRI (MoTE): rank the MoE experts one prompt class prefers
  moa       profile|search|apply ...         MoA: attention-influence profile -> MILP plan -> perplexity check
  demo      [--out DIR] [--quick]            SmolLM2 -> MoH -> tune -> eval, offline
"""


def methods_main(argv: list[str]) -> int:
    import hf_attn_zoo

    from .decoding.registry import DECODING_METHODS

    parser = argparse.ArgumentParser(prog="hf-attn-zoo methods")
    parser.add_argument("--markdown", action="store_true", help="the README's table of methods")
    args = parser.parse_intermixed_args(argv)
    infos = hf_attn_zoo.methods()
    if args.markdown:
        from .support import methods_markdown

        print(methods_markdown(infos))
        return 0
    for info in infos:
        if info.kind == "patch":
            print(f"{info.name}: {info.summary}")
        else:
            print(f"{info.name} ({info.kind} method, not a patch): {info.summary}")
            print(f"    use: {DECODING_METHODS[info.name].usage}")
        for option in info.options:
            bounds = f", {option.bounds}" if option.bounds else ""
            print(f"    {option.name} ({option.type}{bounds}, default {option.default!r}): {option.help}")
    return 0


def families_main(argv: list[str]) -> int:
    from .families import family_specs
    from .support import families_markdown, support_matrix

    parser = argparse.ArgumentParser(
        prog="hf-attn-zoo families", description="The families with a family file, and which methods patch them."
    )
    parser.add_argument("--markdown", action="store_true", help="the README's family x method table")
    args = parser.parse_intermixed_args(argv)
    if args.markdown:
        print(families_markdown())
        return 0
    for name, row in support_matrix().items():
        spec = family_specs()[name]
        print(f"{name} ({', '.join(spec.model_types)}; {spec.mlp.kind} MLP, {spec.block} block)")
        for method, reason in row.items():
            print(f"    {method}: {'yes' if reason is None else 'no: ' + reason}")
    print(
        "A decoder of the common shape without a family file is recognised from its modules "
        "(hf_attn_zoo.families.resolve_family)."
    )
    return 0


def patch_main(argv: list[str]) -> int:
    import hf_attn_zoo

    parser = argparse.ArgumentParser(prog="hf-attn-zoo patch", description="Patch a checkpoint and save it.")
    parser.add_argument("model", help="local folder, hub id, or 'default' (the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("method", help="the method to apply (`hf-attn-zoo methods` lists them with their options)")
    parser.add_argument("out", type=Path, help="folder the patched checkpoint and its tokenizer are saved to")
    parser.add_argument("options", nargs="*", help="method options as key=value (e.g. router=onorm top_k=7)")
    parser.add_argument(
        "--layers",
        default="all",
        help="'all', 'first_half', 'every_2nd', 'except_every_4th' ..., or a comma-separated list of indices",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it already holds something")
    args = parser.parse_intermixed_args(argv)
    from transformers import AutoTokenizer

    from .outputs import atomic_output, check_output

    check_output(args.out, args.overwrite, "output folder")  # before the (slow) load
    path = resolve_model(args.model)
    layers: Any = args.layers
    if "," in layers or layers.lstrip("-").isdigit():
        layers = [int(i) for i in layers.split(",")]
    model = hf_attn_zoo.from_pretrained(path)
    hf_attn_zoo.patch(model, args.method, layers=layers, **parse_options(args.options))
    with atomic_output(args.out, args.overwrite, what="output folder") as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(path).save_pretrained(tmp)
    record = hf_attn_zoo.applied_patches(model)[-1]
    print(f"patched {path} with {args.method} on {len(record['layers'])} layers -> {args.out}")
    print(f"options: {record['options']}")
    return 0


def mla_export_main(argv: list[str]) -> int:
    import hf_attn_zoo

    parser = argparse.ArgumentParser(
        prog="hf-attn-zoo mla-export",
        description="Write a model converted with the mla patch (every layer) as a stock DeepSeek-V3 checkpoint that "
        "plain transformers loads; the written checkpoint is loaded back and its logits compared first.",
    )
    parser.add_argument("model", help="an mla-patched checkpoint folder, e.g. runs/mla/smollm2_quick/final")
    parser.add_argument("out", type=Path, help="where the DeepSeek-V3 checkpoint is written")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it already holds something")
    args = parser.parse_intermixed_args(argv)
    from transformers import AutoTokenizer

    from .mla_export import export_deepseek_v3
    from .outputs import check_output

    check_output(args.out, args.overwrite, "output folder")  # before the (slow) load
    path = resolve_model(args.model)
    model = hf_attn_zoo.from_pretrained(path).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):  # a bare model folder: the checkpoint gets no tokenizer either
        tokenizer = None
    export_deepseek_v3(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite)
    print(f"wrote {args.out}: model_type deepseek_v3, loads with AutoModelForCausalLM.from_pretrained (no hf_attn_zoo)")
    if tokenizer is None:
        print(f"note: {args.model} has no tokenizer, so {args.out} has none; copy it there")
    return 0


def _analyze_head_usage(argv: list[str]) -> int:
    import torch

    import hf_attn_zoo

    parser = argparse.ArgumentParser(prog="hf-attn-zoo analyze head-usage")
    parser.add_argument("model", help="a patched checkpoint folder (or 'default' plus --patch options)")
    parser.add_argument(
        "--out", type=Path, default=Path("head_usage.png"), help="the plot (PNG; its JSON is written next to it)"
    )
    parser.add_argument("--corpus", default="python_stdlib_docs", help="held-out text to run the model on")
    parser.add_argument("--tokens", type=int, default=2048, help="held-out tokens to run the model on")
    parser.add_argument("options", nargs="*", help="patch options (key=value) to apply moh first, e.g. router=onorm")
    args = parser.parse_intermixed_args(argv)
    from transformers import AutoTokenizer

    from .assets.corpora import held_out_texts

    path = resolve_model(args.model)
    patches = [{"method": "moh", **parse_options(args.options)}] if args.options else None
    model = hf_attn_zoo.from_pretrained(path, patches=patches).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("\n\n".join(held_out_texts(args.corpus, 64)), return_tensors="pt").input_ids[:, : args.tokens]
    with torch.no_grad():
        for chunk in ids.split(512, dim=1):
            model(chunk)
    usage = hf_attn_zoo.analysis.head_usage(model)
    out = hf_attn_zoo.analysis.plot_head_usage(usage, args.out, title=f"head usage ({args.corpus})")
    print(f"mean active fraction {usage['mean_active_fraction']:.3f}; wrote {out} and {out.with_suffix('.json')}")
    return 0


def _analyze_experts(argv: list[str]) -> int:
    import hf_attn_zoo

    from .errors import InvalidOptionError

    parser = argparse.ArgumentParser(
        prog="hf-attn-zoo analyze experts",
        description="fTRI expert profiling (MoTE, arXiv:2502.11096): rank the MoE experts a behaviour class of "
        "prompts selects more often than the other classes.",
    )
    parser.add_argument("model", help="a MoE checkpoint folder (or hub id)")
    parser.add_argument(
        "--class",
        dest="classes",
        action="append",
        default=[],
        metavar="NAME=SOURCE",
        required=True,
        help="a behaviour class (two or more): SOURCE is corpus:NAME or a prompt file",
    )
    parser.add_argument("--target", required=True, help="the class whose experts are sought")
    parser.add_argument("--out", type=Path, default=Path("experts.png"), help="heat map PNG (JSON written next to it)")
    parser.add_argument("--prompts-per-class", type=int, default=32, help="at most this many prompts per class")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per prompt (longer ones are truncated)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass")
    parser.add_argument(
        "--contrast",
        choices=["mean", "max"],
        default="mean",
        help="score = target frequency minus the mean (or max) of the other classes",
    )
    parser.add_argument("--top", type=int, default=10, help="experts to print")
    args = parser.parse_intermixed_args(argv)
    from transformers import AutoTokenizer

    if args.prompts_per_class < 1:
        raise InvalidOptionError(f"--prompts-per-class must be >= 1, got {args.prompts_per_class}")
    prompt_sets: dict[str, list[str]] = {}
    for item in args.classes:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            raise InvalidOptionError(f"--class {item!r} is not NAME=SOURCE (SOURCE: corpus:NAME or a prompt file)")
        if name in prompt_sets:
            raise InvalidOptionError(f"--class {name!r} is given twice")
        prompt_sets[name] = read_prompts(source, count=args.prompts_per_class)[: args.prompts_per_class]
    path = resolve_model(args.model)
    model = hf_attn_zoo.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    profile = hf_attn_zoo.analysis.profile_experts(
        model,
        tokenizer,
        prompt_sets,
        target=args.target,
        batch_size=args.batch_size,
        max_length=args.max_length,
        contrast=args.contrast,
    )
    out = hf_attn_zoo.analysis.plot_expert_profile(profile, args.out, top=args.top)
    data = profile.to_json(out.with_suffix(".json"))
    sizes = ", ".join(
        f"{name}: {profile.prompts[name]} prompts, {profile.tokens[name]} tokens" for name in profile.classes
    )
    print(f"profiled {len(profile.layers)} MoE layers ({sizes})")
    print(f"top {args.top} experts for {args.target!r} (score = frequency minus the {args.contrast} of the others):")
    print("| rank | layer | expert | score | target freq |\n|---|---|---|---|---|")
    frequency = profile.frequency(args.target)
    row_of = {layer: i for i, layer in enumerate(profile.layers)}
    for rank, (layer, expert, score) in enumerate(profile.top(args.top), 1):
        print(f"| {rank} | {layer} | {expert} | {score:+.4f} | {frequency[row_of[layer]][expert]:.4f} |")
    print(f"wrote {out} and {data}")
    return 0


def _analyze_sinks(argv: list[str]) -> int:
    import hf_attn_zoo

    parser = argparse.ArgumentParser(
        prog="hf-attn-zoo analyze sinks",
        description="Primary (BOS-like) and secondary attention sinks (arXiv:2512.22213) per layer, on real text: "
        "attention mass each token receives, hidden-state norms, alignment with the first token, sink lifetimes.",
    )
    parser.add_argument(
        "model", help="a checkpoint folder or hub id, or 'default' (the embedded SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--out", type=Path, default=Path("sinks"), help="folder for sinks.json and the PNG plots")
    parser.add_argument("--corpus", default="python_stdlib_docs", help="held-out corpus the text is cut from")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--sequences", type=int, default=4, help="sequences, at evenly spaced offsets of the corpus")
    parser.add_argument("--epsilon", type=float, default=0.3, help="threshold of the fraction-of-heads metric")
    parser.add_argument(
        "--all-layers",
        action="store_true",
        help="flag sinks in every layer, not only the primary sink's layer range (the paper's clipper)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_intermixed_args(argv)
    from transformers import AutoTokenizer

    from .analysis.sinks import find_sinks, plot_sinks
    from .assets.corpora import held_out_texts
    from .errors import InvalidOptionError
    from .outputs import atomic_output, check_output

    if args.seq_len < 2 or args.sequences < 1:
        raise InvalidOptionError(f"--seq-len must be >= 2 and --sequences >= 1, got {args.seq_len}, {args.sequences}")
    check_output(args.out, args.overwrite)
    path = resolve_model(args.model)
    model = hf_attn_zoo.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    report = find_sinks(
        model,
        tokenizer=tokenizer,
        texts=held_out_texts(args.corpus),
        seq_len=args.seq_len,
        num_sequences=args.sequences,
        epsilon=args.epsilon,
        clip_layers=not args.all_layers,
    )
    report.meta.update(model=args.model, corpus=args.corpus)
    with atomic_output(args.out, overwrite=args.overwrite) as folder:
        report.to_json(folder / "sinks.json")
        plot_sinks(report, folder)
    secondary = report.secondary()
    print(
        f"primary sink at position {report.bos_position}, sink layers {report.sink_layers[0]}-{report.sink_layers[-1]}"
        f", its mass per layer up to {max(report.bos_mass):.3f}; {len(secondary)} secondary sinks in "
        f"{report.sequences} x {report.seq_len} tokens"
    )
    if secondary:
        print("| seq | position | token | layers | lifetime | peak mass (layer) | heads > eps |")
        print("|---|---|---|---|---|---|---|")
        for s in secondary:
            heads = max(s.heads_fraction) if s.heads_fraction else 0.0
            print(
                f"| {s.sequence} | {s.position} | {s.token!r} | {s.layers[0]}-{s.layers[-1]} | {s.lifetime} | "
                f"{s.peak_mass:.3f} ({s.peak_layer}) | {heads:.2f} |"
            )
    print(f"wrote {args.out}/sinks.json and {args.out}/sink_*.png")
    return 0


def _analyze_routing(argv: list[str]) -> int:
    import hf_attn_zoo

    parser = argparse.ArgumentParser(
        prog="hf-attn-zoo analyze routing",
        description="MoE routing stability (arXiv:2505.00792) per layer on held-out text: entropy of the gate "
        "distribution and of the expert selection, and the flip rate of the top-k under a small perturbation.",
    )
    parser.add_argument("model", help="a MoE checkpoint folder or hub id (patched or not)")
    parser.add_argument("--out", type=Path, default=Path("routing"), help="folder for routing.json and routing.png")
    parser.add_argument("--corpus", default="python_stdlib_docs", help="held-out corpus the text is cut from")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--sequences", type=int, default=8, help="sequences of held-out text")
    parser.add_argument(
        "--perturbation",
        choices=["noise", "replace"],
        default="noise",
        help="noise: Gaussian noise on the embeddings; replace: a fraction of the tokens replaced at random",
    )
    parser.add_argument(
        "--scale", type=float, default=0.05, help="noise std relative to the embeddings' RMS, or fraction replaced"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument(
        "options", nargs="*", help="graph_routing options (key=value) to apply first, e.g. mode=attention"
    )
    args = parser.parse_intermixed_args(argv)
    from transformers import AutoTokenizer

    from .analysis.routing_stability import (
        held_out_batches,
        plot_routing_stability,
        routing_stability,
        save_routing_stability,
    )
    from .errors import InvalidOptionError
    from .outputs import atomic_output, check_output

    if args.seq_len < 2 or args.sequences < 1:
        raise InvalidOptionError(f"--seq-len must be >= 2 and --sequences >= 1, got {args.seq_len}, {args.sequences}")
    check_output(args.out, args.overwrite)
    path = resolve_model(args.model)
    patches = [{"method": "graph_routing", **parse_options(args.options)}] if args.options else None
    model = hf_attn_zoo.from_pretrained(path, patches=patches).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batches = held_out_batches(tokenizer, args.corpus, args.seq_len, args.sequences)
    result = routing_stability(model, batches, perturbation=args.perturbation, scale=args.scale)
    result["model"], result["corpus"] = args.model, args.corpus
    with atomic_output(args.out, overwrite=args.overwrite) as folder:
        save_routing_stability(result, folder / "routing.json")
        plot_routing_stability(result, folder / "routing.png", title=f"routing stability ({args.corpus})")
    print("| layer | gate entropy | selection entropy | flip rate |\n|---|---|---|---|")
    for layer, row in {**result["layers"], "mean": result["mean"]}.items():
        print(f"| {layer} | {row['gate_entropy']:.4f} | {row['selection_entropy']:.4f} | {row['flip_rate']:.4f} |")
    print(f"{result['tokens']} tokens; wrote {args.out}/routing.json and {args.out}/routing.png")
    return 0


def _analyze_report(argv: list[str]) -> int:
    import hf_attn_zoo

    from .analysis.report import SECTIONS, write_report

    parser = argparse.ArgumentParser(
        prog="hf-attn-zoo analyze report",
        description="One page per model (Markdown, HTML, JSON, plots): head usage, expert usage, attention sinks and "
        "routing stability, measured on the same held-out text.",
    )
    parser.add_argument("model", help="a checkpoint folder (patched or not) or hub id, or 'default'")
    parser.add_argument("--out", type=Path, default=Path("report"), help="folder for report.md/.html/.json and plots")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {','.join(SECTIONS)}")
    parser.add_argument("--corpus", default="python_stdlib_docs", help="held-out corpus the texts come from")
    parser.add_argument("--texts", type=int, default=8, help="texts to run the model on")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per text (longer ones are cut)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_intermixed_args(argv)
    from transformers import AutoTokenizer

    from .assets.corpora import held_out_texts
    from .errors import InvalidOptionError
    from .outputs import check_output

    if args.texts < 1 or args.max_length < 8:
        raise InvalidOptionError(f"--texts must be >= 1 and --max-length >= 8, got {args.texts}, {args.max_length}")
    check_output(args.out, args.overwrite, "report folder")
    path = resolve_model(args.model)
    model = hf_attn_zoo.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    out = write_report(
        model,
        tokenizer,
        args.out,
        texts=held_out_texts(args.corpus),
        num_texts=args.texts,
        max_length=args.max_length,
        sections=[s for s in args.sections.split(",") if s],
        title=f"hf-attn-zoo report: {args.model}",
        overwrite=args.overwrite,
    )
    print(f"wrote {out}, {out.with_suffix('.html')} and {out.with_suffix('.json')}")
    return 0


_ANALYSES = {
    "head-usage": _analyze_head_usage,
    "experts": _analyze_experts,
    "sinks": _analyze_sinks,
    "routing": _analyze_routing,
    "report": _analyze_report,
}


def analyze_main(argv: list[str]) -> int:
    if not argv or argv[0] not in _ANALYSES:
        parser = argparse.ArgumentParser(prog="hf-attn-zoo analyze")
        parser.add_argument(
            "what",
            choices=list(_ANALYSES),
            help="head-usage (MoH), experts (fTRI, MoE), sinks, routing (MoE) or report (all of them on one page)",
        )
        parser.parse_args(argv[:1])  # prints the help, or the choices error, and exits
        return 2
    return _ANALYSES[argv[0]](argv[1:])


_COMMANDS = {
    "methods": ("hf_attn_zoo.cli", "methods_main"),
    "families": ("hf_attn_zoo.cli", "families_main"),
    "patch": ("hf_attn_zoo.cli", "patch_main"),
    "push": ("hf_attn_zoo.sharing.push", "push_main"),
    "upcycle": ("hf_attn_zoo.upcycling.cli", "upcycle_main"),
    "mla-export": ("hf_attn_zoo.cli", "mla_export_main"),
    "upcycle-study": ("hf_attn_zoo.upcycling.pipeline", "pipeline_main"),
    "moh-study": ("hf_attn_zoo.studies.moh", "moh_study_main"),
    "plan": ("hf_attn_zoo.planning.cli", "plan_main"),
    "analyze": ("hf_attn_zoo.cli", "analyze_main"),
    "moa": ("hf_attn_zoo.moa.cli", "main"),
    "tune": ("hf_attn_zoo.tuning.cli", "tune_main"),
    "validate": ("hf_attn_zoo.tuning.cli", "validate_main"),
    "eval": ("hf_attn_zoo.eval_harness.cli", "eval_main"),
    "report": ("hf_attn_zoo.eval_harness.cli", "report_main"),
    "demo": ("hf_attn_zoo.demo", "demo_main"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        from .version import __version__

        print(f"hf-attn-zoo {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .errors import ZooError

    if command not in _COMMANDS:
        print(f"hf-attn-zoo: unknown command {command!r}\n\n{_USAGE}", file=sys.stderr)
        return EXIT_USAGE
    module, function = _COMMANDS[command]
    try:
        # subcommands import their (heavy) dependencies only when they run
        return getattr(importlib.import_module(module), function)(rest)
    except ZooError as error:
        print(f"hf-attn-zoo {command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exit_:  # argparse: 0 after --help, 2 on bad arguments
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or EXIT_OK
        print(exit_.code, file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"hf-attn-zoo {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
