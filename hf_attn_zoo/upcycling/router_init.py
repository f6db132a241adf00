"""Initial router weights for an upcycled MoE (one row per expert, per MoE layer).

- `random`: N(0, initializer_range) per entry, the scaled random init of sparse upcycling / BAM (routers then train).
- `hidden`: run the seed on each expert's example prompts and take the mean of **the input the router sees**: the
  normalised layer input (`post_attention_layernorm` output for the FFN router, `input_layernorm` output for BAM's
  attention router), per layer. mergekit's `hidden` mode uses the residual stream *before* the norm instead. The
  mean of an expert's negative prompts is subtracted, the rows are centred over experts (softmax ignores a common
  component, so only the differences route) and L2-normalised.
- `embed`: the same from the mean input token embedding of each expert's prompts, one row set shared by all layers
  (mergekit's `cheap_embed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from tqdm.auto import tqdm

from ..errors import InvalidOptionError
from ..families.spec import resolve_family
from .sources import Source

__all__ = ["RouterInit", "router_weights"]

RouterInit = Literal["random", "hidden", "embed"]


def router_weights(
    mode: RouterInit,
    seed: Source,
    prompts: Sequence[Sequence[str]],
    negative_prompts: Sequence[Sequence[str]],
    num_experts: int,
    layers: Sequence[int],
    which: Literal["ffn", "attention"] = "ffn",
    generator_seed: int = 0,
) -> dict[int, torch.Tensor]:
    """Router weight `(num_experts, hidden)` in float32 for every layer in `layers`."""
    hidden = seed.config.hidden_size
    if mode == "random":
        generator = torch.Generator().manual_seed(generator_seed + (which == "attention"))
        std = getattr(seed.config, "initializer_range", 0.02)
        return {i: torch.randn(num_experts, hidden, generator=generator) * std for i in layers}
    if len(prompts) != num_experts or any(not p for p in prompts):
        empty = [e for e in range(num_experts) if e >= len(prompts) or not prompts[e]]
        raise InvalidOptionError(
            f"router_init={mode!r} needs example prompts for every expert; expert(s) {empty} have none. Give each "
            "expert's prompts (Expert(prompts=[...]), `prompts=` or the mergekit `positive_prompts`), or use "
            "router_init='random'."
        )
    if mode == "embed":
        means = _embedding_means(seed, prompts, negative_prompts)
        rows = _finish(means, "embed")
        return {i: rows.clone() for i in layers}
    if mode == "hidden":
        per_layer = _hidden_means(seed, prompts, negative_prompts, layers, which)
        return {i: _finish(m, f"hidden (layer {i})") for i, m in per_layer.items()}
    raise InvalidOptionError(f"router_init={mode!r} is not one of random, hidden, embed.")


def _finish(means: torch.Tensor, what: str) -> torch.Tensor:
    centred = means - means.mean(0, keepdim=True)
    norms = centred.norm(dim=-1, keepdim=True)
    if (norms < 1e-6 * means.norm(dim=-1, keepdim=True).clamp_min(1e-12)).any():
        raise InvalidOptionError(
            f"router_init={what}: some experts' prompts give the same mean representation as the average over "
            "experts (identical prompt sets?); give each expert prompts of its own domain."
        )
    return centred / norms


def _tokenizer(seed: Source):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(seed.path)


@torch.no_grad()
def _embedding_means(seed: Source, prompts, negative_prompts) -> torch.Tensor:
    tokenizer = _tokenizer(seed)
    table = seed.tensor("model.embed_tokens.weight").float()

    def mean(texts: Sequence[str]) -> torch.Tensor:
        ids = [i for t in texts for i in tokenizer(t)["input_ids"]]
        return table[torch.tensor(ids)].mean(0)

    rows = []
    for e, texts in enumerate(prompts):
        row = mean(texts)
        if e < len(negative_prompts) and negative_prompts[e]:
            row = row - mean(negative_prompts[e])
        rows.append(row)
    return torch.stack(rows)


@torch.no_grad()
def _hidden_means(
    seed: Source, prompts, negative_prompts, layers: Sequence[int], which: str
) -> dict[int, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(seed.path, dtype=torch.float32).eval()
    tokenizer = _tokenizer(seed)
    family = resolve_family(model.config)
    captured: dict[int, torch.Tensor] = {}

    def hook_for(layer: int):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            captured[layer] = hidden.detach().float()[0].mean(0)

        return hook

    hooks = []
    for layer in layers:
        module = family.mlp_module(model, layer) if which == "ffn" else family.attention_module(model, layer)
        hooks.append(module.register_forward_pre_hook(hook_for(layer), with_kwargs=True))

    def mean(texts: Sequence[str]) -> dict[int, torch.Tensor]:
        total = {layer: torch.zeros(model.config.hidden_size) for layer in layers}
        for text in texts:  # one prompt at a time: no padding, each prompt weighs the same
            model(**tokenizer(text, return_tensors="pt"))
            for layer in layers:
                total[layer] += captured[layer]
        return {layer: t / len(texts) for layer, t in total.items()}

    try:
        rows: list[dict[int, torch.Tensor]] = []
        for e, texts in enumerate(tqdm(prompts, desc=f"{which} router init (hidden)", unit="expert")):
            row = mean(texts)
            if e < len(negative_prompts) and negative_prompts[e]:
                negative = mean(negative_prompts[e])
                row = {layer: row[layer] - negative[layer] for layer in layers}
            rows.append(row)
    finally:
        for h in hooks:
            h.remove()
    return {layer: torch.stack([r[layer] for r in rows]) for layer in layers}
