"""`hf-attn-zoo eval` (lm-eval's own command line, plugin registered, task pack included) and `hf-attn-zoo report`.

hf-attn-zoo eval --model_args pretrained=DIR --tasks zoo_arc_easy --limit 10 --output_path out/base
hf-attn-zoo eval --model_args pretrained=DIR,patch=moh,patch_options=router:onorm --tasks zoo_suite -o out/moh
hf-attn-zoo report out/base out/moh --names base,moh --out report/
hf-attn-zoo eval --task-path        # the pack's folder, for plain `lm_eval ... --include_path`
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path


__all__ = ["eval_main", "report_main"]


@contextlib.contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def eval_main(argv: list[str]) -> int:
    """Run lm-eval's CLI with the `hf-attn-zoo` model registered and the `zoo_*` task pack on the include path.

    Every lm-eval flag works (`lm-eval run --help`). Differences: `--model` defaults to `hf-attn-zoo` and
    `--batch_size` to 8 (where a `--config` file does not set them), and `--include_path` (one folder, or several joined
    with the OS path separator) is searched after the pack. The subcommands `ls` and `validate` also see the pack:
    `hf-attn-zoo eval ls tasks`. `hf-attn-zoo eval --task-path` prints the pack's folder.

    Args:
        argv (`list[str]`): The arguments after `eval`.

    Returns:
        `int`: The exit status.
    """
    from hf_attn_zoo.eval_harness import MODEL_NAME  # registers the model class with lm-eval
    from hf_attn_zoo.eval_harness.runner import DEFAULT_BATCH_SIZE
    from hf_attn_zoo.eval_harness.tasks import TASKS_DIR

    if argv == ["--task-path"]:
        print(TASKS_DIR)
        return 0
    from lm_eval._cli import HarnessCLI
    from lm_eval.config.evaluate_config import EvaluatorConfig
    from lm_eval.utils import setup_logging

    setup_logging()
    try:
        with _argv(["hf-attn-zoo eval", *argv]):
            cli = HarnessCLI()
            args = cli.parse_args()
        if hasattr(args, "include_path"):
            extra = [p for p in (args.include_path or "").split(os.pathsep) if p]
            # lm-eval 0.4 hands include_path straight to TaskManager, which takes a list of folders.
            args.include_path = [str(TASKS_DIR), *extra]
        if getattr(args, "command", None) == "run":
            config = getattr(args, "config", None)
            from_yaml = EvaluatorConfig.load_yaml_config(config) if config else {}
            for key, value in (("model", MODEL_NAME), ("batch_size", str(DEFAULT_BATCH_SIZE))):
                if not getattr(args, key, None) and key not in from_yaml:
                    setattr(args, key, value)
        cli.execute(args)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return 0


def _report_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-attn-zoo report",
        description="Put lm-eval results of several models side by side: report.md, report.json, report.png.",
    )
    parser.add_argument("results", nargs="+", help="lm-eval results_*.json files or the folders lm-eval wrote.")
    parser.add_argument(
        "--names", default=None, help="Comma-separated model names, one per result (default: the file or folder names)."
    )
    parser.add_argument(
        "--out",
        default="report",
        help="Output folder (default: ./report); one that already holds something is refused.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace --out if it already holds something.")
    parser.add_argument(
        "--include_subtasks", action="store_true", help="Also list the members of groups (e.g. every MMLU subject)."
    )
    return parser


def report_main(argv: list[str]) -> int:
    """Write `report.md`, `report.json` and `report.png` comparing lm-eval result files or folders.

    Args:
        argv (`list[str]`): The arguments after `report`.

    Returns:
        `int`: The exit status (2 on bad arguments, as argparse does).
    """
    from hf_attn_zoo.eval_harness.report import write_report

    parser = _report_parser()
    try:
        args = parser.parse_intermixed_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.names is not None:
        names = [n.strip() for n in args.names.split(",")]
        if len(names) != len(args.results) or not all(names):
            print(
                f"hf-attn-zoo report: --names gives {len(names)} names for {len(args.results)} results", file=sys.stderr
            )
            return 2
    else:
        names = [Path(r).stem if Path(r).is_file() else Path(r).name for r in args.results]
    if len(set(names)) != len(names):
        print(f"hf-attn-zoo report: model names must be unique, got {names}; pass --names", file=sys.stderr)
        return 2
    from hf_attn_zoo.outputs import atomic_output

    try:
        with atomic_output(args.out, args.overwrite, what="report folder") as tmp:
            written = write_report(dict(zip(names, args.results)), tmp, include_subtasks=args.include_subtasks)
        paths = {key: Path(args.out) / path.name for key, path in written.items()}
    except (FileNotFoundError, ValueError) as err:
        print(f"hf-attn-zoo report: {err}", file=sys.stderr)
        return 1
    for path in paths.values():
        print(path)
    return 0
