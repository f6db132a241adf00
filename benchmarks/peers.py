"""Peers, side by side in one run: each tool of ours against the tool people use for the same job, on the same inputs.

Every number is a ratio `ours / peer` measured in this run on this machine (CPU, fp32): below 1 we are faster or
leaner; absolute times are not claims (`--json` keeps the raw seconds and MiB). Time is given twice: wall time (what a
user waits) and CPU time (user + system seconds of every thread: the work done, steadier when other jobs share the
machine; each section prints the load average). `OMP_WAIT_POLICY=PASSIVE` is set (unless given) for this process and
every child: with spinning OpenMP waits, one burst of another job's load can stretch a call many times over. Equality
columns say where both sides compute the same thing.

1. **Upcycling**: `hf-attn-zoo upcycle --mergekit FILE` against `mergekit-moe FILE` on the *same* mergekit-moe YAML:
   a base and 3 more experts (copies of it whose MLPs carry 1% relative noise, written as safetensors folders; the
   embedded SmolLM2-135M, or a tiny random Llama with `--smoke`), 4 experts, top-2, float32, Mixtral output,
   safetensors, CPU. Each command runs as its own process: wall and CPU time of the whole command and its peak RSS
   (`os.wait4`'s rusage, taken by a small launcher process so that this process's size does not leak into it; the
   same for both), best of `--repeats`, the two tools alternating. Gate modes `random` (tensor copying only) and
   `hidden` (routers from hidden states on each expert's prompts: forward passes of the base). Compared tensor by
   tensor: expert MLPs, attention, norms and embeddings must be bit-identical (both take non-expert weights from
   `base_model`); the routers differ by design (mergekit: `random` is N(0, 1), `hidden` uses
   the residual stream before the norm of a bfloat16 forward; ours: `random` is scaled by `initializer_range`,
   `hidden` uses the normalised layer input the router sees, centred over experts). Also checked: mergekit's folder
   loads with `hf_attn_zoo.from_pretrained`, and with its routers copied into ours both give the same logits; its
   Qwen2-MoE output (`architecture: qwen`, one shared expert) loads too, but our `--mergekit` does not build it.
2. **Sliding window**: the `sliding_window` patch (`sinks=0`: causal 1-D neighbourhood attention, kernel size W) on
   SmolLM2's first `--layers` layers (its widths and weights; `--smoke`: a tiny random Llama) against transformers'
   own sliding-window attention: the same weights in a `MistralForCausalLM` with `sliding_window=W`, through `sdpa`
   and through `flex_attention` (compiled by transformers; compilation stays in untimed warm-ups). First the final
   hidden states at every position must agree (max |diff| reported), then per length: prefill (`model(ids,
   logits_to_keep=1)` with a cache, best of `--repeats`), its peak memory (the rise of the process's peak RSS over the
   call, reset through /proc/self/clear_refs after `malloc_trim`, the same for every row) and decode per token (median
   over `--decode` single-token steps through each side's cache; the logits must agree too). Timed calls alternate
   between the models. On torch 2.13 CPU, transformers' `flex_attention` cannot decode: inductor's CPU flex-decoding
   kernel fails to compile (the cell says so; the benchmark then resets dynamo, whose next prefill would fail the same
   way). Then the attention kernel alone against NATTEN's `na1d(..., is_causal=True)` (9 query / 3 KV heads, head dim
   64, batch 1), each in a fresh process of its own environment, outputs compared.
3. **lm-eval**: our lm-eval model class `hf-attn-zoo` (as users get it, and without its efficiency probe where it has
   one) against lm-eval's own `hf` on the unpatched default model, the offline pack's `zoo_arc_easy` and
   `zoo_hellaswag` with `--limit`: scores and every per-request log-likelihood must be equal; wall and CPU time of
   `simple_evaluate` (model loading included) and the process's peak RSS, each run its own process.

Peer environment: mergekit and NATTEN are installed into `.venv-peers/` at the repository root (gitignored), created
on first use with the same torch and transformers versions as this environment, so the comparison is of the tools,
not of library versions: `torch==<ours>` first (the CPU build, as the Makefile does), then `mergekit` with
`transformers==<ours>`, then NATTEN built against that torch (`--no-build-isolation`; without CUDA it builds no
libnatten). `--setup` only creates it, `--rebuild-env` recreates it. mergekit 0.1.5 accepts transformers 5, so its
pins do not clash with ours today; the separate environment keeps the peers' packages out of `.venv`. A peer that
cannot be installed or run is skipped with the reason printed in its table. A run exits 1 when an equality fails.

Usage: python benchmarks/peers.py [--out peers.md] [--json raw.json] [--only upcycle,sliding_window,lm_eval]
       python benchmarks/peers.py --smoke   (tiny models, short lengths: checks the script in about a minute)
       python benchmarks/peers.py --setup   (only create .venv-peers)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# before torch loads OpenMP: waiting threads sleep instead of spinning. On a machine shared with other jobs a spinning
# wait can stretch a call many times over (and counts as CPU time); it costs every side alike (children inherit it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from hf_attn_zoo.eval_harness.efficiency import process_peak, reset_process_peak  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PEER_ENV = ROOT / ".venv-peers"
PEER_PINS = {"mergekit": "0.1.5", "natten": "0.21.7"}
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
SECTIONS = ("upcycle", "sliding_window", "lm_eval")
# raw measurements (seconds, MiB) behind the ratios, written by `--json`; the tables print only ratios
RAW: dict[str, Any] = {}


# ----------------------------------------------------------------------------------------------------------------
# measuring


@dataclass
class Run:
    """One command run as its own process: wall seconds, CPU seconds (user + system, all its threads), its peak RSS
    (MiB) and its output."""

    seconds: float
    cpu_seconds: float
    peak_mib: float
    returncode: int
    output: str


# Spawns the measured command and reports its rusage. Measuring from a small launcher matters: a child started by this
# (large) process gets `ru_maxrss` of at least this process's own peak RSS, because Linux keeps the high-water mark of
# the address space an exec replaces (the vfork'ed parent's, or fork's copy of it): a 2 GiB parent makes `python -c
# pass` report 2 GiB. The launcher's own address space is a few MiB.
_LAUNCHER = r"""
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
seconds = time.perf_counter() - start
report = {"seconds": seconds, "cpu": usage.ru_utime + usage.ru_stime, "maxrss_kib": usage.ru_maxrss}
report["returncode"] = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as out:
    json.dump(report, out)
"""


def run_measured(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Run:
    """Run `cmd` to completion through `_LAUNCHER`: wall and CPU seconds, and its own peak RSS (`os.wait4`)."""
    report = log.with_suffix(".rusage.json")
    with open(log, "w") as out:
        subprocess.run(
            [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(report), *cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            check=True,
        )
    r = json.loads(report.read_text())
    return Run(r["seconds"], r["cpu"], r["maxrss_kib"] / 1024, r["returncode"], log.read_text(errors="replace"))


def load_note() -> str:
    """The machine's 1-minute load average over its cores: other jobs share it, so wall times carry their noise."""
    return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


class Timer:
    """Wall (`perf_counter`) and CPU (`process_time`: user + system of every thread of this process) seconds."""

    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def peak_during(fn: Callable[[], Any]) -> tuple[Any, float | None]:
    """`(fn(), MiB)`: how far the process's peak RSS rose above its RSS at the start of the call.

    Freed heap memory is returned to the OS first (`malloc_trim`) and the kernel's peak counter is reset to the
    current RSS (`reset_process_peak`), so earlier calls do not hide this one's peak. None where /proc does not allow
    it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        base = reset_process_peak()
    except OSError:
        return fn(), None
    result = fn()
    return result, (process_peak() - base) / 2**20


def _ratio(ours: float | None, peer: float | None, digits: int = 2) -> str:
    if ours is None or peer is None or peer <= 0:
        return "n/a"
    return f"{ours / peer:.{digits}f}"


def _fmt_diff(value: float) -> str:
    return "0" if value == 0 else f"{value:.1e}"


def _tail(text: str, lines: int = 4) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip() and "WARNING: Location" not in line]
    return " / ".join(kept[-lines:])[-400:]


# ----------------------------------------------------------------------------------------------------------------
# the peer environment


@dataclass
class PeerEnv:
    """The peers' virtual environment: its python, the installed peer versions, and why a peer is missing."""

    path: Path
    versions: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)

    def bin(self, name: str) -> str:
        return str(self.path / "bin" / name)

    @property
    def python(self) -> str:
        return self.bin("python")


def _our_pins() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__, **PEER_PINS}


def ensure_peer_env(path: Path = PEER_ENV, rebuild: bool = False) -> PeerEnv:
    """Create (first use, changed pins, or `rebuild`) or reuse the peers' environment; never raises for a peer that
    fails to install: its reason is kept in `missing`."""
    pins = _our_pins()
    marker = path / "peers.json"
    if not rebuild and marker.is_file():
        recorded = json.loads(marker.read_text())
        if recorded.get("pins") == pins:
            return PeerEnv(path, recorded.get("versions", {}), recorded.get("missing", {}))
    print(
        f"peers: creating {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} (first use, or pins "
        f"changed): torch {pins['torch']} and transformers {pins['transformers']} as here, mergekit "
        f"{pins['mergekit']}, natten {pins['natten']} (about a minute with pip's cache; `--setup` does only this)",
        flush=True,
    )
    if path.exists():
        shutil.rmtree(path)
    env = PeerEnv(path)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as err:
        reason = f"python -m venv failed: {_tail(err.stdout + err.stderr)}"
        return PeerEnv(path, {}, {"mergekit": reason, "natten": reason})
    pip = [env.python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    steps = {
        # torch first and pinned in every step, so no dependency pulls another (CUDA) build
        "torch": [pip + [f"torch=={pins['torch']}"]],
        "mergekit": [
            pip + [f"mergekit=={pins['mergekit']}", f"transformers=={pins['transformers']}", f"torch=={pins['torch']}"]
        ],
        # NATTEN's sdist builds against the installed torch; without CUDA it builds no libnatten (Flex backend only)
        "natten": [
            pip + ["setuptools>=64", "build>=1.3.0"],
            pip + ["--no-build-isolation", f"natten=={pins['natten']}"],
        ],
    }
    for name, commands in steps.items():
        for cmd in commands:
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                env.missing[name] = f"`pip install {' '.join(cmd[6:])}` failed: {_tail(result.stdout + result.stderr)}"
                break
        if name == "torch" and "torch" in env.missing:
            env.missing.update({p: env.missing["torch"] for p in PEER_PINS})
            break
    probe = subprocess.run(
        [
            env.python,
            "-c",
            "import json, importlib.metadata as m\nout = {}\n"
            "for p in ('torch', 'transformers', 'mergekit', 'natten'):\n"
            "    try: out[p] = m.version(p)\n    except m.PackageNotFoundError: pass\nprint(json.dumps(out))",
        ],
        capture_output=True,
        text=True,
    )
    env.versions = json.loads(probe.stdout) if probe.returncode == 0 else {}
    env.missing.pop("torch", None)
    marker.write_text(json.dumps({"pins": pins, "versions": env.versions, "missing": env.missing}, indent=1))
    return env


# ----------------------------------------------------------------------------------------------------------------
# 1. upcycling: hf-attn-zoo upcycle vs mergekit-moe

PROMPTS = [
    ["The weather today is", "Once upon a time there was", "My favourite food is"],
    ["def fibonacci(n):", "import numpy as np", "for i in range(10):"],
    ["The derivative of x squared is", "Solve for x: 2x + 3 = 7", "The integral of"],
    ["In the beginning God created", "And it came to pass that", "Thou shalt not"],
]


def _tiny_llama(folder: Path, tokenizer_from: Path, seed: int = 0) -> None:
    """A 2-layer random Llama (hidden 64, 4/2 heads) with SmolLM2's tokenizer, saved as safetensors."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def make_experts(root: Path, smoke: bool) -> tuple[Path, list[Path]]:
    """The base and 3 expert folders: copies of the base whose MLP weights carry 1% relative Gaussian noise."""
    from safetensors.torch import load_file, save_file

    import hf_attn_zoo

    default = Path(hf_attn_zoo.assets.default_model_path())
    if smoke:
        base = root / "base"
        _tiny_llama(base, default)
    else:
        base = default
    weights = load_file(base / "model.safetensors")
    experts = []
    for e in range(3):
        folder = root / f"expert{e}"
        folder.mkdir(parents=True)
        generator = torch.Generator().manual_seed(100 + e)
        noisy = {
            name: t + 0.01 * t.std() * torch.randn(t.shape, generator=generator) if ".mlp." in name else t
            for name, t in weights.items()
        }
        save_file(noisy, folder / "model.safetensors", metadata={"format": "pt"})
        for f in base.iterdir():
            if f.is_file() and f.name != "model.safetensors":
                shutil.copy(f, folder / f.name)
        experts.append(folder)
    return base, experts


def mergekit_yaml(base: Path, experts: list[Path], gate_mode: str) -> str:
    import yaml

    entries = []
    for i, source in enumerate([base, *experts]):
        entry: dict[str, Any] = {"source_model": str(source)}
        if gate_mode != "random":
            entry["positive_prompts"] = PROMPTS[i % len(PROMPTS)]
        entries.append(entry)
    config = {
        "base_model": str(base),
        "gate_mode": gate_mode,
        "dtype": "float32",
        "experts_per_token": 2,
        "experts": entries,
    }
    return yaml.safe_dump(config, sort_keys=False)


def _tensor_files(folder: Path) -> dict[str, Path]:
    from safetensors import safe_open

    names = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            names.update({name: file for name in f.keys()})
    return names


def _category(name: str) -> str:
    if ".mlp.gate." in name:
        return "router"
    if ".experts." in name:
        return "expert MLPs"
    if ".self_attn." in name:
        return "attention"
    return "norms, embeddings"


def compare_checkpoints(ours: Path, peer: Path) -> dict[str, Any]:
    """Tensor by tensor: per category, how many are bit-identical (same name, dtype, shape and values)."""
    from safetensors import safe_open

    a, b = _tensor_files(ours), _tensor_files(peer)
    categories: dict[str, list[int]] = {}
    max_diff: dict[str, float] = {}
    for name in sorted(set(a) & set(b)):
        with safe_open(a[name], "pt") as fa, safe_open(b[name], "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        same = x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        cat = _category(name)
        counts = categories.setdefault(cat, [0, 0])
        counts[0] += same
        counts[1] += 1
        if not same and x.shape == y.shape:
            max_diff[cat] = max(max_diff.get(cat, 0.0), (x.float() - y.float()).abs().max().item())
    return {
        "categories": categories,
        "max_diff": max_diff,
        "only_ours": sorted(set(a) - set(b)),
        "only_peer": sorted(set(b) - set(a)),
    }


def check_peer_folder_loads(ours: Path, peer: Path) -> str:
    """mergekit's folder through our loader; with its routers copied into ours the logits must be identical."""
    import hf_attn_zoo

    peer_model = hf_attn_zoo.from_pretrained(peer, dtype=torch.float32).eval()
    our_model = hf_attn_zoo.from_pretrained(ours, dtype=torch.float32).eval()
    peer_state = peer_model.state_dict()
    with torch.no_grad():
        for name, param in our_model.named_parameters():
            if _category(name) == "router":
                param.copy_(peer_state[name])
        ids = torch.randint(10, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
        diff = (our_model(ids).logits - peer_model(ids).logits).abs().max().item()
    kind = type(peer_model).__name__
    return f"loads as {kind}; logits with mergekit's routers: max abs diff {_fmt_diff(diff)}"


def qwen_moe_note(base: Path, experts: list[Path], peers: PeerEnv, tmp: Path) -> str:
    """mergekit's other output family for Llama experts (Qwen2-MoE with one shared expert): can our loader read it,
    and does our `--mergekit` build the same YAML?"""
    import yaml

    import hf_attn_zoo
    from hf_attn_zoo.errors import ZooError
    from hf_attn_zoo.upcycling.mergekit import mergekit_upcycle_kwargs

    config = tmp / "moe_qwen.yml"
    spec = {
        "base_model": str(base),
        "architecture": "qwen",
        "gate_mode": "random",
        "dtype": "float32",
        "experts_per_token": 2,
        "shared_experts": [{"source_model": str(base)}],
        "experts": [{"source_model": str(e)} for e in experts[:2]],
    }
    config.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp / "peer_qwen"
    cmd = [peers.bin("mergekit-moe"), str(config), str(out), "--device", "cpu", "--quiet"]
    run = run_measured(cmd, tmp / "peer_qwen.log", {**os.environ, **OFFLINE})
    if run.returncode != 0:
        read = f"mergekit-moe could not write it: {_tail(run.output, 2)}"
    else:
        model = hf_attn_zoo.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            finite = bool(torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all())
        read = (
            f"its folder loads with `hf_attn_zoo.from_pretrained` as {type(model).__name__} (finite logits: {finite})"
        )
        del model
    shutil.rmtree(out, ignore_errors=True)
    try:
        mergekit_upcycle_kwargs(config)
        ours = "ours builds it too"
    except ZooError as err:
        ours = f'our `--mergekit` refuses that YAML ("{str(err).split(": ", 1)[-1]}")'
    return f"mergekit's Qwen2-MoE output (`architecture: qwen`, one shared expert, 2 experts): {read}; {ours}."


def bench_upcycle(args, peers: PeerEnv, tmp: Path) -> tuple[str, list[str]]:
    lines = ["## Upcycling: `hf-attn-zoo upcycle --mergekit` vs `mergekit-moe`", ""]
    failures: list[str] = []
    if "mergekit" in peers.missing:
        lines += [f"Skipped: mergekit could not be installed: {peers.missing['mergekit']}", ""]
        return "\n".join(lines), failures
    base, experts = make_experts(tmp / "experts", args.smoke)
    what = "tiny random Llama (2 layers, hidden 64)" if args.smoke else "SmolLM2-135M"
    lines += [
        f"Same mergekit-moe YAML for both: base {what} + 3 noisy-MLP copies = 4 experts, top-2, float32, Mixtral "
        f"output, safetensors, CPU; whole command, best of {args.repeats} (alternating). mergekit "
        f"{peers.versions.get('mergekit', '?')}.",
        "",
        "| gate_mode | wall time ours/peer | CPU time ours/peer | peak RSS ours/peer | expert MLPs identical | "
        "attention identical | norms, embeddings identical | routers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    ours_cmd = [str(Path(sys.executable).parent / "hf-attn-zoo"), "upcycle", "--mergekit"]
    env = {**os.environ, **OFFLINE}
    for gate_mode in ("random",) if args.smoke else ("random", "hidden"):
        config = tmp / f"moe_{gate_mode}.yml"
        config.write_text(mergekit_yaml(base, experts, gate_mode))
        runs: dict[str, list[Run]] = {"ours": [], "peer": []}
        for rep in range(args.repeats):
            order = ("ours", "peer") if rep % 2 == 0 else ("peer", "ours")
            for side in order:
                out = tmp / f"{side}_{gate_mode}"
                shutil.rmtree(out, ignore_errors=True)
                if side == "ours":
                    cmd = ours_cmd + [str(config), "--out", str(out)]
                else:
                    cmd = [peers.bin("mergekit-moe"), str(config), str(out), "--device", "cpu", "--quiet"]
                run = run_measured(cmd, tmp / f"{side}_{gate_mode}.log", env)
                if run.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.output[-3000:]}")
                runs[side].append(run)
        ours_out, peer_out = tmp / f"ours_{gate_mode}", tmp / f"peer_{gate_mode}"
        cmp = compare_checkpoints(ours_out, peer_out)
        cells = []
        for cat in ("expert MLPs", "attention", "norms, embeddings"):
            same, total = cmp["categories"].get(cat, [0, 0])
            cells.append(f"{same}/{total}" + ("" if same == total else f" (max diff {cmp['max_diff'][cat]:.1e})"))
            if same != total or total == 0:
                failures.append(f"upcycle {gate_mode}: {cat} {same}/{total} identical")
        if cmp["only_ours"] or cmp["only_peer"]:
            failures.append(
                f"upcycle {gate_mode}: tensor names differ: {cmp['only_ours'][:3]} / {cmp['only_peer'][:3]}"
            )
        same, total = cmp["categories"].get("router", [0, 0])
        router = f"differ by design ({total - same}/{total} differ)"
        best = {
            side: {
                "seconds": min(r.seconds for r in rs),
                "cpu_seconds": min(r.cpu_seconds for r in rs),
                "peak_mib": min(r.peak_mib for r in rs),
            }
            for side, rs in runs.items()
        }
        RAW[f"upcycle {gate_mode}"] = best
        ratios = " | ".join(_ratio(best["ours"][k], best["peer"][k]) for k in ("seconds", "cpu_seconds", "peak_mib"))
        lines.append(f"| {gate_mode} | {ratios} | {' | '.join(cells)} | {router} |")
        if gate_mode == "random":
            notes.append(f"Our loader on mergekit's output: {check_peer_folder_loads(ours_out, peer_out)}.")
        for side in ("ours", "peer"):
            shutil.rmtree(tmp / f"{side}_{gate_mode}", ignore_errors=True)
    notes.append(qwen_moe_note(base, experts, peers, tmp))
    lines += [
        "",
        *notes,
        "Not comparable: the routers (mergekit `random` draws N(0, 1), ours N(0, initializer_range^2); `hidden`: "
        "mergekit averages the residual stream before each layer's norm in a bfloat16 forward, ours the normalised "
        "layer input the router really sees in float32, centred over experts); the config files (mergekit keeps the "
        "Llama keys `mlp_bias`, `attention_bias`, `pretraining_tp`, ours records the upcycling under "
        "`hf_attn_zoo_upcycling` and writes `generation_config.json`).",
        "",
    ]
    return "\n".join(lines), failures


# ----------------------------------------------------------------------------------------------------------------
# 2. sliding window: our patch vs transformers' own sliding window vs NATTEN


def sliding_models(layers: int, window: int, smoke: bool) -> tuple[dict[str, torch.nn.Module], str]:
    """`({name: model}, description)`: the same weights as a Llama patched with `sliding_window` (`ours`) and as a
    Mistral with `sliding_window=window` through `sdpa` and through `flex_attention`."""
    import transformers
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    import hf_attn_zoo

    transformers.logging.set_verbosity_error()
    if smoke:
        config = LlamaConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
        )
        torch.manual_seed(0)
        ours = LlamaForCausalLM(config)
        description = "tiny random Llama (2 layers, hidden 64, 4/2 heads)"
    else:
        path = hf_attn_zoo.assets.default_model_path()
        config = AutoConfig.from_pretrained(path)
        config.num_hidden_layers = layers
        ours = LlamaForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)
        description = f"SmolLM2-135M's first {layers} of 30 layers (its widths and weights, 9/3 heads)"
    models = {"ours": ours.eval()}
    keys = set(MistralConfig().to_dict())
    values = {k: v for k, v in ours.config.to_dict().items() if k in keys and k not in ("architectures", "model_type")}
    for implementation in ("sdpa", "flex_attention"):
        native_config = MistralConfig(**{**values, "sliding_window": window})
        native_config._attn_implementation = implementation
        native = MistralForCausalLM(native_config).eval()
        native.load_state_dict(ours.state_dict(), strict=True)
        models[implementation] = native
    hf_attn_zoo.patch(ours, "sliding_window", window=window, sinks=0)
    return models, description


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:120]}"


@torch.no_grad()
def measure_sliding(
    models: dict[str, torch.nn.Module], ids: torch.Tensor, repeats: int, decode: int, skip: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """Per model: final hidden states (untimed, then an untimed warm-up of the timed call), prefill wall and CPU
    seconds and peak MiB, decode seconds per token, and the logits of the prefill's last token and of every decode
    step. Timed calls alternate between the models (prefill: best of `repeats`; decode: median over steps), so a burst
    of load on the shared machine hits all of them. A model whose call fails gets `error` (prefill) or
    `decode_error`; `skip` names models whose decode already failed."""
    results: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        try:
            results[name] = {"hidden": model.model(ids, use_cache=False).last_hidden_state, "times": [], "cpu": []}
            model(ids, use_cache=True, logits_to_keep=1)  # the timed call's own warm-up (compiled flex: its graph)
        except Exception as err:  # noqa: BLE001  a peer path that fails on CPU is a row with its reason
            results[name] = {"error": _first_line(err)}
    live = [name for name in models if "error" not in results[name]]
    for _ in range(repeats):
        for name in live:
            with Timer() as timer:
                models[name](ids, use_cache=True, logits_to_keep=1)
            results[name]["times"].append(timer.wall)
            results[name]["cpu"].append(timer.cpu)
    caches = {}
    for name in live:
        out, peak = peak_during(lambda: models[name](ids, use_cache=True, logits_to_keep=1))
        caches[name] = out.past_key_values
        results[name].update(
            prefill=min(results[name]["times"]),
            prefill_cpu=min(results[name]["cpu"]),
            peak=peak,
            logits=[out.logits[:, -1]],
            steps=[],
            steps_cpu=[],
        )
        results[name]["decode_error"] = skip.get(name)
    tokens = torch.randint(10, 400, (decode + 1,), generator=torch.Generator().manual_seed(1))
    for i, token in enumerate(tokens):
        for name in live:
            if results[name]["decode_error"]:
                continue
            try:
                with Timer() as timer:
                    out = models[name](token.view(1, 1), past_key_values=caches[name], use_cache=True)
                if i:  # the first step is a warm-up (compiled flex builds its decode kernel there)
                    results[name]["steps"].append(timer.wall)
                    results[name]["steps_cpu"].append(timer.cpu)
            except Exception as err:  # noqa: BLE001  a peer that cannot decode on CPU is a cell with its reason
                results[name]["decode_error"] = _first_line(err)
                # a failed compile leaves dynamo marking the query length dynamic, and the next prefill's
                # recompile fails the same way: start the next length from clean compile caches
                torch._dynamo.reset()
                continue
            caches[name] = out.past_key_values
            results[name]["logits"].append(out.logits[:, -1])
    for name in live:
        ok = results[name]["steps"] and not results[name]["decode_error"]
        results[name]["decode"] = statistics.median(results[name]["steps"]) if ok else None
        results[name]["decode_cpu"] = statistics.median(results[name]["steps_cpu"]) if ok else None
        results[name]["logits"] = torch.cat(results[name]["logits"])
    return results


_KERNEL_CHILD = r"""
import ctypes, json, statistics, sys, time
import torch
impl, inputs, out_dir, window, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(int(sys.argv[6]))
if impl == "natten":
    import natten
    def attend(q, k, v):  # [B, L, H, D]
        return natten.na1d(q, k, v, kernel_size=window, is_causal=True)
    def layout(t):
        return t.transpose(1, 2).contiguous()
else:
    from hf_attn_zoo.kernels.sparse_attention import sparse_attention
    from hf_attn_zoo.patches.sliding_window import SinkWindowPattern
    pattern = SinkWindowPattern(window, 0)
    def attend(q, k, v):  # [B, H, L, D] in, [B, L, H, D] out
        return sparse_attention(q, k, v, pattern, scaling=q.shape[-1] ** -0.5)
    def layout(t):
        return t.contiguous()
def status(name):
    for line in open("/proc/self/status"):
        if line.startswith(name + ":"):
            return int(line.split()[1])
results = {}
with torch.no_grad():
    for length, (q, k, v) in torch.load(inputs).items():
        q, k, v = layout(q), layout(k), layout(v)
        torch.save(attend(q, k, v), f"{out_dir}/{impl}_{length}.pt")  # also the warm-up
        times, cpu = [], []
        for _ in range(repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            attend(q, k, v)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        open("/proc/self/clear_refs", "w").write("5")
        base = status("VmRSS")
        attend(q, k, v)
        results[length] = {"seconds": min(times), "cpu": min(cpu), "peak": (status("VmHWM") - base) / 1024}
print("RESULT " + json.dumps(results))
"""


def bench_natten_kernel(args, peers: PeerEnv, tmp: Path) -> tuple[list[str], list[str]]:
    heads, kv_heads, dim = (4, 2, 16) if args.smoke else (9, 3, 64)
    lines = [
        f"Attention kernel alone against NATTEN {peers.versions.get('natten', '')} "
        f"`na1d(q, k, v, kernel_size={args.window}, is_causal=True)`: {heads} query / {kv_heads} KV heads (GQA), "
        f"head dim {dim}, batch 1, fp32; ours is `sparse_attention` with the patch's `SinkWindowPattern(window, "
        "sinks=0)` (backend `auto`, what the patch runs in inference); each in a fresh process of its own "
        f"environment, best of {args.repeats}.",
        "",
    ]
    failures: list[str] = []
    if "natten" in peers.missing:
        return lines + [f"Skipped: NATTEN could not be installed: {peers.missing['natten']}", ""], failures
    generator = torch.Generator().manual_seed(0)
    inputs = {
        n: (
            torch.randn(1, heads, n, dim, generator=generator),
            torch.randn(1, kv_heads, n, dim, generator=generator),
            torch.randn(1, kv_heads, n, dim, generator=generator),
        )
        for n in args.lengths
    }
    torch.save(inputs, tmp / "kernel_inputs.pt")
    results = {}
    for impl, python in (("ours", sys.executable), ("natten", peers.python)):
        cmd = [python, "-c", _KERNEL_CHILD, impl, str(tmp / "kernel_inputs.pt"), str(tmp), str(args.window)]
        cmd += [str(args.repeats), str(torch.get_num_threads())]
        run = run_measured(cmd, tmp / f"kernel_{impl}.log", {**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT)})
        marker = [line for line in run.output.splitlines() if line.startswith("RESULT ")]
        if run.returncode != 0 or not marker:
            reason = f"{impl} kernel run failed ({run.returncode}): {_tail(run.output)}"
            return lines + [f"Skipped: {reason}", ""], [reason]
        results[impl] = {int(k): v for k, v in json.loads(marker[-1][7:]).items()}
        RAW[f"kernel {impl}"] = results[impl]
    lines += [
        "| length | output max abs diff | wall time ours/NATTEN | CPU time ours/NATTEN | peak memory ours/NATTEN |",
        "|---|---|---|---|---|",
    ]
    for n in args.lengths:
        ours_out = torch.load(tmp / f"ours_{n}.pt")
        peer_out = torch.load(tmp / f"natten_{n}.pt")
        diff = (ours_out - peer_out).abs().max().item()
        if not torch.allclose(ours_out, peer_out, atol=1e-4, rtol=1e-4):
            failures.append(f"NATTEN kernel at {n}: outputs differ by {diff:.1e}")
        r, p = results["ours"][n], results["natten"][n]
        lines.append(
            f"| {n} | {_fmt_diff(diff)} | {_ratio(r['seconds'], p['seconds'])} | {_ratio(r['cpu'], p['cpu'])} "
            f"| {_ratio(r['peak'], p['peak'])} |"
        )
    lines += [
        "",
        "NATTEN on CPU: 0.20 and later ship no CPU kernels; without CUDA they build no libnatten and run the Flex "
        "Attention backend, which NATTEN allows only uncompiled on CPU (its compiled Flex needs a CUDA device of "
        "compute capability >= 7.0), so it materialises the full score matrix. NATTEN has no KV cache, hence no "
        "decode row.",
        "",
    ]
    return lines, failures


def bench_sliding_window(args, peers: PeerEnv, tmp: Path) -> tuple[str, list[str]]:
    models, description = sliding_models(args.layers, args.window, args.smoke)
    lines = [
        f"## Sliding window (W={args.window}, no sinks): the `sliding_window` patch vs transformers' sliding window",
        "",
        f"{description}, fp32, batch 1, {torch.get_num_threads()} threads. Peer: the same weights as "
        f"`MistralForCausalLM` with `sliding_window={args.window}`. Prefill (`logits_to_keep=1`, with a cache): "
        f"best of {args.repeats}; decode: median of {args.decode} single-token steps after that prefill, through each "
        "side's cache (ours: the patch's bounded sinks + window cache; transformers: its sliding-window cache "
        "layer); timed calls alternate between the three models.",
        "",
        "| length | peer | hidden states max abs diff | logits max abs diff (prefill + decode) | "
        "prefill wall ours/peer | prefill CPU ours/peer | prefill peak memory ours/peer | "
        "decode wall per token ours/peer | decode CPU per token ours/peer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    failures: list[str] = []
    decode_errors: dict[str, str] = {}  # a decode that fails to compile fails at every length: tried once
    for n in args.lengths:
        ids = torch.randint(10, 400 if args.smoke else 20000, (1, n), generator=torch.Generator().manual_seed(n))
        results = measure_sliding(models, ids, args.repeats, args.decode, decode_errors)
        RAW[f"sliding_window {n}"] = {
            name: {
                k: r.get(k) for k in ("prefill", "prefill_cpu", "peak", "decode", "decode_cpu", "error", "decode_error")
            }
            for name, r in results.items()
        }
        mine = results["ours"]
        if "error" in mine or mine["decode_error"]:
            failures.append(f"sliding window {n}: ours failed: {mine.get('error') or mine['decode_error']}")
            continue
        for implementation in ("sdpa", "flex_attention"):
            theirs, peer = results[implementation], f"transformers `{implementation}`"
            if "error" in theirs:
                lines.append(f"| {n} | {peer} | fails: {theirs['error']} | | | | | | |")
                continue
            hidden = (mine["hidden"] - theirs["hidden"]).abs().max().item()
            if not torch.allclose(mine["hidden"], theirs["hidden"], atol=1e-3, rtol=1e-3):
                failures.append(f"sliding window {n} vs {implementation}: hidden states differ by {hidden:.1e}")
            steps = len(theirs["logits"])
            logits = (mine["logits"][:steps] - theirs["logits"]).abs().max().item()
            if not torch.allclose(mine["logits"][:steps], theirs["logits"], atol=1e-3, rtol=1e-3):
                failures.append(f"sliding window {n} vs {implementation}: logits differ by {logits:.1e}")
            logits_cell = _fmt_diff(logits) + ("" if steps > 1 else " (prefill only)")
            if theirs["decode_error"]:
                decode_errors[implementation] = theirs["decode_error"]
                decode_cell = f"fails: {theirs['decode_error']} | fails"
            else:
                decode_cell = f"{_ratio(mine['decode'], theirs['decode'])} | "
                decode_cell += _ratio(mine["decode_cpu"], theirs["decode_cpu"])
            prefill = " | ".join(_ratio(mine[k], theirs[k]) for k in ("prefill", "prefill_cpu", "peak"))
            lines.append(f"| {n} | {peer} | {_fmt_diff(hidden)} | {logits_cell} | {prefill} | {decode_cell} |")
    del models
    lines.append("")
    if args.natten:
        kernel_lines, kernel_failures = bench_natten_kernel(args, peers, tmp)
        lines += kernel_lines
        failures += kernel_failures
    return "\n".join(lines), failures


# ----------------------------------------------------------------------------------------------------------------
# 3. lm-eval: our model class vs lm-eval's own hf

_LM_EVAL_CHILD = r"""
import json, sys, time
import lm_eval
import hf_attn_zoo.eval_harness.lm_model  # registers `hf-attn-zoo`; imported by every run so all pay its imports
from hf_attn_zoo.eval_harness import task_manager
model, path, extra, tasks, limit, batch, result = sys.argv[1:8]
manager = task_manager()
start, start_cpu = time.perf_counter(), time.process_time()
out = lm_eval.simple_evaluate(
    model=model,
    model_args={"pretrained": path, "dtype": "float32", "device": "cpu", **json.loads(extra)},
    tasks=tasks.split(","),
    limit=int(limit),
    batch_size=int(batch),
    task_manager=manager,
    log_samples=True,
)
seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
scores = {
    task: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k}
    for task, metrics in out["results"].items()
}
samples = {
    task: [[float(r[0]) for r in s["filtered_resps"]] for s in sorted(rows, key=lambda s: s["doc_id"])]
    for task, rows in out["samples"].items()
}
json.dump({"seconds": seconds, "cpu": cpu, "scores": scores, "samples": samples}, open(result, "w"))
"""


def lm_eval_variants() -> dict[str, tuple[str, dict[str, Any]]]:
    """`{label: (lm-eval model name, extra model args)}`: our class as users get it, without its efficiency probe
    where it has one (a short prefill + decode run once when the model is built), and lm-eval's `hf`."""
    import inspect

    from hf_attn_zoo.eval_harness.lm_model import ZooLM

    variants: dict[str, tuple[str, dict[str, Any]]] = {"hf-attn-zoo": ("hf-attn-zoo", {})}
    if "efficiency" in inspect.signature(ZooLM.__init__).parameters:
        variants["hf-attn-zoo efficiency=false"] = ("hf-attn-zoo", {"efficiency": False})
    variants["hf"] = ("hf", {})
    return variants


def bench_lm_eval(args, tmp: Path) -> tuple[str, list[str]]:
    import lm_eval

    import hf_attn_zoo

    path = str(hf_attn_zoo.assets.default_model_path())
    variants = lm_eval_variants()
    ours = [label for label in variants if label != "hf"]
    lines = [
        "## lm-eval: our model class `hf-attn-zoo` vs lm-eval's `hf`",
        "",
        f"Unpatched SmolLM2-135M, fp32, CPU, batch 8, `--limit {args.limit}`, lm-eval {lm_eval.__version__}; each run "
        "its own process (same imports), wall time of `simple_evaluate` (model loading included) and the process's "
        f"peak RSS, best of {args.repeats} (the runs alternate). "
        + (
            "`hf-attn-zoo efficiency=false`: our class without its efficiency probe (a short prefill + decode of the "
            "model when it is built, reported beside the scores; on by default)."
            if len(ours) > 1
            else ""
        ),
        "",
    ]
    failures: list[str] = []
    tasks = ",".join(args.tasks)
    runs: dict[str, list[tuple[Run, dict]]] = {label: [] for label in variants}
    for rep in range(args.repeats):
        order = list(variants) if rep % 2 == 0 else list(reversed(variants))
        for label in order:
            model, extra = variants[label]
            result = tmp / f"lm_eval_{len(runs[label])}_{label.replace(' ', '_')}.json"
            cmd = [sys.executable, "-c", _LM_EVAL_CHILD, model, path, json.dumps(extra), tasks, str(args.limit), "8"]
            run = run_measured(cmd + [str(result)], tmp / "lm_eval.log", {**os.environ, **OFFLINE})
            if run.returncode != 0:
                raise SystemExit(f"lm-eval with {label} failed ({run.returncode}):\n{run.output[-3000:]}")
            runs[label].append((run, json.loads(result.read_text())))
    peer = runs["hf"][0][1]
    lines += [
        "| task | metric | " + " | ".join(variants) + " | equal |",
        "|---|---|" + "---|" * len(variants) + "---|",
    ]
    for task in args.tasks:
        for metric, value in sorted(peer["scores"][task].items()):
            values = [runs[label][0][1]["scores"][task].get(metric) for label in variants]
            same = all(v == value for v in values)
            if not same:
                failures.append(f"lm-eval {task} {metric}: {dict(zip(variants, values))}")
            cells = " | ".join("n/a" if v is None else f"{v:.4f}" for v in values)
            lines.append(f"| {task} | {metric} | {cells} | {'yes' if same else 'NO'} |")
        flat_peer = [x for row in peer["samples"][task] for x in row]
        diffs = []
        for label in ours:
            flat = [x for row in runs[label][0][1]["samples"][task] for x in row]
            if len(flat) != len(flat_peer):
                failures.append(f"lm-eval {task}: {label} has {len(flat)} log-likelihoods, hf {len(flat_peer)}")
                diffs.append(float("inf"))
                continue
            diffs.append(max((abs(x - y) for x, y in zip(flat, flat_peer)), default=0.0))
            if diffs[-1]:
                failures.append(
                    f"lm-eval {task}: {label}'s per-request log-likelihoods differ by up to {diffs[-1]:.1e}"
                )
        lines.append(
            f"| {task} | per-request log-likelihoods ({len(flat_peer)}) |" + " |" * len(variants) + " max abs diff "
            f"{_fmt_diff(max(diffs))} |"
        )
    best = {
        label: {
            "seconds": min(res["seconds"] for _, res in rs),
            "cpu": min(res["cpu"] for _, res in rs),
            "peak_mib": min(r.peak_mib for r, _ in rs),
        }
        for label, rs in runs.items()
    }
    RAW["lm_eval"] = best
    lines += [
        "",
        "| ours | `simple_evaluate` wall time ours/hf | its CPU time ours/hf | process peak RSS ours/hf |",
        "|---|---|---|---|",
    ]
    for label in ours:
        ratios = " | ".join(_ratio(best[label][k], best["hf"][k]) for k in ("seconds", "cpu", "peak_mib"))
        lines.append(f"| {label} | {ratios} |")
    lines.append("")
    return "\n".join(lines), failures


# ----------------------------------------------------------------------------------------------------------------


def header(peers: PeerEnv | None) -> str:
    import lm_eval
    import transformers

    versions = [
        f"torch {torch.__version__}",
        f"transformers {transformers.__version__}",
        f"lm-eval {lm_eval.__version__}",
    ]
    if peers is not None:
        versions += [f"{name} {peers.versions[name]}" for name in ("mergekit", "natten") if name in peers.versions]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"# Peers, side by side ({time.strftime('%Y-%m-%d')}; CPU: {cpu}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; "
        f"{', '.join(versions)})\n\n"
        "All ratios are ours / peer from this one run: below 1 we are faster or leaner. Wall time is what a user "
        "waits; CPU time (user + system seconds of all threads) is the work done, and is the steadier of the two "
        "when other jobs share the machine (each section gives the load average).\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models and short lengths (checks the script)")
    parser.add_argument("--out", type=Path, help="also write the markdown tables here")
    parser.add_argument("--json", type=Path, help="also write the raw seconds and MiB behind the ratios here")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    parser.add_argument("--layers", type=int, default=4, help="sliding window: SmolLM2 layers kept (of 30)")
    parser.add_argument("--window", type=int, help="sliding window W (default 256; 32 with --smoke)")
    parser.add_argument("--lengths", help="sliding window prefill lengths (default 1024,2048,4096; 128,256 --smoke)")
    parser.add_argument("--decode", type=int, help="decode steps timed per length (default 16; 4 with --smoke)")
    parser.add_argument(
        "--repeats", type=int, help="timed repeats (default 3 for prefill and kernels, 2 for whole commands)"
    )
    parser.add_argument("--limit", type=int, help="lm-eval documents per task (default 50; 5 with --smoke)")
    parser.add_argument("--tasks", default="zoo_arc_easy,zoo_hellaswag", help="lm-eval tasks of the offline pack")
    parser.add_argument("--no-natten", dest="natten", action="store_false", help="skip the NATTEN kernel table")
    parser.add_argument("--no-peer-env", action="store_true", help="never create .venv-peers (skip its peers)")
    parser.add_argument("--peer-env", type=Path, default=PEER_ENV, help="the peers' virtual environment")
    parser.add_argument("--setup", action="store_true", help="only create the peers' environment")
    parser.add_argument("--rebuild-env", action="store_true", help="recreate the peers' environment first")
    args = parser.parse_args()
    os.environ.update(OFFLINE)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    args.window = args.window or (32 if args.smoke else 256)
    args.lengths = [int(n) for n in (args.lengths or ("128,256" if args.smoke else "1024,2048,4096")).split(",")]
    args.decode = args.decode or (4 if args.smoke else 16)
    args.limit = args.limit or (5 if args.smoke else 50)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.smoke:
        args.tasks = args.tasks[:1]
    repeats = args.repeats

    needs_env = ("upcycle" in sections) or ("sliding_window" in sections and args.natten)
    if args.no_peer_env:
        reason = "--no-peer-env"
        peers = PeerEnv(args.peer_env, {}, {"mergekit": reason, "natten": reason})
    elif needs_env or args.setup:
        peers = ensure_peer_env(args.peer_env, rebuild=args.rebuild_env)
    else:
        peers = PeerEnv(args.peer_env)
    if args.setup:
        print(json.dumps({"versions": peers.versions, "missing": peers.missing}, indent=1))
        return

    parts = [header(peers)]
    failures: list[str] = []
    print(parts[0], flush=True)
    with tempfile.TemporaryDirectory(prefix="peers_") as name:
        tmp = Path(name)
        for section in sections:
            started, load = time.perf_counter(), load_note()
            if section == "upcycle":
                args.repeats = repeats or (1 if args.smoke else 2)
                text, failed = bench_upcycle(args, peers, tmp)
            elif section == "sliding_window":
                args.repeats = repeats or (1 if args.smoke else 3)
                text, failed = bench_sliding_window(args, peers, tmp)
            else:
                args.repeats = repeats or (1 if args.smoke else 2)
                text, failed = bench_lm_eval(args, tmp)
            text += f"Load average (1 min) at the start / end of this section: {load} / {load_note()}.\n"
            print(text, flush=True)
            print(f"({section}: {time.perf_counter() - started:.0f} s)\n", file=sys.stderr, flush=True)
            parts.append(text)
            failures += failed
    if failures:
        parts.append("## Equality failures\n\n" + "\n".join(f"- {f}" for f in failures) + "\n")
        print(parts[-1])
    if args.out:
        args.out.write_text("\n".join(parts))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "raw": RAW}, indent=1))
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
