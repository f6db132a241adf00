"""The upcycling study on SmolLM2, end to end: specialists -> sparse / BTX / BAM MoEs -> mixture tuning -> eval.

1. *Branch-train*: continue-tune SmolLM2 on each domain corpus (`upcycling/specialist_<domain>_quick` recipes:
   Python docs, the King James Bible, Shakespeare) into dense specialists.
2. *Mix*: build `sparse` (4 seed copies), `btx` and `bam` MoEs from the seed + the 3 specialists (4 experts, top-1 FFN
   routing as in BAM's experiments, random routers, averaged norms and embeddings).
3. Continue-tune each MoE and the dense seed on the domain mixture with the same recipe and token budget
   (`upcycling/mixture_quick`).
4. Evaluate every model: held-out perplexity per domain and lm-eval tasks of the offline pack; write
   `report.md/json/png`.

Every stage is cached under `<cache>/upcycling/smollm2_quick` (or `--out`; a folder holding anything else is refused,
`--overwrite` starts over), so a rerun only does what is missing and
`moe_checkpoint("bam")` is one call for other work (e.g. MoE inference methods) that needs a real small MoE.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..assets.model import cache_dir

__all__ = [
    "DOMAINS",
    "build_moes",
    "cached_moe",
    "evaluate_models",
    "moe_checkpoint",
    "pipeline_main",
    "pipeline_root",
    "train_specialists",
    "tune_on_mixture",
]

logger = logging.getLogger(__name__)

DOMAINS = {"code": "python_docs", "bible": "bible_kjv", "shakespeare": "shakespeare"}
MODES = ("sparse", "btx", "bam")
DEFAULT_TASKS = ("zoo_arc_easy", "zoo_hellaswag", "zoo_piqa")


_STAGES = ("specialists", "moe", "tuned", "report")


def pipeline_root(root: str | Path | None = None) -> Path:
    return Path(root) if root is not None else cache_dir() / "upcycling" / "smollm2_quick"


def _claim(root: str | Path | None, overwrite: bool = False) -> Path:
    """The study's folder: its own cache (reused stage by stage) or empty; a folder holding anything else is refused,
    `overwrite` empties it first."""
    from ..outputs import claim_folder

    return claim_folder(pipeline_root(root), "upcycle-study", overwrite, own=_STAGES)


def _final(run_dir: Path) -> Path | None:
    final = run_dir / "final"
    return final if (final / "config.json").is_file() else None


def _tune(recipe: str, run_dir: Path, overrides: Sequence[str] = ()) -> Path:
    from ..tuning.train import run_recipe

    done = _final(run_dir)
    if done is not None:
        logger.info("cached: %s", done)
        return done
    result = run_recipe(recipe, overrides=[f"output_dir={run_dir}", *overrides])
    return result.final_dir


def train_specialists(root: str | Path | None = None, domains: Sequence[str] = tuple(DOMAINS)) -> dict[str, Path]:
    """Stage 1: one dense specialist per domain (cached)."""
    root = _claim(root)
    return {d: _tune(f"upcycling/specialist_{d}_quick", root / "specialists" / d) for d in domains}


def build_moes(
    specialists: dict[str, Path], root: str | Path | None = None, modes: Sequence[str] = MODES, seed: str = "default"
) -> dict[str, Path]:
    """Stage 2: the sparse / BTX / BAM MoEs (cached); returns `{mode: folder}` and writes `build.json` timings."""
    from .build import upcycle

    root = _claim(root)
    out: dict[str, Path] = {}
    for mode in modes:
        folder = root / "moe" / mode
        if not (folder / "config.json").is_file():
            started = time.perf_counter()
            experts = [] if mode == "sparse" else list(specialists.values())
            # a folder without config.json is what an interrupted build of this study left: ours to replace
            upcycle(
                seed,
                experts,
                mode=mode,
                num_experts=len(specialists) + 1 if mode == "sparse" else None,
                top_k=1,
                router_init="random",
                output_dir=folder,
                overwrite=True,
            )
            (folder / "build.json").write_text(json.dumps({"seconds": time.perf_counter() - started}))
        out[mode] = folder
    return out


def tune_on_mixture(
    models: dict[str, str | Path],
    root: str | Path | None = None,
    recipe: str = "upcycling/mixture_quick",
    overrides: Sequence[str] = (),
) -> dict[str, Path]:
    """Stage 3: continue-tune every model on the domain mixture with one recipe (same data, steps, tokens)."""
    from transformers import AutoConfig

    from ..assets.model import resolve_model
    from ..families.spec import resolve_family

    root = _claim(root)
    out = {}
    for name, path in models.items():
        extra = [f"model.path={path}", *overrides]
        if resolve_family(AutoConfig.from_pretrained(resolve_model(path))).mlp.kind == "dense":
            extra.append("moe=null")  # the dense baseline: same data and steps, no router losses
        out[name] = _tune(recipe, root / "tuned" / name, extra)
    return out


def evaluate_models(
    models: dict[str, str | Path],
    out_dir: str | Path,
    tasks: Sequence[str] = DEFAULT_TASKS,
    limit: int | None = 100,
    ppl_blocks: int = 8,
) -> dict[str, Path]:
    """Stage 4: held-out perplexity per domain + lm-eval tasks for every model; `report.md/json/png` in `out_dir`."""
    import torch
    from transformers import AutoTokenizer

    from ..analysis.perplexity import held_out_perplexity
    from ..assets.model import resolve_model
    from ..eval_harness.report import write_report
    from ..eval_harness.runner import evaluate
    from ..loading import from_pretrained

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    for name, path in models.items():
        cached = out_dir / f"{name}.json"
        if cached.is_file():
            results[name] = json.loads(cached.read_text())
            continue
        path = resolve_model(path)
        model = from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        res: dict[str, Any] = {"results": {}, "higher_is_better": {}, "config": {"model": str(path)}}
        for domain, corpus in DOMAINS.items():
            ppl = held_out_perplexity(model, tokenizer, corpus, max_blocks=ppl_blocks)
            res["results"][f"ppl_{domain}"] = {"alias": f"held-out ppl: {corpus}", "perplexity,none": ppl}
            res["higher_is_better"][f"ppl_{domain}"] = {"perplexity": False}
        if tasks:
            lm = evaluate(
                model, list(tasks), limit=limit, tokenizer=tokenizer, batch_size=8, model_args={"efficiency": False}
            )
            for key in ("results", "higher_is_better", "n-samples", "configs", "versions", "n-shot"):
                if isinstance(lm.get(key), dict):
                    res.setdefault(key, {}).update(lm[key])
        res["config"]["parameters"] = sum(p.numel() for p in model.parameters())
        cached.write_text(json.dumps(res, default=str))
        results[name] = res
        del model
    return write_report(results, out_dir)


def cached_moe(mode: str = "btx", root: str | Path | None = None) -> Path | None:
    """The study's `mode` MoE if it is cached (mixture-tuned when that exists, else as built), without building it."""
    root = pipeline_root(root)
    for folder in (root / "tuned" / mode / "final", root / "moe" / mode):
        if (folder / "config.json").is_file():
            return folder
    return None


def moe_checkpoint(mode: str = "bam", tuned: bool = True, root: str | Path | None = None) -> Path:
    """A real small MoE built from SmolLM2 (built and cached on first use: about 10 CPU minutes, more if tuned)."""
    specialists = train_specialists(root)
    built = build_moes(specialists, root, modes=[mode])
    if not tuned:
        return built[mode]
    return tune_on_mixture({mode: built[mode]}, root)[mode]


def pipeline_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-attn-zoo upcycle-study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="cache/work folder (default: <cache>/upcycling/smollm2_quick)")
    parser.add_argument(
        "--modes", nargs="+", default=list(MODES), choices=MODES, help="the upcycling modes to build and compare"
    )
    parser.add_argument("--tasks", nargs="*", default=list(DEFAULT_TASKS), help="lm-eval tasks (none: skip)")
    parser.add_argument("--limit", type=int, default=100, help="lm-eval examples per task")
    parser.add_argument(
        "--stage", choices=["specialists", "build", "tune", "all"], default="all", help="stop after this stage"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start over: empty --out first (a folder that is not this study's cache is refused "
        "otherwise; the study's own cache is reused stage by stage)",
    )
    args = parser.parse_intermixed_args(argv)
    root = _claim(args.out, args.overwrite)
    specialists = train_specialists(root)
    print("specialists:", {k: str(v) for k, v in specialists.items()})
    if args.stage == "specialists":
        return 0
    built = build_moes(specialists, root, args.modes)
    print("MoEs:", {k: str(v) for k, v in built.items()})
    if args.stage == "build":
        return 0
    tuned = tune_on_mixture({"dense": "default", **built}, root)
    if args.stage == "tune":
        return 0
    models: dict[str, Any] = {
        "seed": "default",
        **{f"spec_{k}": v for k, v in specialists.items()},
        **{f"{k} (untuned)": v for k, v in built.items()},
        **{f"{k} (tuned)": v for k, v in tuned.items()},
    }
    paths = evaluate_models(models, root / "report", args.tasks, args.limit)
    print(Path(paths["md"]).read_text())
    print(f"wrote {paths['md']}, {paths['png']}")
    return 0
