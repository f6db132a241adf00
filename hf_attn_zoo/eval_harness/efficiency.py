"""Efficiency beside the scores: one short, fixed probe of the evaluated model, so that runs compare.

The probe runs at batch 1 on `prompt_tokens` tokens of held-out `python_stdlib_docs` text (the same text for every
model with the same tokenizer), once as a warm-up (so compilation and first-call costs stay out), then measured:

- prefill: one forward of the prompt into a fresh `DynamicCache` (`logits_to_keep=1`, as `generate` prefills);
- KV cache: the bytes that cache holds right after the prefill, read from the cache object
  (`hf_attn_zoo.kernels.kv_cache.kv_cache_bytes`, so windowed, latent and linear-state caches count what they
  keep), divided by the prompt tokens;
- decode: `decode_tokens` greedy single-token steps from that cache;
- peak memory over prefill and decode. CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`,
  summed over the model's devices (weights, cache, activations). CPU: torch keeps no allocator statistics, so the
  process's peak resident set size (Linux `VmHWM`, reset first through `/proc/self/clear_refs`): weights plus
  everything else the process holds, not the probe alone; `None` where that counter cannot be reset.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from hf_attn_zoo.assets.corpora import held_out_texts
from hf_attn_zoo.kernels.kv_cache import kv_cache_bytes
from hf_attn_zoo.wrappers import cache_kwargs


__all__ = [
    "DECODE_TOKENS",
    "PROMPT_TOKENS",
    "Efficiency",
    "measure_efficiency",
    "probe_prompt",
    "process_peak",
    "reset_process_peak",
]

PROMPT_TOKENS = 128
DECODE_TOKENS = 16
PROBE_CORPUS = "python_stdlib_docs"
_WARMUP_STEPS = 2


@dataclass(frozen=True)
class Efficiency:
    """What the probe measured (rates in tokens per second, sizes in bytes); `probe` says how."""

    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    kv_cache_bytes: int
    kv_cache_bytes_per_token: float
    cache_layers: list[str]
    peak_memory_bytes: int | None
    memory_before_bytes: int | None
    memory_kind: str | None
    probe: dict[str, Any] = field(default_factory=dict)


def probe_prompt(tokenizer: Any, tokens: int = PROMPT_TOKENS) -> torch.Tensor:
    """The probe's `[1, tokens]` input ids: the corpus's held-out text (about 17k SmolLM2 tokens; repeated beyond),
    no special tokens."""
    text = "\n\n".join(held_out_texts(PROBE_CORPUS))
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    return ids.repeat(1, -(-tokens // ids.shape[1]))[:, :tokens]


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _run(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> tuple[float, float, DynamicCache, int]:
    """`(prefill seconds, decode seconds, cache, cache bytes after the prefill)`."""
    config: Any = model.config  # a transformers model, or a wrapper (PEFT) that forwards its config
    cache = DynamicCache(config=config)
    kv = cache_kwargs(model, cache)
    start = _now(ids.device)
    logits = model(input_ids=ids, **kv, use_cache=True, logits_to_keep=1).logits
    prefill = _now(ids.device) - start
    held = kv_cache_bytes(cache)
    token = logits[:, -1:].argmax(-1)
    start = _now(ids.device)
    for _ in range(steps):
        token = model(input_ids=token, **kv, use_cache=True).logits[:, -1:].argmax(-1)
    return prefill, _now(ids.device) - start, cache, held


def _status_bytes(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"no {key} in /proc/self/status")
    return int(match.group(1)) * 1024


def _reset_peak(devices: list[torch.device]) -> tuple[int | None, str | None]:
    """Reset the peak-memory counter; returns the usage now and the counter's name (`None`, `None`: none)."""
    if devices:
        for device in devices:
            torch.cuda.reset_peak_memory_stats(device)
        return sum(torch.cuda.memory_allocated(d) for d in devices), "cuda_max_allocated"
    try:
        return reset_process_peak(), "cpu_process_peak_rss"
    except OSError:
        return None, None


def reset_process_peak() -> int:
    """Reset this process's peak RSS (Linux `VmHWM`) to its RSS now, which it returns in bytes (`OSError` where
    /proc does not allow it); `process_peak()` then reads the peak since."""
    # "5" resets the peak RSS to the current RSS (Linux >= 4.0)
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def process_peak() -> int:
    """This process's peak RSS in bytes since it started or since `reset_process_peak()`."""
    return _status_bytes("VmHWM")


def _peak(devices: list[torch.device], kind: str | None) -> int | None:
    if kind is None:
        return None
    if devices:
        return sum(torch.cuda.max_memory_allocated(d) for d in devices)
    return process_peak()


def measure_efficiency(
    model: torch.nn.Module,
    tokenizer: Any,
    device: torch.device | str,
    prompt_tokens: int = PROMPT_TOKENS,
    decode_tokens: int = DECODE_TOKENS,
) -> Efficiency:
    """Run the probe (module docstring) on `model`, whose inputs go to `device`.

    Args:
        model (`PreTrainedModel`): A causal LM, patched or not, in eval mode.
        tokenizer (`PreTrainedTokenizerBase`): Its tokenizer.
        device (`torch.device | str`): Where the input ids go (the device of the embeddings).
        prompt_tokens (`int`, *optional*, defaults to 128): Prompt length; longer than a method's window to see a
            bounded cache.
        decode_tokens (`int`, *optional*, defaults to 16): Greedy decode steps timed.

    Returns:
        `Efficiency`: rates, cache size, peak memory, and the probe's settings.
    """
    if prompt_tokens < 1 or decode_tokens < 1:
        raise ValueError(f"the probe needs prompt_tokens and decode_tokens >= 1, got {prompt_tokens}, {decode_tokens}")
    device = torch.device(device)
    ids = probe_prompt(tokenizer, prompt_tokens).to(device)
    devices = sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)
    with torch.no_grad():
        _run(model, ids, _WARMUP_STEPS)
        before, kind = _reset_peak(devices)
        prefill, decode, cache, held = _run(model, ids, decode_tokens)
        peak = _peak(devices, kind)
    return Efficiency(
        prefill_tokens_per_s=prompt_tokens / prefill,
        decode_tokens_per_s=decode_tokens / decode,
        kv_cache_bytes=held,
        kv_cache_bytes_per_token=held / prompt_tokens,
        cache_layers=sorted({type(layer).__name__ for layer in cache.layers}),
        peak_memory_bytes=peak,
        memory_before_bytes=before,
        memory_kind=kind,
        probe={
            "batch_size": 1,
            "prompt_tokens": prompt_tokens,
            "decode_tokens": decode_tokens,
            "corpus": PROBE_CORPUS,
            "device": str(device),
            "dtype": str(next(model.parameters()).dtype),
            "threads": torch.get_num_threads(),
        },
    )
