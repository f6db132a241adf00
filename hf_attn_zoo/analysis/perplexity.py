"""Held-out perplexity of a causal LM on a packaged corpus (the documents no recipe trains on)."""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm.auto import tqdm

from ..assets.corpora import held_out_texts

__all__ = ["held_out_nll", "held_out_perplexity"]


def held_out_perplexity(
    model: torch.nn.Module, tokenizer: Any, corpus: str, seq_len: int = 256, max_blocks: int = 8, batch_size: int = 4
) -> float:
    """exp(mean token NLL) over the first `max_blocks` blocks of `seq_len` tokens (at most the model's
    `max_position_embeddings`) of `corpus`'s held-out text (see `held_out_nll`)."""
    return math.exp(held_out_nll(model, tokenizer, corpus, seq_len, max_blocks, batch_size).mean().item())


@torch.no_grad()
def held_out_nll(
    model: torch.nn.Module, tokenizer: Any, corpus: str, seq_len: int = 256, max_blocks: int = 8, batch_size: int = 4
) -> torch.Tensor:
    """Mean token NLL of each block `[blocks]` (float64) of `corpus`'s held-out text.

    The held-out documents are joined with blank lines and cut into equal blocks of `seq_len` tokens (at most the
    model's `max_position_embeddings`): the same tokens for every model sharing the tokenizer, so two models can be
    compared block by block (a paired difference has a far smaller standard error than either perplexity).
    """
    config = getattr(model.config, "text_config", None) or model.config
    limit = getattr(config, "max_position_embeddings", None)
    if limit:
        seq_len = min(seq_len, int(limit))  # blocks stay inside the model's position range
    text = "\n\n".join(held_out_texts(corpus))
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    blocks = min(max_blocks, ids.numel() // seq_len)
    if blocks == 0:
        raise ValueError(f"{corpus}: held-out text has fewer than {seq_len} tokens")
    ids = ids[: blocks * seq_len].view(blocks, seq_len)
    was_training = model.training
    model.eval()
    losses = []
    device = next(model.parameters()).device
    try:
        for batch in tqdm(ids.split(batch_size), desc=f"held-out NLL ({corpus})", unit="batch", leave=False):
            batch = batch.to(device)
            logits = model(input_ids=batch).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
            losses.append(nll.mean(-1).double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(losses)
