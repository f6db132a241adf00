"""Check that a recipe trains the same with 1 process and with 2 DDP processes (gloo, CPU) at the same global batch.

    python scripts/ddp_check.py                          # moh/smollm2_quick on a tiny SmolLM2-shaped model, 4 steps
    python scripts/ddp_check.py --recipe dense/smollm2_quick --steps 6
    python scripts/ddp_check.py --model default          # the real SmolLM2-135M (minutes per step on 2 CPU cores)
    python scripts/ddp_check.py --exact                  # balance losses off: per-step losses must match to --tol

The 2-process run uses `torchrun --nproc_per_node 2` (`accelerate launch --cpu --num_processes 2` silently runs one
process). One process runs `batch_size` blocks per step and each of the two runs half, so both see the same blocks
(accelerate shards the batches of the same seeded sampler). Load-balance losses are computed over each process's own
batch, so with them on the two curves differ slightly by construction; `--exact` sets them to 0.
Exit status 0 when the largest per-step loss difference is within `--tol`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_tiny_model(out: Path) -> Path:
    """A random 2-layer model with SmolLM2's head layout (9 query / 3 KV heads) and tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import hf_attn_zoo

    source = hf_attn_zoo.assets.default_model_path()
    config = AutoConfig.from_pretrained(source)
    config.update(
        dict(
            hidden_size=144,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=16,
        )
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(recipe: str, overrides: list[str], out: Path, nproc: int, batch: int) -> dict:
    args = [
        recipe,
        *overrides,
        f"output_dir={out}",
        f"train.batch_size={batch}",
        "train.resume=false",
        "train.save_steps=null",
        "data.held_out_fraction=0",
        "eval=null",
    ]
    if nproc == 1:
        command = [sys.executable, "-m", "hf_attn_zoo.tuning", "tune", *args]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}",
            "-m",
            "hf_attn_zoo.tuning",
            "tune",
            *args,
        ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(f"{nproc}-process run failed (exit {done.returncode})")
    return json.loads((out / "result.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="moh/smollm2_quick")
    parser.add_argument("--model", default="tiny", help="'tiny' (random, SmolLM2-shaped), 'default', or a folder")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4, help="global batch (blocks per step); even")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--exact", action="store_true", help="turn the patches' balance losses off")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides (key=value)")
    parser.add_argument("--keep", action="store_true", help="keep the run folders (printed) instead of deleting them")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ddp_check_"))
    try:
        return compare(args, work)
    finally:
        if args.keep:
            print(f"runs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def compare(args: argparse.Namespace, work: Path) -> int:
    model = {"tiny": None, "default": "default"}.get(args.model, args.model)
    if model is None:
        model = str(make_tiny_model(work / "tiny_model"))
    overrides = [
        f"model.path={model}",
        f"train.max_steps={args.steps}",
        f"data.seq_len={args.seq_len}",
        "train.logging_steps=1",
        *args.overrides,
    ]
    if args.exact:
        from hf_attn_zoo.tuning import load_recipe

        patches = load_recipe(args.recipe).patches
        overrides += [f"patches.{i}.balance_loss_weight=0" for i, p in enumerate(patches) if p.method == "moh"]

    one = run(args.recipe, overrides, work / "one", 1, args.batch)
    two = run(args.recipe, overrides, work / "two", 2, args.batch // 2)
    aux_one, aux_two = dict(one["aux_loss_history"]), dict(two["aux_loss_history"])
    print(f"{args.recipe} on {args.model}: global batch {args.batch} x {args.seq_len} tokens, {args.steps} steps")
    print(f"{'step':>4} {'loss 1 proc':>12} {'loss 2 proc':>12} {'|diff|':>10} {'aux 1':>9} {'aux 2':>9}")
    worst = 0.0
    for (step, a), (_, b) in zip(one["loss_history"], two["loss_history"]):
        worst = max(worst, abs(a - b))
        aux = f"{aux_one.get(step, float('nan')):9.5f} {aux_two.get(step, float('nan')):9.5f}"
        print(f"{step:>4} {a:12.6f} {b:12.6f} {abs(a - b):10.2e} {aux}")
    ok = worst <= args.tol and len(one["loss_history"]) == len(two["loss_history"]) == args.steps
    print(f"max |diff| {worst:.2e} (tolerance {args.tol:g}): {'OK' if ok else 'MISMATCH'}")
    print(
        f"train tokens/s: 1 process {one['train_tokens_per_second']:.0f}, "
        f"2 processes {two['train_tokens_per_second']:.0f}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
