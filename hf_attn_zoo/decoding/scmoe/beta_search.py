"""`pick_beta`: choose SCMoE's contrast strength on held-out examples (by default held-out GSM8K problems, from
`hf_attn_zoo.eval_harness.gsm8k`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ...errors import InvalidOptionError
from .config import SCMoEConfig
from .decode import scmoe_generate

__all__ = ["pick_beta"]


def pick_beta(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]] | None = None,
    betas: Sequence[float] = (0.0, 0.1, 0.3, 0.5, 1.0),
    *,
    alpha: float = 0.1,
    weak: str = "rank:2",
    fewshot: Sequence[Mapping[str, Any]] = (),
    prompt_fn: Callable[[Mapping[str, Any]], str] | None = None,
    score_fn: Callable[[Mapping[str, Any], str], float] | None = None,
    stop: Sequence[str] = ("Question:", "</s>", "<|im_end|>"),
    max_new_tokens: int = 256,
    batch_size: int = 8,
) -> tuple[float, list[dict[str, float]]]:
    """Choose SCMoE's beta on held-out examples (the paper tuned it on the test sets; this does not).

    Every (example, beta) pair is decoded greedily; rows of one batch may carry different betas (one batched
    decode serves the whole sweep). The best beta has the highest mean score; ties go to the smallest beta.

    Args:
        model (`PreTrainedModel`): a MoE causal LM.
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer (left padding is used for batches).
        examples (`list[dict]`, *optional*): held-out examples; defaults to the 50 GSM8K problems of
            `hf_attn_zoo.eval_harness.gsm8k.gsm8k_heldout()` (the tail of the test split, disjoint from
            `zoo_gsm8k --limit N` for N <= 1264), with its 5 shots.
        betas (`list[float]`, *optional*): candidates, each >= 0.
        alpha (`float`, *optional*, defaults to 0.1), weak (`str`, *optional*, defaults to `"rank:2"`): fixed.
        fewshot (`list[dict]`, *optional*): shot examples for the default GSM8K prompt.
        prompt_fn (`Callable`, *optional*): example -> prompt; defaults to `gsm8k_prompt(example, fewshot)`.
        score_fn (`Callable`, *optional*): (example, completion) -> score; defaults to `gsm8k_correct`.
        stop (`list[str]`, *optional*): stop strings; the completion is cut at the first one.
        max_new_tokens (`int`, *optional*, defaults to 256), batch_size (`int`, *optional*, defaults to 8): rows
            per decode (each row is one example at one beta).

    Returns:
        `(best_beta, table)`: `table` is one `{"beta", "score", "n"}` row per candidate, in the given order.

    Example:
        >>> best, table = pick_beta(model, tokenizer, max_new_tokens=128)
        >>> evaluate(model, "zoo_gsm8k", limit=200, model_args={"scmoe": True, "scmoe_beta": best})
    """
    from transformers import StoppingCriteriaList, StopStringCriteria

    # the GSM8K defaults are evaluation helpers, imported only when used
    from ...eval_harness.gsm8k import gsm8k_correct, gsm8k_heldout, gsm8k_prompt

    if not betas:
        raise InvalidOptionError("pick_beta needs at least one beta")
    for beta in betas:
        SCMoEConfig(alpha=alpha, beta=beta)
    if examples is None:
        examples, default_shots = gsm8k_heldout()
        fewshot = fewshot or default_shots
    if not examples:
        raise InvalidOptionError("pick_beta needs at least one example")
    prompt_fn = prompt_fn or (lambda example: gsm8k_prompt(example, fewshot))
    score_fn = score_fn or gsm8k_correct
    if tokenizer.pad_token_id is None:
        raise InvalidOptionError("pick_beta needs a tokenizer with a pad token (e.g. tokenizer.pad_token = eos)")
    jobs = [(i, b) for b in range(len(betas)) for i in range(len(examples))]
    prompts = [prompt_fn(example) for example in examples]
    totals = [0.0] * len(betas)
    device = next(model.parameters()).device
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        batch = tokenizer([prompts[i] for i, _ in chunk], return_tensors="pt", padding=True, padding_side="left")
        criteria = StoppingCriteriaList([StopStringCriteria(tokenizer, list(stop))]) if stop else None
        out = scmoe_generate(
            model,
            batch.input_ids.to(device),
            batch.attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            alpha=alpha,
            weak=weak,
            beta=[float(betas[b]) for _, b in chunk],
            stopping_criteria=criteria,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(out[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
        for (i, b), text in zip(chunk, texts):
            for s in stop:
                text = text.split(s, 1)[0]
            totals[b] += float(score_fn(examples[i], text))
    table = [
        {"beta": float(beta), "score": totals[b] / len(examples), "n": len(examples)} for b, beta in enumerate(betas)
    ]
    best = max(table, key=lambda row: (row["score"], -row["beta"]))
    return best["beta"], table
