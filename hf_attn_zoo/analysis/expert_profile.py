"""fTRI expert profiling: which MoE experts a behaviour class of prompts selects more often than the others.

The analysis half of MoTE, "Mixture of Tunable Experts - Behavior Modification of DeepSeek-R1 at Inference Time"
(arXiv:2502.11096): functional Token Resonance Imaging (fTRI) runs prompt sets that trigger different behaviours
through the model, records which routed experts every prompt token is sent to, scores each expert by how much more
often the target behaviour selects it than the other behaviours do, and ranks the experts across the whole model
(not per layer). The top-ranked experts are the ones MoTE switches off or forces on.

What is measured. A forward hook on every MoE router (found through the family spec: `spec.mlp.router` of the
layers in `spec.moe_layers(model)`) reads the router's own `(router_logits, top_k_weights, top_k_index)`, so the
family's rule (softmax or sigmoid, renormalised or not, group-limited, scaled) is exactly what is counted. Per class,
per MoE layer and per expert, the profile keeps:

- `tokens[c]`: the number of counted prompt tokens of class `c`. Padding never counts (batches are right-padded and
  the pad positions are masked out), and neither do the special tokens the tokenizer adds (`<s>`, ...): they sit
  at the same position of every prompt, carry no class information, yet still go through the model as context.
- `counts[c][l][e]`: how many of those tokens have expert `e` in their top-k at layer `l`.
- `weight_sums[c][l][e]`: the sum of the routing weight the router gave expert `e` over those tokens. A slot with
  weight exactly 0 (an expert dropped by a routing override) is not counted as a selection.

From these: the selection frequency `counts / tokens` (fraction of tokens whose top-k contains the expert); the
mean gate weight over the tokens that selected it (`mean_weight(c, over="selected")`, 0 when never selected) and
over all tokens (`over="all"`, unselected tokens contributing 0). Tokens are pooled over the class's prompts: a
prompt weighs in proportion to its length (the paper's per-prompt count maps, summed, then normalised by the
class's token count), so the frequencies of a class do not depend on how its prompts were batched.

Score (fTRI ranking): `score[l][e] = freq[target][l][e] - mean_{c != target} freq[c][l][e]`, each other class
weighing the same whatever its size (the paper's "mean(target class) - mean(all other classes)"). With
`contrast="max"` the maximum over the other classes replaces the mean: an expert then scores > 0 only if the
target selects it more often than *every* other class does. Scores lie in [-1, 1].

Example:
    >>> profile = profile_experts(model, tokenizer, {"code": code_prompts, "prose": prose_prompts}, target="code")
    >>> profile.top(10)            # [(layer, expert, score), ...], highest score first
    >>> profile.to_json("experts.json"); plot_expert_profile(profile, "experts.png")
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import InvalidOptionError, UnsupportedArchitectureError
from ..families.spec import family_specs, resolve_family
from ..wrappers import inner_model

__all__ = ["ExpertProfile", "plot_expert_profile", "profile_experts"]

_FORMAT = "hf_attn_zoo.expert_profile/1"
_CONTRASTS = ("mean", "max")


@dataclass
class ExpertProfile:
    """Per-class routing statistics of every MoE layer, and the fTRI scores derived from them.

    Attributes:
        classes (`list[str]`): the behaviour classes, in the order given.
        target (`str`): the class the scores favour.
        contrast (`str`): `"mean"` or `"max"`: how the other classes are combined in the score.
        layers (`list[int]`): decoder-layer indices of the MoE layers (dense layers are left out).
        num_experts (`list[int]`): routed experts of each of those layers.
        prompts (`dict[str, int]`): prompts run per class (empty strings dropped).
        tokens (`dict[str, int]`): counted tokens per class (no padding, no added special tokens).
        counts (`dict[str, list[list[int]]]`): `[class][i][expert]`, tokens whose top-k held the expert at
            `layers[i]`.
        weight_sums (`dict[str, list[list[float]]]`): `[class][i][expert]`, sum of its routing weight there.
        model_type (`str`): the profiled model's `model_type`.
    """

    classes: list[str]
    target: str
    contrast: str
    layers: list[int]
    num_experts: list[int]
    prompts: dict[str, int]
    tokens: dict[str, int]
    counts: dict[str, list[list[int]]]
    weight_sums: dict[str, list[list[float]]]
    model_type: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def frequency(self, name: str) -> list[list[float]]:
        """Selection frequency `[i][expert]` of class `name`: fraction of its tokens whose top-k holds the expert."""
        tokens = self._tokens(name)
        return [[count / tokens for count in row] for row in self.counts[name]]

    def mean_weight(self, name: str, over: Literal["selected", "all"] = "selected") -> list[list[float]]:
        """Mean routing weight `[i][expert]` of class `name`.

        Args:
            over (`str`, *optional*, defaults to `"selected"`): `"selected"` averages over the tokens that selected
                the expert (0 where none did); `"all"` over every token, an unselected token counting 0.
        """
        if over not in ("selected", "all"):
            raise InvalidOptionError(f"mean_weight: over must be 'selected' or 'all', got {over!r}")
        tokens = self._tokens(name)
        rows = []
        for sums, counts in zip(self.weight_sums[name], self.counts[name]):
            if over == "all":
                rows.append([total / tokens for total in sums])
            else:
                rows.append([total / count if count else 0.0 for total, count in zip(sums, counts)])
        return rows

    def scores(self) -> list[list[float]]:
        """fTRI score `[i][expert]`: target frequency minus the mean (or max) frequency of the other classes."""
        target = self.frequency(self.target)
        others = [self.frequency(name) for name in self.classes if name != self.target]
        combine = max if self.contrast == "max" else (lambda values: math.fsum(values) / len(values))
        return [
            [t - combine([other[i][e] for other in others]) for e, t in enumerate(row)] for i, row in enumerate(target)
        ]

    def top(self, n: int = 10) -> list[tuple[int, int, float]]:
        """The `n` highest-scoring experts of the whole model as `(layer, expert, score)`, best first.

        `layer` is the decoder-layer index. Ties keep the (layer, expert) order, so the ranking is deterministic.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidOptionError(f"top: n must be an integer >= 0, got {n!r}")
        ranked = [
            (layer, expert, score) for layer, row in zip(self.layers, self.scores()) for expert, score in enumerate(row)
        ]
        ranked.sort(key=lambda item: -item[2])
        return ranked[:n]

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready profile: the recorded statistics, plus the scores and the top 10 for readers."""
        return {
            "format": _FORMAT,
            "model_type": self.model_type,
            "classes": self.classes,
            "target": self.target,
            "contrast": self.contrast,
            "layers": self.layers,
            "num_experts": self.num_experts,
            "prompts": self.prompts,
            "tokens": self.tokens,
            "counts": self.counts,
            "weight_sums": self.weight_sums,
            "metadata": self.metadata,
            # derived, recomputed on load
            "scores": self.scores(),
            "top": [list(item) for item in self.top(10)],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExpertProfile:
        if data.get("format") != _FORMAT:
            raise InvalidOptionError(f"not an expert profile (format {data.get('format')!r}, expected {_FORMAT!r})")
        return cls(
            classes=list(data["classes"]),
            target=data["target"],
            contrast=data["contrast"],
            layers=list(data["layers"]),
            num_experts=list(data["num_experts"]),
            prompts=dict(data["prompts"]),
            tokens=dict(data["tokens"]),
            counts=dict(data["counts"]),
            weight_sums=dict(data["weight_sums"]),
            model_type=data.get("model_type", ""),
            metadata=dict(data.get("metadata", {})),
        )

    def to_json(self, path: str | Path) -> Path:
        """Write the profile as JSON (floats written exactly, so `from_json` gives back an equal profile)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> ExpertProfile:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def _tokens(self, name: str) -> int:
        if name not in self.counts:
            raise InvalidOptionError(f"no class {name!r} in this profile; classes: {', '.join(self.classes)}")
        return max(self.tokens[name], 1)


@dataclass
class _Capture:
    """What the router hooks add to while one class's batches run."""

    active: bool = False
    token_mask: torch.Tensor | None = None
    counts: dict[int, torch.Tensor] = field(default_factory=dict)
    weight_sums: dict[int, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def profile_experts(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_sets: dict[str, list[str]],
    target: str,
    batch_size: int = 8,
    max_length: int = 512,
    progress: bool = True,
    contrast: Literal["mean", "max"] = "mean",
) -> ExpertProfile:
    """Run each behaviour class's prompts through a MoE model and record how its tokens are routed (fTRI).

    See the module docstring for what is recorded and how experts are scored. The model runs in eval mode without
    gradients (its training flag is restored afterwards) and is not modified: the router hooks are removed even
    when a forward fails.

    Args:
        model (`PreTrainedModel`): a MoE causal LM of a supported family (or a PEFT/DDP wrapper of one).
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer (no pad token needed).
        prompt_sets (`dict[str, list[str]]`): two or more behaviour classes, each a list of prompts. Empty prompts
            are dropped; a class must keep at least one.
        target (`str`): the class whose experts are sought.
        batch_size (`int`, *optional*, defaults to 8): prompts per forward (right-padded, padding masked out).
        max_length (`int`, *optional*, defaults to 512): prompts are truncated to this many tokens.
        progress (`bool`, *optional*, defaults to `True`): show a tqdm bar per class.
        contrast (`str`, *optional*, defaults to `"mean"`): combine the other classes' frequencies by `"mean"`
            (the paper) or `"max"`.

    Returns:
        `ExpertProfile`: the statistics; `.top(n)` ranks the experts.

    Raises:
        `InvalidOptionError`: fewer than two classes, `target` not among them, a class without a non-empty prompt,
            a bad `batch_size`/`max_length`/`contrast`.
        `UnsupportedArchitectureError`: the model has no MoE layer (or no family adapter).
    """
    classes = _check_prompt_sets(prompt_sets, target)
    for name, value in (("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidOptionError(f"profile_experts: {name} must be an integer >= 1, got {value!r}")
    if contrast not in _CONTRASTS:
        raise InvalidOptionError(f"profile_experts: contrast must be one of {', '.join(_CONTRASTS)}, got {contrast!r}")
    inner = inner_model(model)
    family = resolve_family(inner.config)
    layers = family.moe_layers(inner)
    if not layers:
        moe_families = sorted(name for name, spec in family_specs().items() if spec.mlp.kind == "moe")
        raise UnsupportedArchitectureError(
            f"this {family.name} model has no MoE layer, so it has no experts to profile; use a model of a MoE "
            f"family ({', '.join(moe_families)}) with sparse layers, or upcycle a dense one with hf_attn_zoo.upcycle"
        )
    encoded = {name: _encode(tokenizer, prompts, max_length) for name, prompts in classes.items()}
    for name, rows in encoded.items():
        if not any(sum(mask) for _, mask in rows):
            raise InvalidOptionError(
                f"profile_experts: class {name!r} has no token to count once tokenized (only special tokens?)"
            )

    capture = _Capture()
    handles = []
    was_training = inner.training
    keep_logits = {"logits_to_keep": 1} if _accepts(inner, "logits_to_keep") else {}
    device = _input_device(inner)
    pad_id = _pad_id(tokenizer)
    result: dict[str, tuple[list[list[int]], list[list[float]], int]] = {}
    try:
        for layer in layers:
            router = family.moe_router(inner, layer)
            handles.append(router.register_forward_hook(_make_hook(capture, layer)))
        inner.eval()
        from tqdm.auto import tqdm

        for name, rows in encoded.items():
            capture.counts, capture.weight_sums = {}, {}
            # longest first: batches of similar length waste less compute on padding
            order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
            batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
            for batch in tqdm(batches, desc=f"fTRI {name}", unit="batch", disable=not progress):
                input_ids, attention_mask, count_mask = _pad([rows[i] for i in batch], pad_id)
                capture.token_mask = count_mask.reshape(-1).to(device)
                capture.active = True
                try:
                    inner(
                        input_ids=input_ids.to(device),
                        attention_mask=attention_mask.to(device),
                        use_cache=False,
                        **keep_logits,
                    )
                finally:
                    capture.active, capture.token_mask = False, None
            missing = [layer for layer in layers if layer not in capture.counts]
            if missing:
                raise RuntimeError(
                    f"profile_experts: the routers of MoE layers {missing} never ran; were they replaced by a module "
                    "that does not call the original router?"
                )
            tokens = sum(sum(mask) for _, mask in rows)
            result[name] = (
                [capture.counts[layer].tolist() for layer in layers],
                [capture.weight_sums[layer].double().tolist() for layer in layers],
                tokens,
            )
    finally:
        for handle in handles:
            handle.remove()
        inner.train(was_training)

    return ExpertProfile(
        classes=list(classes),
        target=target,
        contrast=contrast,
        layers=list(layers),
        num_experts=[len(row) for row in result[target][0]],
        prompts={name: len(rows) for name, rows in encoded.items()},
        tokens={name: result[name][2] for name in classes},
        counts={name: result[name][0] for name in classes},
        weight_sums={name: result[name][1] for name in classes},
        model_type=str(getattr(inner.config, "model_type", "")),
        metadata={"max_length": max_length},
    )


def plot_expert_profile(profile: ExpertProfile, path: str | Path, top: int = 10) -> Path:
    """Heat map of the fTRI scores (MoE layers x experts), the `top` best positive ones outlined; writes a PNG.

    Colour is the score (red: the target class selects the expert more often, blue: less), on a scale symmetric
    around 0; the title names the target class and the classes it is contrasted with.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    scores = profile.scores()
    width = max(profile.num_experts)
    grid = [row + [math.nan] * (width - len(row)) for row in scores]
    bound = max((abs(s) for row in scores for s in row), default=0.0) or 1e-6
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(min(24.0, max(7.0, 2 + 0.3 * width)), min(24.0, 1.8 + 0.3 * len(grid))))
    image = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest")
    row_of = {layer: i for i, layer in enumerate(profile.layers)}
    best = [(layer, expert) for layer, expert, score in profile.top(top) if score > 0]
    for layer, expert in best:
        ax.add_patch(Rectangle((expert - 0.5, row_of[layer] - 0.5), 1, 1, fill=False, edgecolor="black", lw=1.2))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    step = max(1, len(profile.layers) // 32)
    ax.set_yticks(range(0, len(profile.layers), step), [str(i) for i in profile.layers[::step]])
    if width <= 64:
        ax.set_xticks(range(width))
    others = [name for name in profile.classes if name != profile.target]
    combine = "max" if profile.contrast == "max" else "mean"
    ax.set_title(
        f"fTRI expert profile: target '{profile.target}' vs {', '.join(repr(o) for o in others)}\n"
        f"score = freq({profile.target}) - {combine} freq(others); best {len(best)} (score > 0) outlined",
        fontsize=10,
    )
    fig.colorbar(image, ax=ax, label="selection-frequency difference")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _check_prompt_sets(prompt_sets: Any, target: Any) -> dict[str, list[str]]:
    """The classes with their non-empty prompts, or an error naming the problem."""
    if not isinstance(prompt_sets, dict) or len(prompt_sets) < 2:
        count = len(prompt_sets) if isinstance(prompt_sets, dict) else type(prompt_sets).__name__
        raise InvalidOptionError(
            f"profile_experts needs a dict of two or more behaviour classes (name -> prompts), got {count}"
        )
    if target not in prompt_sets:
        raise InvalidOptionError(
            f"profile_experts: target {target!r} is not one of the classes ({', '.join(map(repr, prompt_sets))})"
        )
    classes = {}
    for name, prompts in prompt_sets.items():
        if not isinstance(name, str) or not name:
            raise InvalidOptionError(f"profile_experts: class names must be non-empty strings, got {name!r}")
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise InvalidOptionError(f"profile_experts: class {name!r} must be a list of prompt strings")
        kept = [p for p in prompts if p.strip()]
        if not kept:
            what = "has no prompts" if not prompts else "has only empty prompts"
            raise InvalidOptionError(f"profile_experts: class {name!r} {what}")
        classes[name] = kept
    return classes


def _encode(tokenizer: Any, prompts: list[str], max_length: int) -> list[tuple[list[int], list[int]]]:
    """Per prompt: its token ids and a 0/1 mask of the tokens to count (not the special tokens the tokenizer adds)."""
    encoded = tokenizer(prompts, truncation=True, max_length=max_length, return_special_tokens_mask=True)
    rows = []
    for ids, special in zip(encoded["input_ids"], encoded["special_tokens_mask"]):
        if ids:
            rows.append((list(ids), [1 - s for s in special]))
    return rows


def _pad(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad a batch: with causal attention, padding after a prompt cannot change how its tokens are routed."""
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    count_mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, (ids, counted) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        count_mask[i, : len(ids)] = torch.tensor(counted, dtype=torch.bool)
    return input_ids, attention_mask, count_mask


def _make_hook(capture: _Capture, layer: int):
    def record(router, args, output):
        if not capture.active:
            return
        if not (isinstance(output, tuple) and len(output) >= 3):
            raise RuntimeError(
                f"profile_experts: the router of layer {layer} ({type(router).__name__}) does not return "
                "(router_logits, top_k_weights, top_k_index)"
            )
        logits, weights, index = output[0], output[-2], output[-1]
        num_experts = logits.shape[-1]
        top_k = index.shape[-1]
        index = index.reshape(-1, top_k)
        mask = capture.token_mask
        if index.shape[0] != mask.numel():
            raise RuntimeError(
                f"profile_experts: the router of layer {layer} routed {index.shape[0]} tokens, but the batch has "
                f"{mask.numel()}"
            )
        # no boolean indexing: masked rows add 0 (even a NaN weight there), so an accelerator never waits
        index = index.reshape(-1).long()
        weights = weights.reshape(-1).to(_sum_dtype(index.device))
        # a slot with weight exactly 0 is not a selection: an expert dropped by a routing override (MoTE `drop`) or
        # the padding slot of a row routed to fewer experts stays in the index with weight 0
        counted = mask.to(index.device).repeat_interleave(top_k) & (weights != 0)
        weights = torch.where(counted, weights, torch.zeros((), dtype=weights.dtype, device=weights.device))
        if layer not in capture.counts:
            capture.counts[layer] = torch.zeros(num_experts, dtype=torch.long, device=index.device)
            capture.weight_sums[layer] = torch.zeros(num_experts, dtype=weights.dtype, device=index.device)
        capture.counts[layer].index_add_(0, index, counted.long())
        capture.weight_sums[layer].index_add_(0, index, weights)

    return record


def _sum_dtype(device: torch.device) -> torch.dtype:
    # MPS has no float64
    return torch.float32 if device.type == "mps" else torch.float64


def _accepts(model: torch.nn.Module, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _input_device(model: torch.nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0
