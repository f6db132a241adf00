"""Command-line pieces for `hf-attn-zoo tune` and `hf-attn-zoo validate` (wired into `hf_attn_zoo/cli.py`).

Also runnable on its own, which is what multi-process launchers start (`--nproc N` runs this under torchrun):

    hf-attn-zoo tune moh/smollm2_quick --nproc 2
    torchrun --nproc_per_node 2 -m hf_attn_zoo.tuning tune moh/smollm2_quick train.max_steps=10
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import ZooError

__all__ = ["main", "tune_main", "validate_main"]


def tune_main(argv: Sequence[str] | None = None) -> int:
    """`hf-attn-zoo tune RECIPE [key=value ...]`: run a recipe (a path, or a shipped recipe's name).

    Returns:
        `int`: 0 on success, 2 when the recipe or an asset is invalid or missing (the message goes to stderr).
    """
    parser = argparse.ArgumentParser(
        prog="hf-attn-zoo tune",
        description="Continue-tune a model as a YAML recipe says. Dotted overrides follow the recipe, e.g. "
        "`hf-attn-zoo tune moh/smollm2_quick optim.lr=1e-4 train.what=all`.",
    )
    parser.add_argument("recipe", help="a recipe file, or the name of a shipped recipe (e.g. moh/smollm2_quick)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides (train.max_steps=10)")
    parser.add_argument("--print", action="store_true", help="print the resolved recipe and exit")
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train in N processes on this machine (torchrun; GPUs, or CPU processes over gloo where there are "
        "none); the recipe's train.distributed picks ddp, fsdp or deepspeed",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start over: empty the recipe's output_dir first (only a tuning run folder). Without it a finished run "
        "of the same recipe is reported and not retrained, and a run of a changed recipe is refused (set "
        "train.allow_recipe_change=true to continue it anyway)",
    )
    args = parser.parse_intermixed_args(argv)  # flags may come after the overrides
    if args.nproc < 1:
        parser.error(f"--nproc must be at least 1, got {args.nproc}")
    try:
        from .recipe import load_recipe

        # validated here, before any process starts: a bad recipe fails once, not once per process
        recipe = load_recipe(args.recipe, args.overrides)
        if args.print:
            print(recipe.to_yaml(), end="")
            return 0
        if args.nproc > 1:
            from .distributed import launch, world_size

            if world_size() > 1:
                parser.error("--nproc starts the processes itself; do not combine it with torchrun / accelerate")
            return launch(args.nproc, [args.recipe, *args.overrides, *(["--overwrite"] if args.overwrite else [])])
        from .distributed import finish
        from .train import run_recipe

        result = run_recipe(recipe, overwrite=args.overwrite)
        finish()
    except ZooError as exc:
        print(f"hf-attn-zoo tune: error: {exc}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") != "0":
        return 0  # one summary per run, from the main process
    held_out = f", held-out loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    final = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    if result.already_finished:
        print(
            f"already finished: {result.output_dir} holds a finished run of this recipe ({result.global_step} steps, "
            f"last training loss {final}{held_out}); nothing trained; model in {result.final_dir} "
            "(--overwrite starts over)"
        )
        return 0
    print(
        f"done: {result.global_step} steps, last training loss {final}{held_out}, "
        f"{result.train_tokens_per_second:.0f} train tokens/s; model in {result.final_dir}"
    )
    return 0


def validate_main(argv: Sequence[str] | None = None) -> int:
    """`hf-attn-zoo validate [PATH ...]`: validate recipes (default: every shipped recipe).

    A folder argument is searched recursively for `*.yaml` (files under `_base/` folders are fragments and skipped).

    Returns:
        `int`: 0 when every recipe is valid, 1 when one is not, 2 when a given recipe does not exist.
    """
    parser = argparse.ArgumentParser(prog="hf-attn-zoo validate", description="Validate tuning recipes.")
    parser.add_argument("paths", nargs="*", help="recipe files or folders (default: the shipped recipes)")
    args = parser.parse_intermixed_args(argv)
    from .recipe import find_recipe, load_recipe, shipped_recipes

    files: list[Path] = []
    try:
        for given in args.paths:
            path = Path(given)
            if path.is_dir():
                files += sorted(p for p in path.rglob("*.yaml") if "_base" not in p.relative_to(path).parts)
            else:
                files.append(find_recipe(given))
    except ZooError as exc:
        print(f"hf-attn-zoo validate: error: {exc}", file=sys.stderr)
        return 2  # a recipe that is not there is a usage error; 1 is for invalid ones
    if not args.paths:
        files = shipped_recipes()
    failed = 0
    for file in files:
        try:
            load_recipe(file)
        except ZooError as exc:
            failed += 1
            print(f"FAIL {exc}", file=sys.stderr)
        else:
            print(f"ok   {file}")
    print(f"validated {len(files)} recipe(s): {len(files) - failed} ok, {failed} failed")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m hf_attn_zoo.tuning {tune,validate} ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"tune": tune_main, "validate": validate_main}
    if not argv or argv[0] not in commands:
        print("usage: python -m hf_attn_zoo.tuning {tune,validate} ...", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
