"""Routing stability of a MoE model: routing entropy and flip rate per MoE layer, on real text.

The measures of "Improving Routing in Sparse Mixture of Experts with Graph of Tokens" (arXiv:2505.00792), which
argues that independent per-token routing fluctuates and that mixing gate distributions over a graph of tokens
lowers the entropy of the expert selection:

- `gate_entropy`: mean over tokens of the entropy (nats) of the gate distribution the router selects by (for a
  `graph_routing`-patched model the *mixed* one, ĝ; sigmoid routers: their scores normalised to sum 1);
- `selection_entropy`: entropy (nats) of the expert-selection distribution, the share of all (token, slot)
  selections each expert receives (log E when the load is perfectly balanced);
- `flip_rate`: the fraction of a token's top-k selections that change when the input is perturbed: Gaussian noise
  on the input embeddings with a standard deviation of `scale` times each embedding's RMS (`perturbation="noise"`),
  or a fraction `scale` of the tokens replaced by random ones (`"replace"`; flips are counted on the tokens left
  unchanged, so they measure how routing reacts to the context).

Padding tokens (attention mask 0) are left out of every measure. Works on every MoE family with a routing rule
(`hf_attn_zoo.moe.rules`); the routing is read through `hf_attn_zoo.moe.observe_routing`, so routing overrides
already installed (a `mote` patch) are measured as they are.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, cast

import torch
from tqdm.auto import tqdm

from ..assets.corpora import held_out_texts
from ..errors import InvalidOptionError
from ..moe.overrides import routing_target
from ..moe.routing import RoutingDecision, observe_routing
from ..wrappers import inner_model

__all__ = ["held_out_batches", "plot_routing_stability", "routing_stability", "save_routing_stability"]

METRICS = ("gate_entropy", "selection_entropy", "flip_rate")


def held_out_batches(
    tokenizer: Any, corpus: str, seq_len: int = 256, sequences: int = 8, batch_size: int = 4
) -> list[torch.Tensor]:
    """`input_ids` batches `[batch_size, seq_len]` cut from `corpus`'s held-out text (the blocks
    `hf_attn_zoo.analysis.held_out_nll` uses, so stability and perplexity see the same tokens)."""
    text = "\n\n".join(held_out_texts(corpus))
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    blocks = min(sequences, ids.numel() // seq_len)
    if blocks == 0:
        raise InvalidOptionError(f"{corpus}: the held-out text has fewer than {seq_len} tokens")
    return list(ids[: blocks * seq_len].view(blocks, seq_len).split(batch_size))


def _batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch if batch.dim() == 2 else batch[None], None
    if isinstance(batch, Mapping) and "input_ids" in batch:
        ids = batch["input_ids"]
        return (ids if ids.dim() == 2 else ids[None]), batch.get("attention_mask")
    raise InvalidOptionError(
        f"routing_stability: a batch is an input_ids tensor [B, T] or a dict with input_ids (and attention_mask), "
        f"got {type(batch).__name__}"
    )


def _run(model: torch.nn.Module, embeds: torch.Tensor, mask: torch.Tensor | None) -> dict[int, RoutingDecision]:
    decisions: dict[int, RoutingDecision] = {}
    with observe_routing(model, lambda layer, d: decisions.__setitem__(layer, d)):
        model(inputs_embeds=embeds, attention_mask=mask)
    return decisions


@torch.no_grad()
def routing_stability(
    model: torch.nn.Module,
    batches: Iterable[Any],
    *,
    perturbation: Literal["noise", "replace"] = "noise",
    scale: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """Routing entropy and flip rate per MoE layer and their mean over layers (see the module docstring).

    Args:
        model (`PreTrainedModel`): a MoE causal LM of a family with a routing rule (patched or not).
        batches (`Iterable`): `input_ids` tensors `[B, T]`, or dicts with `input_ids` and `attention_mask`.
        perturbation (`str`, *optional*, defaults to `"noise"`): `"noise"` (Gaussian, on the input embeddings) or
            `"replace"` (random tokens).
        scale (`float`, *optional*, defaults to 0.05): the noise's standard deviation relative to the embeddings'
            RMS, or the fraction of tokens replaced.
        seed (`int`, *optional*, defaults to 0): seed of the perturbation.

    Returns:
        `dict`: JSON-able: `layers` (`{layer: {metric: value}}`), `mean` (`{metric: value}` over layers),
        `tokens` (tokens measured), `num_experts`, `top_k`, `perturbation` (`{kind, scale, seed}`).
    """
    if perturbation not in ("noise", "replace"):
        raise InvalidOptionError(f"routing_stability: perturbation must be 'noise' or 'replace', got {perturbation!r}")
    if not math.isfinite(scale) or scale < 0 or (perturbation == "replace" and scale > 1):
        raise InvalidOptionError(
            f"routing_stability: scale={scale} must be >= 0 (a fraction <= 1 for perturbation='replace')"
        )
    target = routing_target(model)
    inner = inner_model(model)
    embed = cast(torch.nn.Embedding, cast(Any, inner).get_input_embeddings())
    generator = torch.Generator().manual_seed(seed)
    sums: dict[int, dict[str, float]] = {}
    counts: dict[int, torch.Tensor] = {}
    tokens = 0
    flipped_tokens = 0
    num_experts = top_k = 0
    was_training = inner.training
    inner.eval()
    try:
        for batch in tqdm(batches, desc="routing stability", unit="batch", leave=False):
            ids, mask = _batch(batch)
            device = embed.weight.device
            ids = ids.to(device)
            mask = None if mask is None else mask.to(device)
            valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
            embeds = embed(ids)
            clean = _run(model, embeds, mask)
            if perturbation == "noise":
                rms = embeds.float().pow(2).mean(-1, keepdim=True).sqrt()
                noise = torch.randn(embeds.shape, generator=generator).to(device)
                noisy_embeds = (embeds.float() + scale * rms * noise).to(embeds.dtype)
                compared = valid
            else:
                replace = (torch.rand(ids.shape, generator=generator) < scale).to(device) & valid
                random_ids = torch.randint(0, embed.weight.shape[0], ids.shape, generator=generator).to(device)
                noisy_embeds = embed(torch.where(replace, random_ids, ids))
                compared = valid & ~replace
            noisy = _run(model, noisy_embeds, mask)
            flat_valid, flat_compared = valid.reshape(-1), compared.reshape(-1)
            tokens += int(flat_valid.sum())
            flipped_tokens += int(flat_compared.sum())
            for layer, decision in clean.items():
                router = target.routers[layer]
                gates = target.rule.gates(router, decision.logits.reshape(-1, decision.logits.shape[-1]))
                probs = gates / gates.sum(-1, keepdim=True).clamp_min(1e-30)
                entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
                index, active = decision.index, decision.active
                num_experts, top_k = probs.shape[-1], index.shape[-1]
                picked = index[flat_valid][active[flat_valid]]
                counts[layer] = counts.get(layer, torch.zeros(num_experts)) + torch.bincount(
                    picked.cpu(), minlength=num_experts
                )
                # a selection flips when the expert in it is no longer among the token's top-k
                other = noisy[layer].index
                kept = (index[..., :, None] == other[..., None, :]).any(-1).float().mean(-1)
                layer_sums = sums.setdefault(layer, {"gate_entropy": 0.0, "flip_rate": 0.0})
                layer_sums["gate_entropy"] += float(entropy[flat_valid].sum())
                layer_sums["flip_rate"] += float((1 - kept)[flat_compared].sum())
    finally:
        inner.train(was_training)
    if tokens == 0:
        raise InvalidOptionError("routing_stability: the batches hold no (unpadded) token")
    layers: dict[str, dict[str, float]] = {}
    for layer in sorted(sums):
        share = counts[layer] / counts[layer].sum().clamp_min(1)
        selection = float(-(share * share.clamp_min(1e-30).log()).sum())
        layers[str(layer)] = {
            "gate_entropy": sums[layer]["gate_entropy"] / tokens,
            "selection_entropy": selection,
            "flip_rate": sums[layer]["flip_rate"] / max(flipped_tokens, 1),
        }
    mean = {m: sum(v[m] for v in layers.values()) / len(layers) for m in METRICS}
    return {
        "layers": layers,
        "mean": mean,
        "tokens": tokens,
        "num_experts": num_experts,
        "top_k": top_k,
        "max_entropy": math.log(num_experts) if num_experts else 0.0,
        "perturbation": {"kind": perturbation, "scale": scale, "seed": seed},
    }


def plot_routing_stability(result: Mapping[str, Any], path: str | Path, title: str = "routing stability") -> Path:
    """Per-layer gate entropy, selection entropy and flip rate, one line per model.

    Args:
        result (`dict`): a `routing_stability` result, or `{label: result}` to compare several models.
        path (`str | Path`): the PNG to write (its folder is created).
        title (`str`, *optional*): the figure title.

    Returns:
        `Path`: the PNG written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {"model": result} if "layers" in result else dict(result)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    labels = {
        "gate_entropy": "gate entropy (nats)",
        "selection_entropy": "expert-selection entropy (nats)",
        "flip_rate": "flip rate",
    }
    for label, run in runs.items():
        layers = sorted(run["layers"], key=int)
        for axis, metric in zip(axes, METRICS):
            axis.plot([int(x) for x in layers], [run["layers"][x][metric] for x in layers], marker=".", label=label)
    for axis, metric in zip(axes, METRICS):
        axis.set_xlabel("layer")
        axis.set_title(labels[metric])
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_routing_stability(result: Mapping[str, Any], path: str | Path) -> Path:
    """Write a result (or `{label: result}`) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
