"""The contrast itself: the weak routing on the second half of a doubled batch, the contrastive score (Eq. 5-6),
the paired strong + weak forward and contrastive log-likelihood scoring."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import InvalidOptionError, PatchConflictError, UnsupportedArchitectureError
from ...moe import with_row_override
from .config import SCMoEConfig, _resolve_config

__all__ = ["SCMoEOutput", "check_model", "contrastive_scores", "scmoe_forward", "scmoe_logprobs"]

# weak log-probs are floored here, so a token the weak pass rules out entirely (-inf) gets a large finite bonus
# instead of +inf (or NaN when beta = 0)
_WEAK_LOGPROB_FLOOR = -1e4


# the fix an impossible weak routing on top of installed overrides (e.g. a MoTE patch) suggests
_MERGE_FIX = (
    "use a weak routing that fits them (weak='rank:k' excludes forced and dropped experts and needs k <= the experts "
    "left once the disabled ones are masked: use weak='top1' or weak='top_m:M' there, with M >= the forced experts), "
    "or change the installed switches (the mote patch / switch_experts)"
)


@contextlib.contextmanager
def _weak_routing(model: torch.nn.Module, config: SCMoEConfig, batch: int) -> Iterator[None]:
    """Rows `batch..2*batch-1` use the weak routing, rows `0..batch-1` the model's own, until the block ends.

    The model's own routing includes routing overrides installed for every row (a MoTE patch, `switch_experts`):
    the strong rows keep them, the weak rows get them merged with the weak routing (`with_row_override`); they are
    restored exactly when the block ends, also on error.
    """
    rows = range(batch, 2 * batch)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(with_row_override(model, config.weak_override(), rows, conflict_fix=_MERGE_FIX))
        except UnsupportedArchitectureError as err:
            raise UnsupportedArchitectureError(f"SCMoE contrasts two routings of a MoE model: {err}") from None
        except InvalidOptionError as err:
            raise InvalidOptionError(f"SCMoE weak routing {config.weak_spec()!r}: {err}") from None
        except PatchConflictError as err:
            raise PatchConflictError(
                f"SCMoE needs the batch rows for its strong (0..{batch - 1}) and weak ({batch}..{2 * batch - 1}) "
                f"passes: {err}"
            ) from None
        yield


def check_model(model: torch.nn.Module, config: SCMoEConfig | None = None) -> None:
    """Raise the error SCMoE would raise on `model` without running it: a dense model, weak rank or m out of range, a
    weak routing that cannot merge with the installed routing overrides (e.g. a MoTE patch), or installed overrides
    limited to some rows."""
    with _weak_routing(model, config or SCMoEConfig(), 1):
        pass


def contrastive_scores(
    strong_logits: torch.Tensor, weak_logits: torch.Tensor, alpha: float = 0.1, beta: float | torch.Tensor = 0.5
) -> torch.Tensor:
    """SCMoE scores (Eq. 5-6) from the two passes' logits, over the last dimension (the vocabulary).

    Args:
        strong_logits (`torch.Tensor`): `(..., V)` logits of the strong (normal) routing.
        weak_logits (`torch.Tensor`): `(..., V)` logits of the weak routing.
        alpha (`float`, *optional*, defaults to 0.1): plausibility cutoff in (0, 1].
        beta (`float | torch.Tensor`, *optional*, defaults to 0.5): contrast strength, or one per leading row
            (shape `(B,)` for `(B, V)` logits).

    Returns:
        `torch.Tensor`: float32 `(..., V)`: `(1 + beta) log p_s - beta log p_w` where `p_s >= alpha max p_s`,
        `-inf` elsewhere. Unnormalised; `scmoe_logprobs` normalises it.
    """
    strong = torch.log_softmax(strong_logits.float(), dim=-1)
    weak = torch.log_softmax(weak_logits.float(), dim=-1).clamp_min(_WEAK_LOGPROB_FLOOR)
    if isinstance(beta, torch.Tensor):
        beta = beta.to(strong.device, torch.float32).reshape(beta.shape + (1,) * (strong.dim() - beta.dim()))
        scores = strong + beta * (strong - weak)
    elif beta == 0:
        scores = strong
    else:
        scores = (1.0 + beta) * strong - beta * weak
    cutoff = strong.amax(dim=-1, keepdim=True) + math.log(alpha)
    return scores.masked_fill(strong < cutoff, float("-inf"))


@dataclass
class SCMoEOutput:
    """Logits of one paired forward.

    Attributes:
        strong_logits (`torch.Tensor`): `(B, T, V)` logits under the model's own routing (with the routing
            overrides installed on it, e.g. a MoTE patch).
        weak_logits (`torch.Tensor`): `(B, T, V)` logits under the weak routing (merged with those overrides).
    """

    strong_logits: torch.Tensor
    weak_logits: torch.Tensor


def scmoe_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    weak: str | None = None,
    config: SCMoEConfig | None = None,
    **forward_kwargs: Any,
) -> SCMoEOutput:
    """Strong and weak logits of `input_ids` from one batched forward of 2B rows (no cache).

    Args:
        input_ids (`torch.LongTensor`): `(B, T)`.
        attention_mask (`torch.Tensor`, *optional*): `(B, T)`, 1 for real tokens; position ids then come from it
            (left padding works); `None` means no padding.
        weak (`str`, *optional*): weak routing spec (`"rank:2"`, `"top1"`, `"top_m:2"`); defaults to rank-2.
        config (`SCMoEConfig`, *optional*): instead of `weak`.
        **forward_kwargs: more arguments of the model's forward (e.g. `logits_to_keep`).
    """
    config = _resolve_config(config, None, None, weak, None)
    batch = input_ids.shape[0]
    kwargs = dict(forward_kwargs)
    if attention_mask is not None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        kwargs.update(
            attention_mask=torch.cat([attention_mask, attention_mask]),
            position_ids=torch.cat([position_ids, position_ids]),
        )
    with torch.no_grad(), _weak_routing(model, config, batch):
        logits = model(input_ids=torch.cat([input_ids, input_ids]), use_cache=False, **kwargs).logits
    return SCMoEOutput(logits[:batch], logits[batch:])


def scmoe_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    weak: str | None = None,
    *,
    config: SCMoEConfig | None = None,
) -> torch.Tensor:
    """Contrastive next-token log-scores for log-likelihood scoring (multiple choice, perplexity).

    At each position t the SCMoE score `s_t(i)` (see `contrastive_scores`) is normalised **over the plausible set
    V_alpha(t)** = {i : p_s(i) >= alpha max p_s}: `log q_t(i) = s_t(i) - logsumexp_{j in V_alpha(t)} s_t(j)` for
    i in V_alpha(t), `-inf` for every other token. `q_t` is the distribution SCMoE sampling draws from, and its
    argmax is SCMoE's greedy choice. A continuation token outside V_alpha(t) therefore scores `-inf`; for
    multiple-choice tasks a small alpha (e.g. 1e-4) keeps more choices comparable.

    Args:
        input_ids (`torch.LongTensor`): `(B, T)`.
        attention_mask (`torch.Tensor`, *optional*): `(B, T)`; `None` = no padding (or right padding, whose
            positions are then ignored by the caller, as lm-eval does).
        alpha, beta, weak: as in `SCMoEConfig` (defaults 0.1, 0.5, rank-2); or pass `config`.

    Returns:
        `torch.Tensor`: float32 `(B, T, V)`; row t scores token t+1, as `log_softmax(model(input_ids).logits)`.
    """
    config = _resolve_config(config, alpha, beta, weak, None)
    out = scmoe_forward(model, input_ids, attention_mask, config=config)
    scores = contrastive_scores(out.strong_logits, out.weak_logits, config.alpha, config.beta)
    return torch.log_softmax(scores, dim=-1)
