"""MoA plans: one elastic rule `S_h(N) = alpha_h + beta_h * N` per head and layer, as a JSON file.

A plan (MoA: Mixture of Sparse Attention for Automatic LLM Compression, arXiv:2406.14909, §3) is

    {"model": {"model_type", "num_layers", "num_heads", "num_kv_heads", "name_or_path"},
     "granularity": "kv_head" | "head", "length": N or null, "sinks": 64,
     "alphas": [[...] per layer], "betas": [[...] per layer], "density": float or null, "provenance": {...}}

with one entry per KV head (`kv_head`: the query heads of a GQA group share it, so that KV head's cache shrinks) or per
query head (`head`; HF order: query head `h` belongs to KV head `h // group`).

The rule of a head at reference length `N` (`rule_span`): span `S = clamp(floor(alpha + beta * N), 1, N)` keys,
`s = min(sinks, S - 1)` of them the row's first real tokens and the other `w = S - s` a causal window, the query
included. Query `q` attends key `k <= q` iff `k < s` or `q - k < w`, so every query attends at most `S` keys
(MoA's static sink part plus its local window). `s < S` keeps the query itself in its window.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import CheckpointMismatchError, InvalidOptionError

__all__ = ["DEFAULT_SINKS", "MoAPlan", "load_plan", "plan_model_info", "rule_span", "uniform_plan"]

DEFAULT_SINKS = 64
Granularity = Literal["kv_head", "head"]


def rule_span(alpha: float, beta: float, length: int, sinks: int) -> tuple[int, int]:
    """`(s, w)`: the sink tokens and the window of rule `(alpha, beta)` at reference length `length`."""
    span = min(length, max(1, math.floor(alpha + beta * length)))
    sink = min(sinks, span - 1)
    return sink, span - sink


@dataclass
class MoAPlan:
    """An MoA plan (see the module docstring); `to_dict`/`from_dict` give the JSON form."""

    model: dict[str, Any]
    alphas: list[list[float]]
    betas: list[list[float]]
    granularity: Granularity = "kv_head"
    length: int | None = None
    sinks: int = DEFAULT_SINKS
    density: float | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "the plan") -> MoAPlan:
        """Parse and check the plan's own consistency (list lengths, ranges); `source` names it in errors."""
        if not isinstance(data, dict):
            raise InvalidOptionError(f"moa: {source} is not a JSON object; write a plan with `hf-attn-zoo moa search`.")
        missing = sorted({"model", "alphas", "betas"} - set(data))
        unknown = sorted(set(data) - {f for f in cls.__dataclass_fields__})
        if missing or unknown:
            raise InvalidOptionError(
                f"moa: {source} lacks the keys {missing} or has unknown keys {unknown}; a plan "
                f"has {sorted(cls.__dataclass_fields__)} (write one with `hf-attn-zoo moa "
                "search`)."
            )
        plan = cls(**data)
        model = plan.model if isinstance(plan.model, dict) else {}
        for key in ("num_layers", "num_heads", "num_kv_heads"):
            if not isinstance(model.get(key), int) or model[key] < 1:
                raise InvalidOptionError(
                    f"moa: {source}: model.{key} must be a positive integer, got "
                    f"{model.get(key)!r}; regenerate the plan with `hf-attn-zoo moa search`."
                )
        if plan.granularity not in ("kv_head", "head"):
            raise InvalidOptionError(f"moa: {source}: granularity={plan.granularity!r}; use 'kv_head' or 'head'.")
        if not isinstance(plan.sinks, int) or plan.sinks < 0:
            raise InvalidOptionError(f"moa: {source}: sinks={plan.sinks!r} must be an integer >= 0.")
        if plan.length is not None and (not isinstance(plan.length, int) or plan.length < 1):
            raise InvalidOptionError(f"moa: {source}: length={plan.length!r} must be a positive integer or null.")
        heads = model["num_kv_heads"] if plan.granularity == "kv_head" else model["num_heads"]
        for name in ("alphas", "betas"):
            rows = getattr(plan, name)
            if not isinstance(rows, list) or len(rows) != model["num_layers"]:
                got = len(rows) if isinstance(rows, list) else type(rows).__name__
                raise InvalidOptionError(
                    f"moa: {source}: {name} has {got} layers, the plan's model has "
                    f"{model['num_layers']}; the plan is incomplete, regenerate it."
                )
            for layer, row in enumerate(rows):
                if not isinstance(row, list) or len(row) != heads:
                    got = len(row) if isinstance(row, list) else type(row).__name__
                    raise InvalidOptionError(
                        f"moa: {source}: {name}[{layer}] has {got} heads, a {plan.granularity} plan of this model "
                        f"needs {heads}; the plan is incomplete, regenerate it."
                    )
                if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in row):
                    raise InvalidOptionError(
                        f"moa: {source}: {name}[{layer}] holds a value that is not a finite number."
                    )
        for layer, row in enumerate(plan.betas):
            bad = [b for b in row if not 0.0 <= b <= 1.0]
            if bad:
                raise InvalidOptionError(
                    f"moa: {source}: betas[{layer}] holds {bad[0]}; every beta must be in [0, 1] "
                    "(the share of the reference length a head attends)."
                )
        return plan

    def check_model(self, model_config, source: str = "the plan") -> None:
        """Raise `CheckpointMismatchError` if the plan was made for a model of another shape or type."""
        expected = plan_model_info(model_config)
        wrong = [
            f"{key}: plan {self.model.get(key)!r}, model {expected[key]!r}"
            for key in ("model_type", "num_layers", "num_heads", "num_kv_heads")
            if self.model.get(key) != expected[key]
        ]
        if wrong:
            raise CheckpointMismatchError(
                f"moa: {source} was made for another model ({'; '.join(wrong)}); profile and search this model "
                "(`hf-attn-zoo moa profile` then `moa search`) or pass the plan made for it."
            )

    def check_spans(self, length: int, source: str = "the plan") -> None:
        """Raise `InvalidOptionError` if a rule gives a span below one key at reference length `length`."""
        for layer, (alphas, betas) in enumerate(zip(self.alphas, self.betas)):
            for head, (alpha, beta) in enumerate(zip(alphas, betas)):
                if alpha + beta * length < 1:
                    raise InvalidOptionError(
                        f"moa: {source}: layer {layer}, head {head} has the span alpha + beta * N = {alpha} + {beta} x "
                        f"{length} = {alpha + beta * length:g} < 1 (negative or empty); raise its alpha or the "
                        "reference `length`, or regenerate the plan."
                    )

    def query_head_rules(self, layer: int, length: int, sinks: int) -> list[tuple[int, int]]:
        """`(s, w)` per query head of `layer` (a `kv_head` rule is shared by its group, HF kv-major order)."""
        rules = [rule_span(a, b, length, sinks) for a, b in zip(self.alphas[layer], self.betas[layer])]
        if self.granularity == "head":
            return rules
        group = self.model["num_heads"] // self.model["num_kv_heads"]
        return [rules[h // group] for h in range(self.model["num_heads"])]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def plan_model_info(model_config) -> dict[str, Any]:
    """The `model` block of a plan for `model_config` (its text config for multimodal models)."""
    text = getattr(model_config, "text_config", None) or model_config
    heads = text.num_attention_heads
    return {
        "model_type": text.model_type,
        "num_layers": text.num_hidden_layers,
        "num_heads": heads,
        "num_kv_heads": getattr(text, "num_key_value_heads", None) or heads,
        "name_or_path": str(getattr(model_config, "_name_or_path", "") or ""),
    }


def uniform_plan(
    model_config,
    alpha: float,
    beta: float,
    granularity: Granularity = "kv_head",
    sinks: int = DEFAULT_SINKS,
    length: int | None = None,
) -> MoAPlan:
    """Every head with the rule `(alpha, beta)` (MoA's StreamingLLM baseline: alpha=0, beta=0.5)."""
    info = plan_model_info(model_config)
    heads = info["num_kv_heads"] if granularity == "kv_head" else info["num_heads"]
    return MoAPlan(
        model=info,
        alphas=[[alpha] * heads for _ in range(info["num_layers"])],
        betas=[[beta] * heads for _ in range(info["num_layers"])],
        granularity=granularity,
        length=length,
        sinks=sinks,
        provenance={"uniform": {"alpha": alpha, "beta": beta}},
    )


def load_plan(source: str | Path | dict[str, Any]) -> tuple[MoAPlan, str]:
    """`(plan, name)` from a JSON file path or the dict itself; one `InvalidOptionError` per problem."""
    if isinstance(source, dict):
        return MoAPlan.from_dict(source, "the inline plan"), "the inline plan"
    path = Path(source).expanduser()
    name = f"plan file {str(path)!r}"
    try:
        text = path.read_text()
    except OSError as error:
        raise InvalidOptionError(
            f"moa: cannot read the {name} ({error.strerror or error}); pass the path of a plan "
            "written by `hf-attn-zoo moa search`."
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidOptionError(
            f"moa: the {name} is not valid JSON ({error.msg} at line {error.lineno}); it is "
            "corrupt, regenerate it with `hf-attn-zoo moa search`."
        ) from None
    return MoAPlan.from_dict(data, name), name
