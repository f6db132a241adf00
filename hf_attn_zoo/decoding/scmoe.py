"""SCMoE: self-contrast decoding of MoE models, from "Unchosen Experts Can Contribute Too: Unleashing MoE Models'
Power by Self-Contrast" (arXiv:2405.14507, NeurIPS 2024).

At every step the same MoE model runs twice: a **strong** activation (its normal top-k routing) and a **weak** one
(a different routing in every MoE layer, e.g. each token sent to its rank-2 expert alone). The next token maximises
the contrastive score over the tokens the strong model finds plausible (Eq. 5-6):

    V_alpha = {i : p_s(i) >= alpha * max_j p_s(j)}
    s(i)    = (1 + beta) * log p_s(i) - beta * log p_w(i)    for i in V_alpha,   -inf otherwise

Defaults are the paper's: alpha = 0.1, beta = 0.5, weak = rank-2 (Mixtral). Greedy decoding on `s`; with
`do_sample=True` tokens are drawn from softmax(s) (the paper's `scmoe_with_sampling`). Decoding only: no training,
no new weights. The paper tuned beta on the test sets; `pick_beta` tunes it on a held-out slice instead.

How it works here (one batched forward per step, unlike the official code's two sequential passes):

- the batch is duplicated, `[x; x]` (2B rows), with one `DynamicCache` of batch 2B; rows 0..B-1 are the strong
  pass, rows B..2B-1 the weak pass, each with its own cache rows;
- `hf_attn_zoo.moe.with_row_override(model, RoutingOverride(rank=2), rows=range(B, 2B))` re-routes the
  weak rows in every MoE layer while the strong rows keep the model's own routing (`hf_attn_zoo.moe.routing` has
  the per-family routing rules);
- on a model that already carries routing overrides for every row (a MoTE patch, `switch_experts`, `set_routing`
  without `rows`), the strong rows keep them and the weak rows get them merged with the weak routing: switched-off
  experts stay off (rank-2 is the 2nd expert among those left), forced experts stay on, gains stay; an impossible
  merge (e.g. rank-k where experts are forced or dropped) raises `InvalidOptionError` naming the layer. The
  installed overrides are restored exactly afterwards (also on error); their `record` / `on_route` see all 2B rows;
- left padding is handled like `generate`: position ids from the attention mask (cumsum - 1, padding at 0), the
  mask grows by one column per step, and a finished row keeps receiving the pad token.

Weak routings (`SCMoEConfig.weak`):

- `"rank"` (`weak_rank`, default 2): each token goes to the expert ranked `weak_rank` (1-based) alone, weight 1
  (paper Eq. 4, the Mixtral setting of every main result);
- `"top1"`: top-1 routing with the family's own weights (renormalised iff the family renormalises: always for
  Mixtral, iff `norm_topk_prob` for Qwen/OLMoE);
- `"top_m"` (`m`): top-m routing with the family's weights (the paper's DeepSeekMoE setting, where
  `norm_topk_prob=False` leaves them unnormalised). Shared experts (Qwen2-MoE, DeepSeek-V3) stay on in both passes.

Departures from the official code (`DavidFanzz/SCMoE`, `decodingmethod/moe_utils.py`): the EOS token is allowed by
default (`ban_eos=False`; the official CLI bans it unless `--early_stop`), and the per-pass temperatures
(`--cd_tt`, `--cd_st`, both 1.0 by default) are not exposed. Scores use log-probabilities, not raw logits; the two differ
by a per-row constant, so greedy choices and softmax(s) are the same.

Entry points: `scmoe_generate` (greedy, returns ids like `generate`), `model.generate(..., custom_generate=
scmoe_decode, ...)`, `model.generate(..., custom_generate=CUSTOM_GENERATE_DIR, trust_remote_code=True)`, and
`scmoe_logprobs` for contrastive log-likelihood scoring. lm-eval: `hf_attn_zoo.eval_harness.lm_model` (`scmoe=true`).

Cost: one forward of 2B rows per step, whose weak rows also run experts the strong rows did not pick. On a 2-core
CPU, where a doubled batch alone costs 1.2-1.6x (MKL's small-matrix GEMMs), SCMoE decodes at 0.58x (batch 1) and
0.68x (batch 4) greedy tokens/s, against 0.48x and 0.50x for two sequential passes (`benchmarks/scmoe_decode.py`);
on a GPU at small batch, where decoding is bound by weight reads and launches, the doubled rows should cost less
(not measured yet).

Limits: routing overrides installed for some rows only (`RoutingOverride.rows`) raise `PatchConflictError` (SCMoE
needs the batch rows for its two passes); decoding cannot restart from a non-empty cache; beam search is not
supported (greedy or sampling only).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import InvalidOptionError, PatchConflictError, UnsupportedArchitectureError
from ..moe import RoutingOverride, with_row_override

__all__ = [
    "CUSTOM_GENERATE_DIR",
    "SCMoEConfig",
    "SCMoEOutput",
    "check_model",
    "contrastive_scores",
    "gsm8k_correct",
    "gsm8k_heldout",
    "gsm8k_prompt",
    "move_stop_strings",
    "parse_weak",
    "pick_beta",
    "scmoe_decode",
    "scmoe_forward",
    "scmoe_generate",
    "scmoe_logprobs",
]

WeakKind = Literal["rank", "top1", "top_m"]
_WEAK_KINDS = ("rank", "top1", "top_m")

# `model.generate(custom_generate=CUSTOM_GENERATE_DIR, trust_remote_code=True)` loads custom_generate/generate.py here
CUSTOM_GENERATE_DIR = str(Path(__file__).resolve().parent)

# weak log-probs are floored here, so a token the weak pass rules out entirely (-inf) gets a large finite bonus
# instead of +inf (or NaN when beta = 0)
_WEAK_LOGPROB_FLOOR = -1e4


@dataclass
class SCMoEConfig:
    """SCMoE decoding options (arXiv:2405.14507, Eq. 5-6 and App. C-D).

    Args:
        alpha (`float`, *optional*, defaults to 0.1):
            Plausibility cutoff in (0, 1]: only tokens with `p_strong >= alpha * max p_strong` can be chosen.
            `alpha=1` keeps only the strong argmax (plain greedy).
        beta (`float`, *optional*, defaults to 0.5):
            Contrast strength >= 0: score = (1 + beta) log p_strong - beta log p_weak. `beta=0` is greedy decoding.
        weak (`str`, *optional*, defaults to `"rank"`):
            Weak routing: `"rank"` (each token to its `weak_rank`-th expert alone, weight 1), `"top1"`, or `"top_m"`
            (top-`m` with the family's own weights).
        weak_rank (`int`, *optional*, defaults to 2):
            1-based expert rank of `weak="rank"` (the paper's Mixtral choice is 2).
        m (`int`, *optional*):
            Experts per token of `weak="top_m"` (the paper's DeepSeekMoE runs use 1-3).
        ban_eos (`bool`, *optional*, defaults to `False`):
            Never choose the EOS token(s) (the official code's default, without `--early_stop`).
    """

    alpha: float = field(default=0.1, metadata={"help": "plausibility cutoff in (0, 1]: keep p_s >= alpha max p_s"})
    beta: float = field(default=0.5, metadata={"help": "contrast strength >= 0; 0 = greedy"})
    weak: WeakKind = field(default="rank", metadata={"help": "weak routing: rank | top1 | top_m"})
    weak_rank: int = field(default=2, metadata={"help": "1-based expert rank of weak='rank'"})
    m: int | None = field(default=None, metadata={"help": "experts per token of weak='top_m'"})
    ban_eos: bool = field(default=False, metadata={"help": "never choose EOS (the official code's default)"})

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha <= 1:
            raise InvalidOptionError(f"SCMoE alpha must be a number in (0, 1], got {self.alpha!r}")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not math.isfinite(self.beta) \
                or self.beta < 0:
            raise InvalidOptionError(f"SCMoE beta must be a finite number >= 0, got {self.beta!r}")
        self.alpha, self.beta = float(self.alpha), float(self.beta)
        if self.weak not in _WEAK_KINDS:
            raise InvalidOptionError(
                f"SCMoE weak must be one of {', '.join(_WEAK_KINDS)} (spec strings: 'rank:2', 'top1', 'top_m:2'), "
                f"got {self.weak!r}"
            )
        if not _is_int(self.weak_rank) or self.weak_rank < 1:
            raise InvalidOptionError(f"SCMoE weak_rank must be an int >= 1, got {self.weak_rank!r}")
        if self.weak == "top_m":
            if self.m is None:
                raise InvalidOptionError("SCMoE weak='top_m' needs m (experts per token), e.g. weak='top_m:2'")
        if self.m is not None and (not _is_int(self.m) or self.m < 1):
            raise InvalidOptionError(f"SCMoE m must be an int >= 1, got {self.m!r}")
        if not isinstance(self.ban_eos, bool):
            raise InvalidOptionError(f"SCMoE ban_eos must be a bool, got {self.ban_eos!r}")

    @classmethod
    def from_kwargs(cls, alpha: float | None = None, beta: float | None = None, weak: str | None = None,
                    ban_eos: bool | None = None) -> SCMoEConfig:
        """A config from loose options; `weak` may be a spec string (`"rank:3"`, `"top1"`, `"top_m:2"`)."""
        options: dict[str, Any] = {}
        if alpha is not None:
            options["alpha"] = alpha
        if beta is not None:
            options["beta"] = beta
        if weak is not None:
            options.update(parse_weak(weak))
        if ban_eos is not None:
            options["ban_eos"] = ban_eos
        return cls(**options)

    def weak_override(self, rows: range | Sequence[int] | None = None) -> RoutingOverride:
        """The weak pass's `RoutingOverride` (limited to `rows`)."""
        if self.weak == "rank":
            return RoutingOverride(rank=self.weak_rank, rows=rows)
        return RoutingOverride(top_k=1 if self.weak == "top1" else self.m, rows=rows)

    def weak_spec(self) -> str:
        """The weak routing as a spec string (`"rank:2"`, `"top1"`, `"top_m:3"`)."""
        if self.weak == "rank":
            return f"rank:{self.weak_rank}"
        return "top1" if self.weak == "top1" else f"top_m:{self.m}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_weak(spec: str) -> dict[str, Any]:
    """`"rank"`, `"rank:3"`, `"top1"`, `"top_m:2"` -> `SCMoEConfig` fields (`weak`, `weak_rank`, `m`)."""
    if not isinstance(spec, str):
        raise InvalidOptionError(f"SCMoE weak must be a string such as 'rank:2', 'top1' or 'top_m:2', got {spec!r}")
    match = re.fullmatch(r"\s*(rank|top1|top_m)\s*(?::\s*(\S+))?\s*", spec)
    if match is None:
        raise InvalidOptionError(
            f"SCMoE weak {spec!r} is not one of 'rank[:k]', 'top1', 'top_m:m' (e.g. 'rank:2', 'top_m:2')"
        )
    kind, value = match.group(1), match.group(2)
    if value is not None:
        if kind == "top1":
            raise InvalidOptionError(f"SCMoE weak 'top1' takes no value, got {spec!r}")
        if not value.isdigit():
            raise InvalidOptionError(f"SCMoE weak {spec!r}: {value!r} is not a positive integer")
    if kind == "rank":
        return {"weak": "rank", **({"weak_rank": int(value)} if value is not None else {})}
    if kind == "top_m":
        return {"weak": "top_m", "m": None if value is None else int(value)}
    return {"weak": "top1"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _resolve_config(config: SCMoEConfig | None, alpha: Any, beta: Any, weak: Any, ban_eos: Any) -> SCMoEConfig:
    loose = {"alpha": alpha, "beta": beta, "weak": weak, "ban_eos": ban_eos}
    if config is not None:
        given = [k for k, v in loose.items() if v is not None]
        if given:
            raise InvalidOptionError(f"pass either an SCMoEConfig or {', '.join(given)}, not both")
        if not isinstance(config, SCMoEConfig):
            raise InvalidOptionError(f"config must be an SCMoEConfig, got {type(config).__name__}")
        return config
    if isinstance(weak, SCMoEConfig):
        raise InvalidOptionError("pass an SCMoEConfig as `scmoe=`/`config=`, not as `weak=`")
    return SCMoEConfig.from_kwargs(alpha=alpha, beta=beta, weak=weak, ban_eos=ban_eos)


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


def contrastive_scores(strong_logits: torch.Tensor, weak_logits: torch.Tensor, alpha: float = 0.1,
                       beta: float | torch.Tensor = 0.5) -> torch.Tensor:
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


def scmoe_forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                  weak: str | None = None, config: SCMoEConfig | None = None, **forward_kwargs: Any) -> SCMoEOutput:
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
        kwargs.update(attention_mask=torch.cat([attention_mask, attention_mask]),
                      position_ids=torch.cat([position_ids, position_ids]))
    with torch.no_grad(), _weak_routing(model, config, batch):
        logits = model(input_ids=torch.cat([input_ids, input_ids]), use_cache=False, **kwargs).logits
    return SCMoEOutput(logits[:batch], logits[batch:])


def scmoe_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   alpha: float | None = None, beta: float | None = None, weak: str | None = None, *,
                   config: SCMoEConfig | None = None) -> torch.Tensor:
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
    cache = DynamicCache(config=model.config)
    step_ids = torch.cat([input_ids, input_ids])
    optimise = getattr(model, "_optimize_model_for_decode", None)

    with _weak_routing(model, config, batch), (optimise() if optimise is not None else contextlib.nullcontext()):
        while True:
            length = step_ids.shape[1]
            outputs = model(input_ids=step_ids, attention_mask=mask2, position_ids=positions2[:, -length:],
                            cache=cache, use_cache=True, return_dict=True, **forward_kwargs)
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
    for key, value in (("max_new_tokens", max_new_tokens), ("eos_token_id", eos_token_id),
                       ("pad_token_id", pad_token_id), ("attention_mask", attention_mask)):
        if value is not None:
            generate_kwargs[key] = value
    if row_beta is not None:
        generate_kwargs["beta"] = row_beta
    move_stop_strings(generate_kwargs)
    return model.generate(input_ids, custom_generate=scmoe_decode, scmoe=config, **generate_kwargs)


def gsm8k_heldout(n: int = 50, num_fewshot: int = 5) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """GSM8K problems for tuning beta, disjoint from what `zoo_gsm8k` scores with `limit`.

    The offline pack has only GSM8K's test split (1,319), and `zoo_gsm8k` scores its first `limit` problems (with
    5 shots drawn from the rest of test). This returns the **last** `n` problems and, before them, `num_fewshot`
    shot examples, all from the tail of the test split: disjoint from any `limit <= 1319 - n - num_fewshot` run.
    A full-test evaluation overlaps them; report it with that caveat, or exclude them.

    Returns:
        `(examples, fewshot)`: lists of `{"question", "answer"}` dicts (answers end in `#### <number>`).
    """
    import json

    from ..assets.benchmarks import benchmark_path

    with open(benchmark_path("gsm8k/test"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    rows = [{"question": r["question"], "answer": r["answer"]} for r in rows]
    if n < 1 or num_fewshot < 0 or n + num_fewshot > len(rows):
        raise InvalidOptionError(f"gsm8k_heldout: need 1 <= n and n + num_fewshot <= {len(rows)}")
    return rows[len(rows) - n:], rows[len(rows) - n - num_fewshot:len(rows) - n]


_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def _normalise_number(text: str) -> str:
    text = re.sub(r"(?s).*#### ", "", text.strip())
    return re.sub(r"\.$", "", text.replace(",", "").replace("$", "")).strip().lower()


def gsm8k_correct(example: Mapping[str, str], completion: str) -> float:
    """1.0 when the completion's answer equals the gold one, as `zoo_gsm8k`'s flexible-extract filter scores it
    (last number in the completion; commas, `$` and a final period ignored)."""
    matches = _NUMBER.findall(completion)
    if not matches:
        return 0.0
    predicted = next(m for m in matches[-1] if m)
    return float(_normalise_number(predicted) == _normalise_number(example["answer"]))


def gsm8k_prompt(example: Mapping[str, str], fewshot: Sequence[Mapping[str, str]] = ()) -> str:
    """`zoo_gsm8k`'s prompt: `Question: ...\\nAnswer: ...` shots separated by blank lines, then the question."""
    shots = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in fewshot)
    return f"{shots}Question: {example['question']}\nAnswer:"


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
        examples (`list[dict]`, *optional*): held-out examples; defaults to `gsm8k_heldout()`'s 50 GSM8K problems
            (the tail of the test split, disjoint from `zoo_gsm8k --limit N` for N <= 1264), with its 5 shots.
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
        chunk = jobs[start:start + batch_size]
        batch = tokenizer([prompts[i] for i, _ in chunk], return_tensors="pt", padding=True, padding_side="left")
        criteria = StoppingCriteriaList([StopStringCriteria(tokenizer, list(stop))]) if stop else None
        out = scmoe_generate(
            model, batch.input_ids.to(device), batch.attention_mask.to(device), max_new_tokens=max_new_tokens,
            alpha=alpha, weak=weak, beta=[float(betas[b]) for _, b in chunk], stopping_criteria=criteria,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
        for (i, b), text in zip(chunk, texts):
            for s in stop:
                text = text.split(s, 1)[0]
            totals[b] += float(score_fn(examples[i], text))
    table = [{"beta": float(beta), "score": totals[b] / len(examples), "n": len(examples)}
             for b, beta in enumerate(betas)]
    best = max(table, key=lambda row: (row["score"], -row["beta"]))
    return best["beta"], table
