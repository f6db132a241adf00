"""SCMoE's options: `SCMoEConfig` (alpha, beta, the weak routing, ban_eos) and the weak-routing spec strings."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ...errors import InvalidOptionError
from ...moe import RoutingOverride

__all__ = ["SCMoEConfig", "WeakKind", "parse_weak"]

WeakKind = Literal["rank", "top1", "top_m"]
_WEAK_KINDS = ("rank", "top1", "top_m")


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

    # the bounds in the metadata are what `hf-attn-zoo methods` shows; __post_init__ checks them
    alpha: float = field(
        default=0.1, metadata={"help": "plausibility cutoff in (0, 1]: keep p_s >= alpha max p_s", "gt": 0, "le": 1}
    )
    beta: float = field(default=0.5, metadata={"help": "contrast strength >= 0; 0 = greedy", "ge": 0})
    weak: WeakKind = field(default="rank", metadata={"help": "weak routing: rank | top1 | top_m"})
    weak_rank: int = field(default=2, metadata={"help": "1-based expert rank of weak='rank'", "ge": 1})
    m: int | None = field(default=None, metadata={"help": "experts per token of weak='top_m'", "ge": 1})
    ban_eos: bool = field(default=False, metadata={"help": "never choose EOS (the official code's default)"})

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha <= 1:
            raise InvalidOptionError(f"SCMoE alpha must be a number in (0, 1], got {self.alpha!r}")
        if (
            isinstance(self.beta, bool)
            or not isinstance(self.beta, (int, float))
            or not math.isfinite(self.beta)
            or self.beta < 0
        ):
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
    def from_kwargs(
        cls, alpha: float | None = None, beta: float | None = None, weak: str | None = None, ban_eos: bool | None = None
    ) -> SCMoEConfig:
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
