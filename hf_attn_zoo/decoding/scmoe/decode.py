"""SCMoE as a decoding loop of `generate`: `scmoe_decode` (for `custom_generate=`), `scmoe_generate` (greedy, ids
out like `generate`), `CUSTOM_GENERATE_DIR` (the `custom_generate` folder) and `move_stop_strings`."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ...errors import InvalidOptionError
from ...wrappers import cache_kwargs
from .config import SCMoEConfig, _resolve_config
from .contrast import _weak_routing, contrastive_scores

__all__ = ["CUSTOM_GENERATE_DIR", "move_stop_strings", "scmoe_decode", "scmoe_generate"]

# `model.generate(custom_generate=CUSTOM_GENERATE_DIR, trust_remote_code=True)` loads custom_generate/generate.py
# from `hf_attn_zoo/decoding/`
CUSTOM_GENERATE_DIR = str(Path(__file__).resolve().parents[1])


def _eos_ids(generation_config: Any) -> list[int]:
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        return []
    if isinstance(eos, torch.Tensor):
        return [int(e) for e in eos.reshape(-1).tolist()]
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _split_beta(beta: Any) -> tuple[Any, Any]:
    """`(scalar beta or None, per-row betas or None)`."""
    if isinstance(beta, (list, tuple, torch.Tensor)):
        return None, beta
    return beta, None


def _row_beta(beta: Any, config: SCMoEConfig, batch: int, device: torch.device) -> float | torch.Tensor:
    """The contrast strength: the config's, or one per row (a list/tensor of B values, e.g. a beta sweep)."""
    if beta is None:
        return config.beta
    values = torch.as_tensor(beta, dtype=torch.float32).reshape(-1)
    if values.numel() != batch:
        raise InvalidOptionError(f"per-row beta needs one value per batch row ({batch}), got {values.numel()}")
    if not torch.isfinite(values).all() or (values < 0).any():
        raise InvalidOptionError(f"SCMoE beta values must be finite and >= 0, got {values.tolist()}")
    return values.to(device)


def scmoe_decode(
    model: Any,
    input_ids: torch.LongTensor,
    logits_processor: Any,
    stopping_criteria: Any,
    generation_config: Any,
    synced_gpus: bool = False,
    streamer: Any = None,
    scmoe: SCMoEConfig | None = None,
    alpha: float | None = None,
    beta: float | Sequence[float] | torch.Tensor | None = None,
    weak: str | None = None,
    ban_eos: bool | None = None,
    **model_kwargs: Any,
) -> Any:
    """SCMoE decoding loop for `model.generate(..., custom_generate=scmoe_decode)`.

    `generate` prepares everything as usual (generation config, attention mask, position ids, logits processors,
    stopping criteria: `max_new_tokens`, EOS, stop strings, lm-eval's stop sequences) and hands over here. The
    extra `generate` kwargs `scmoe=SCMoEConfig(...)`, or `alpha`, `beta`, `weak` (`"rank:2"`, `"top1"`,
    `"top_m:2"`), `ban_eos`, choose the SCMoE options; `beta` may also be a list of one value per batch row.
    `do_sample=False` (the default) is greedy on the contrastive score; `do_sample=True` samples from
    softmax(processed score). Logits processors (repetition penalty, temperature, ...) act on the contrastive score.

    Returns what `_sample` returns: the sequences, or with `return_dict_in_generate=True` a
    `GenerateDecoderOnlyOutput` (`scores`: processed contrastive scores, `logits`: the strong logits).
    """
    from transformers import DynamicCache
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    scalar_beta, rows_beta = _split_beta(beta)
    config = _resolve_config(scmoe, alpha, scalar_beta, weak, ban_eos)
    if synced_gpus:
        raise InvalidOptionError("SCMoE decoding does not support synced_gpus (DeepSpeed ZeRO-3 / FSDP generation)")
    if getattr(generation_config, "num_beams", 1) not in (None, 1):
        raise InvalidOptionError("SCMoE decoding is greedy or sampling; beam search (num_beams > 1) is not supported")
    batch = input_ids.shape[0]
    device = input_ids.device
    row_beta = _row_beta(rows_beta, config, batch, device)

    attention_mask = model_kwargs.pop("attention_mask", None)
    position_ids = model_kwargs.pop("position_ids", None)
    user_cache = model_kwargs.pop("cache", None)
    model_kwargs.pop("past_key_values", None)
    model_kwargs.pop("use_cache", None)
    model_kwargs.pop("logits_to_keep", None)
    if user_cache is not None and user_cache.get_seq_length() > 0:
        raise InvalidOptionError("SCMoE decoding starts from the prompt; it cannot continue a filled cache")
    tensors = [k for k, v in model_kwargs.items() if isinstance(v, torch.Tensor)]
    if tensors:
        raise InvalidOptionError(f"SCMoE decoding does not support the model inputs {tensors}")
    if position_ids is None:
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        else:
            position_ids = torch.arange(input_ids.shape[1], device=device).unsqueeze(0).expand(batch, -1)

    mask2 = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
    positions2 = torch.cat([position_ids, position_ids]).to(device)
    forward_kwargs = dict(model_kwargs)
    if model._supports_logits_to_keep():
        forward_kwargs["logits_to_keep"] = 1

    pad_token_id = generation_config._pad_token_tensor
    if pad_token_id is not None:
        pad_token_id = pad_token_id.to(device)
    has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    banned = torch.tensor(_eos_ids(generation_config), dtype=torch.long, device=device) if config.ban_eos else None
    do_sample = bool(generation_config.do_sample)
    return_dict = bool(generation_config.return_dict_in_generate)
    scores_out = () if return_dict and generation_config.output_scores else None
    logits_out = () if return_dict and generation_config.output_logits else None
    unfinished = torch.ones(batch, dtype=torch.long, device=device)
    cache = cache_kwargs(model, DynamicCache(config=model.config))
    step_ids = torch.cat([input_ids, input_ids])
    optimise = getattr(model, "_optimize_model_for_decode", None)

    with _weak_routing(model, config, batch), optimise() if optimise is not None else contextlib.nullcontext():
        while True:
            length = step_ids.shape[1]
            outputs = model(
                input_ids=step_ids,
                attention_mask=mask2,
                position_ids=positions2[:, -length:],
                **cache,
                use_cache=True,
                return_dict=True,
                **forward_kwargs,
            )
            logits = outputs.logits[:, -1].to(dtype=torch.float32, device=device)
            del outputs
            if logits_out is not None:
                logits_out += (logits[:batch].clone(),)
            if banned is not None and banned.numel():
                # banned before the cutoff, so the plausible set is never EOS alone
                logits[:, banned] = float("-inf")
            scores = contrastive_scores(logits[:batch], logits[batch:], config.alpha, row_beta)
            scores = logits_processor(input_ids, scores)
            if scores_out is not None:
                scores_out += (scores,)
            if do_sample:
                next_tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                next_tokens = torch.argmax(scores, dim=-1)
            if has_eos_stopping_criteria and pad_token_id is not None:
                next_tokens = next_tokens * unfinished + pad_token_id * (1 - unfinished)
            input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
            if streamer is not None:
                streamer.put(next_tokens.cpu())
            unfinished = unfinished & ~stopping_criteria(input_ids, None)
            if unfinished.max() == 0:
                break
            step_ids = torch.cat([next_tokens, next_tokens])[:, None]
            if mask2 is not None:
                mask2 = torch.cat([mask2, mask2.new_ones((2 * batch, 1))], dim=-1)
            positions2 = positions2[:, -1:] + 1
    if streamer is not None:
        streamer.end()
    if return_dict:
        return GenerateDecoderOnlyOutput(sequences=input_ids, scores=scores_out, logits=logits_out)
    return input_ids


def move_stop_strings(generate_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Turn `stop_strings` + `tokenizer` into a `StopStringCriteria` in `stopping_criteria` (in place).

    transformers 5.24's `generate` drops the `tokenizer` argument when `custom_generate` is a callable, so
    `stop_strings` would fail there; the criterion built here needs no tokenizer later.
    """
    stop_strings = generate_kwargs.pop("stop_strings", None)
    tokenizer = generate_kwargs.pop("tokenizer", None)
    if stop_strings is None:
        return generate_kwargs
    if tokenizer is None:
        raise InvalidOptionError("stop_strings needs the tokenizer: pass tokenizer=... as well")
    from transformers import StoppingCriteriaList, StopStringCriteria

    criteria = StoppingCriteriaList(generate_kwargs.get("stopping_criteria") or [])
    stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
    criteria.append(StopStringCriteria(tokenizer, stops))
    generate_kwargs["stopping_criteria"] = criteria
    return generate_kwargs


def scmoe_generate(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    alpha: float | None = None,
    beta: float | Sequence[float] | None = None,
    weak: str | None = None,
    *,
    config: SCMoEConfig | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    ban_eos: bool | None = None,
    **generate_kwargs: Any,
) -> torch.LongTensor:
    """Greedy SCMoE decoding; returns prompt + generated ids, as `model.generate(do_sample=False)` does.

    Args:
        model (`PreTrainedModel`): a MoE causal LM of a family with a routing rule (`hf_attn_zoo.moe.ROUTING_RULES`),
            possibly with routing overrides for every row installed (a MoTE patch): see the module docstring.
        input_ids (`torch.LongTensor`): `(B, T)` prompts, left-padded for a batch.
        attention_mask (`torch.Tensor`, *optional*): `(B, T)`, 0 on padding.
        max_new_tokens (`int`, *optional*): tokens to generate at most (else the generation config's length).
        alpha (`float`, *optional*, defaults to 0.1): plausibility cutoff in (0, 1].
        beta (`float`, *optional*, defaults to 0.5): contrast strength >= 0 (`0` = greedy), or one per row.
        weak (`str`, *optional*, defaults to `"rank:2"`): `"rank:k"`, `"top1"` or `"top_m:m"`.
        config (`SCMoEConfig`, *optional*): all options at once, instead of alpha/beta/weak/ban_eos.
        eos_token_id (`int | list[int]`, *optional*): stops a row (defaults to the generation config's).
        pad_token_id (`int`, *optional*): fills finished rows (defaults to the generation config's, else EOS).
        ban_eos (`bool`, *optional*, defaults to `False`): never choose EOS.
        **generate_kwargs: more `generate` arguments (`stopping_criteria`, `logits_processor`, `stop_strings` with
            `tokenizer`, `return_dict_in_generate`, ...). `do_sample=True` samples from softmax of the score.

    Example:
        >>> batch = tokenizer(["2 + 2 =", "The capital of France is"], return_tensors="pt", padding=True,
        ...                   padding_side="left")
        >>> out = scmoe_generate(model, batch.input_ids, batch.attention_mask, max_new_tokens=32, beta=0.5)
        >>> tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    """
    loose_beta, row_beta = _split_beta(beta)
    config = _resolve_config(config, alpha, loose_beta, weak, ban_eos)
    generate_kwargs.setdefault("do_sample", False)
    for key, value in (
        ("max_new_tokens", max_new_tokens),
        ("eos_token_id", eos_token_id),
        ("pad_token_id", pad_token_id),
        ("attention_mask", attention_mask),
    ):
        if value is not None:
            generate_kwargs[key] = value
    if row_beta is not None:
        generate_kwargs["beta"] = row_beta
    move_stop_strings(generate_kwargs)
    return model.generate(input_ids, custom_generate=scmoe_decode, scmoe=config, **generate_kwargs)
