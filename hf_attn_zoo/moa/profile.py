"""MoA's attention-influence profile (arXiv:2406.14909, §3.2 "Attention influence profiling").

For calibration sequences, loss `L` = mean next-token cross-entropy, `A` = softmax attention probabilities of every
layer and query head, `G = dL/dA`. Masking entry `(i, j)` and renormalising row `i` changes `L` by, to first order,

    E_ij = -A_ij * (G_ij - sum_n A_in G_in) / (1 - A_ij + eps)

(`attention_influence`). `|E|` is summed over `block x block` tiles and averaged over samples, giving one tensor
`[layers, query heads, nb, nb]` per profiled length; `hf_attn_zoo.moa.search` turns it into a plan.

How: the model runs with a profiling attention handler (SDPA, the layer's own mask) under autograd; a gradient hook on
each layer's attention output receives `dL/dO` during backward, recomputes that layer's `A` from the saved queries and
keys, forms `G = dL/dO V^T` and adds the block sums, so only one layer's `A` and `G` exist at a time (MoA's
`modify_llama_profile.py` recomputes `A` the same way). Parameters get no gradients.

Departs from MoA: calibration text is the held-out split of an offline corpus (`hf_attn_zoo.assets.corpora`) with
the loss on every token, not long-context QA whose answers the model regenerates ("model alignment") with the loss on
the answers only. Heads stay in HF order (query head `h` belongs to KV head `h // group`), profiled per query head;
the search reduces each GQA group (MoA converts GQA to MHA first).

Sizes: the CPU defaults (lengths 512 and 1024, 4 samples, 64-token blocks) take minutes for SmolLM2-135M-Instruct; on a
GPU use MoA's lengths (`lengths=(2048, 4096, 8192)`), each must fit the model's position range.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InvalidOptionError
from ..families.spec import resolve_family
from ..kernels.pattern_handler import max_positions
from ..kernels.register import install_handler, remove_handler
from .plan import plan_model_info

__all__ = [
    "AttentionProfile",
    "attention_influence",
    "block_sum",
    "calibration_sequences",
    "profile_model",
    "profile_sequences",
]

FORMAT = "hf_attn_zoo.moa.profile/1"
EPS = 1e-6


def attention_influence(attn: torch.Tensor, grad: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """`E` (same shape as `attn` `[..., Q, K]`): first-order loss change of masking each entry, row renormalised."""
    row = (attn * grad).sum(-1, keepdim=True)
    return -attn * (grad - row) / (1 - attn + eps)


def block_sum(x: torch.Tensor, block: int) -> torch.Tensor:
    """Sums of `x` `[..., Q, K]` over `block x block` tiles (zero-padded to whole tiles): `[..., nq, nk]`."""
    q, k = x.shape[-2:]
    nq, nk = -(-q // block), -(-k // block)
    x = F.pad(x, (0, nk * block - k, 0, nq * block - q))
    return x.unflatten(-1, (nk, block)).unflatten(-3, (nq, block)).sum((-3, -1))


@dataclass
class AttentionProfile:
    """`influence[length]`: `[layers, query heads, nb, nb]` mean block sums of `|E|`; `model`: the plan model block."""

    influence: dict[int, torch.Tensor]
    block_size: int
    model: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def lengths(self) -> list[int]:
        return sorted(self.influence)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        torch.save(
            {
                "format": FORMAT,
                "influence": {str(n): t for n, t in self.influence.items()},
                "block_size": self.block_size,
                "model": self.model,
                "metadata": self.metadata,
            },
            path,
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> AttentionProfile:
        try:
            data = torch.load(Path(path), map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for unreadable or foreign files
            raise InvalidOptionError(
                f"moa: cannot read the profile {str(path)!r} ({error}); write one with `hf-attn-zoo moa profile`."
            ) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InvalidOptionError(
                f"moa: {str(path)!r} is not an MoA profile ({FORMAT}); write one with `hf-attn-zoo moa profile`."
            )
        return cls(
            {int(n): t for n, t in data["influence"].items()}, data["block_size"], data["model"], data["metadata"]
        )


class _Recorder:
    """Per-layer block sums of `|E|`, filled by the gradient hooks of one length."""

    def __init__(self, num_layers: int, num_heads: int, blocks: int, block: int):
        self.block = block
        self.sums = torch.zeros(num_layers, num_heads, blocks, blocks, dtype=torch.float64)

    @torch.no_grad()
    def add(self, layer: int, query, key, value, allowed, scale, grad_out) -> None:
        dtype = torch.promote_types(query.dtype, torch.float32)
        group = query.shape[1] // key.shape[1]
        n_q, n_k = query.shape[2], key.shape[2]
        causal = torch.ones(n_q, n_k, dtype=torch.bool, device=query.device).tril(n_k - n_q)
        mask = causal if allowed is None else allowed
        # heads in chunks of ~32M scores, so long profiles stay within memory
        chunk = max(1, (1 << 25) // (query.shape[0] * n_q * n_k))
        for start in range(0, query.shape[1], chunk):
            heads = torch.arange(start, min(start + chunk, query.shape[1]), device=query.device)
            k = key[:, heads // group].to(dtype)
            v = value[:, heads // group].to(dtype)
            scores = (query[:, heads].to(dtype) @ k.transpose(-1, -2)) * scale
            attn = scores.masked_fill(~mask, float("-inf")).softmax(-1)
            grad = grad_out[:, heads].to(dtype) @ v.transpose(-1, -2)
            influence = attention_influence(attn, grad).abs().masked_fill(~mask, 0.0)
            self.sums[layer, heads.cpu()] += block_sum(influence, self.block).sum(0).double().cpu()


def _allowed_keys(attention_mask, q_len: int, kv_len: int) -> torch.Tensor | None:
    """The layer's own mask as bool `[B or 1, 1, Q, K]` (True = attend), or None for plain causal attention."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        raise InvalidOptionError(
            "moa profile: the model passed a mask it cannot read; load it with attn_implementation='sdpa' or 'eager'."
        )
    mask = attention_mask[..., -q_len:, -kv_len:]
    return mask if mask.dtype == torch.bool else mask == 0


def _profiling_handler(base, module, query, key, value, attention_mask, *, recorder: _Recorder, **kwargs):
    """SDPA with the layer's mask; a hook on the output feeds `dL/dO` to the recorder during backward."""
    allowed = _allowed_keys(attention_mask, query.shape[2], key.shape[2])
    scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=allowed,
        is_causal=allowed is None,
        scale=scale,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    if out.requires_grad:
        saved = (module.layer_idx, query.detach(), key.detach(), value.detach(), allowed, scale)
        out.register_hook(lambda grad: recorder.add(*saved, grad))
    return out.transpose(1, 2).contiguous(), None


def profile_sequences(
    model: torch.nn.Module,
    sequences: dict[int, list[torch.Tensor]],
    block_size: int = 64,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
) -> AttentionProfile:
    """Profile `model` on token sequences grouped by length (`{length: [ids [length], ...]}`).

    Args:
        model (`PreTrainedModel`): an unpatched causal LM (any attention implementation; it is routed through a
            profiling handler for the duration).
        sequences (`dict[int, list[torch.Tensor]]`): calibration token ids per profiled length.
        block_size (`int`, *optional*, defaults to 64): tile size of the block sums (MoA: 64).
        progress (`bool`, *optional*, defaults to `True`): a tqdm bar over the samples.
        metadata (`dict`, *optional*): extra provenance stored with the profile.
    """
    from tqdm.auto import tqdm

    if block_size < 1:
        raise InvalidOptionError(f"moa profile: block_size={block_size} must be >= 1.")
    family = resolve_family(model.config)
    info = plan_model_info(model.config)
    num_layers = len(family.decoder_layers(model))
    attentions = [family.attention_module(model, i) for i in range(num_layers)]
    device = next(model.parameters()).device
    was_training = model.training
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    influence, losses = {}, {}
    model.eval()
    model.requires_grad_(False)
    try:
        bar = tqdm(total=sum(len(s) for s in sequences.values()), desc="moa profile", unit="seq", disable=not progress)
        for length, batch in sorted(sequences.items()):
            recorder = _Recorder(num_layers, info["num_heads"], -(-length // block_size), block_size)
            for attention in attentions:
                install_handler(model, attention, functools.partial(_profiling_handler, recorder=recorder))
            try:
                total = 0.0
                for ids in batch:
                    ids = ids.view(1, -1).to(device)
                    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                    loss = model(inputs_embeds=embeds, labels=ids, use_cache=False).loss
                    loss.backward()
                    total += loss.item()
                    bar.update(1)
                    bar.set_postfix(length=length, loss=f"{loss.item():.3f}")
            finally:
                for attention in attentions:
                    remove_handler(model, attention)
            influence[length] = (recorder.sums / len(batch)).float()
            losses[length] = total / len(batch)
        bar.close()
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(grads[name])
        model.train(was_training)
    meta = {
        "samples": {str(n): len(s) for n, s in sequences.items()},
        "loss": {str(n): v for n, v in losses.items()},
        "objective": "mean next-token cross-entropy on every token",
        "head_order": "query heads in HF order: head h belongs to KV head h // (num_heads // num_kv_heads)",
        **(metadata or {}),
    }
    return AttentionProfile(influence, block_size, info, meta)


def calibration_sequences(tokenizer, lengths: list[int], samples: int, corpus: str) -> dict[int, list[torch.Tensor]]:
    """`samples` disjoint token windows per length, cut in order from `corpus`'s held-out text."""
    from ..assets.corpora import held_out_texts

    ids = tokenizer("\n\n".join(held_out_texts(corpus)), return_tensors="pt", add_special_tokens=False).input_ids[0]
    needed = samples * sum(lengths)
    if ids.numel() < needed:
        raise InvalidOptionError(
            f"moa profile: {corpus!r} holds {ids.numel()} held-out tokens, {needed} are needed "
            f"for {samples} samples of {lengths}; use fewer samples, shorter lengths or another "
            "corpus."
        )
    out, start = {}, 0
    for length in lengths:
        out[length] = [ids[start + i * length : start + (i + 1) * length] for i in range(samples)]
        start += samples * length
    return out


def profile_model(
    model: torch.nn.Module,
    tokenizer,
    lengths: tuple[int, ...] = (512, 1024),
    samples: int = 4,
    block_size: int = 64,
    corpus: str = "python_docs",
    progress: bool = True,
) -> AttentionProfile:
    """Profile `model` on `samples` held-out sequences of `corpus` per length (see the module docstring)."""
    limit = max_positions(model.config)
    bad = [n for n in lengths if n < 2 or (limit and n > limit)]
    if bad or samples < 1:
        raise InvalidOptionError(
            f"moa profile: lengths {list(lengths)} must lie in [2, {limit or 'inf'}] and "
            f"samples={samples} must be >= 1."
        )
    sequences = calibration_sequences(tokenizer, sorted(set(lengths)), samples, corpus)
    return profile_sequences(
        model,
        sequences,
        block_size,
        progress,
        {"corpus": corpus, "split": "held_out", "model_path": str(model.config._name_or_path)},
    )
