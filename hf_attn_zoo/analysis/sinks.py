"""Attention sinks of a decoder: the primary (BOS-like) sink and secondary sinks, per layer, on real text.

Follows "Secondary Attention Sinks" (Wong et al., arXiv:2512.22213): the primary sink is the first position (of the
candidates `bos_candidates`) with the highest mean hidden-state norm; the sink layers are those from the largest
increase of its norm to the following largest decrease; in each of them a later token `j` is flagged when
`|cos(h_j, h_bos)| > cos_threshold`; a token flagged in at least `primary_lifetime` layers is BOS-like, in at least
`min_lifetime` a secondary sink, otherwise noise. The sink score of token `j` at layer `l` is the attention mass it
receives, `mean_h mean_{i sees j} A[l, h, i, j]`, and the fraction-of-heads metric (Gu et al., "When Attention Sink
Emerges", arXiv:2410.10781) is the share of heads whose mean attention to `j` exceeds `epsilon` (0.3).

The attention mass is computed without materialising any attention matrix of the whole model: each layer's attention
function is wrapped (the `zoo` dispatcher), runs as it did, and the wrapper sums the softmax columns from the query
and key states it received, in chunks of queries, with the layer's own scaling, GQA grouping, logit soft-capping,
mask (causal, padding, sliding window) and learned sink logits (`FamilySpec.attention.sinks`). Any family whose
attention goes through transformers' attention interface works; nothing here names an architecture.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import InvalidOptionError, UnsupportedArchitectureError
from ..families.spec import resolve_family
from ..kernels.masks import allowed_keys
from ..kernels.register import install_handler, remove_handler
from ..kernels.softcap import cap_logits

__all__ = ["Sink", "SinkReport", "attention_column_mass", "find_sinks", "naive_attention_column_mass", "plot_sinks"]

QUERY_CHUNK = 256


@dataclass
class Sink:
    """One sink of one sequence: its position, token, kind and the layers it lives in."""

    sequence: int
    position: int
    token_id: int
    token: str
    kind: str  # "primary" (BOS-like), "secondary" or "noise"
    layers: list[int]
    lifetime: int
    mass: list[float]  # attention mass it receives at each of `layers`
    peak_mass: float
    peak_layer: int
    heads_fraction: list[float]  # fraction of heads with mean attention > epsilon, at each of `layers`
    norm: list[float]  # its hidden-state norm at each of `layers`


@dataclass
class SinkReport:
    """What `find_sinks` measured; `to_json` writes it (and returns the dict)."""

    num_layers: int
    sequences: int
    seq_len: int
    bos_position: int
    sink_layers: list[int]  # the primary sink's clipped layer range, per the paper
    epsilon: float
    cos_threshold: float
    min_lifetime: int
    primary_lifetime: int
    sinks: list[Sink]
    # per layer (averaged over sequences): [L][T] mass by token position, and [L] summaries
    mass_by_position: list[list[float]]
    bos_mass: list[float]
    bos_heads_fraction: list[float]
    bos_norm: list[float]
    other_norm: list[float]  # mean hidden-state norm of the tokens that are no sink
    secondary_mass: list[float | None]  # mean mass of the secondary sinks alive at the layer
    other_mass: list[float]  # mean mass of the tokens that are no sink
    mean_abs_cos: list[float]  # mean |cos(h_j, h_bos)| over the non-sink tokens
    max_abs_cos: list[float]  # the largest |cos(h_j, h_bos)| of a non-sink token: how near the threshold they come
    # the non-sink tokens receiving the most mass (at their best layer; the last 1/16 of the positions left out)
    top_tokens: list[dict[str, Any]]
    noise_count: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def secondary(self) -> list[Sink]:
        return [s for s in self.sinks if s.kind == "secondary"]

    def to_json(self, path: str | Path | None = None) -> dict[str, Any]:
        data = asdict(self)
        if path is not None:
            Path(path).write_text(json.dumps(data, indent=1))
        return data


def attention_column_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    allowed: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    chunk: int = QUERY_CHUNK,
) -> torch.Tensor:
    """Per head, the attention each key receives summed over the queries `[B, H, K]`, chunked over the queries.

    `query` `[B, H, Q, D]`, `key` `[B, KV, K, D]` (GQA: each KV head serves `H / KV` query heads), `allowed` `[B, Q,
    K]` bool; `softcap`: `tanh(s / c) * c` on the logits (Gemma 2); `sinks` `[H]`: a learned logit per head joining
    the softmax (GPT-OSS), which takes mass but receives none here. fp32 softmax, as eager attention.
    """
    batch, heads, q_len, dim = query.shape
    kv = key.shape[1]
    group = heads // kv
    keys = key.float()[:, :, None]  # [B, KV, 1, K, D]
    total = torch.zeros(batch, heads, key.shape[2], dtype=torch.float32, device=query.device)
    for start in range(0, q_len, chunk):
        q = query[:, :, start : start + chunk].float().view(batch, kv, group, -1, dim)
        logits = (q @ keys.transpose(-1, -2)).view(batch, heads, -1, key.shape[2]) * scaling
        logits = cap_logits(logits, softcap)
        mask = allowed[:, None, start : start + chunk]
        logits = logits.masked_fill(~mask, float("-inf"))
        if sinks is not None:
            extra = sinks.float().view(1, heads, 1, 1).expand(batch, heads, logits.shape[2], 1)
            weights = torch.softmax(torch.cat([logits, extra], dim=-1), dim=-1)[..., :-1]
        else:
            weights = torch.softmax(logits, dim=-1)
        total += weights.nan_to_num(0.0).sum(dim=2)
    return total


def naive_attention_column_mass(
    query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Reference of `attention_column_mass` (no softcap, no sinks): the full weight matrix, then its column sums."""
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    logits = (query.float() @ key.float().transpose(-1, -2)) * scaling
    weights = torch.softmax(logits.masked_fill(~allowed[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
    return weights.sum(dim=2)


class _Recorder:
    """Column masses and hidden-state statistics of one forward, per layer."""

    def __init__(self, num_layers: int, candidates: Sequence[int]):
        self.candidates = list(candidates)
        self.mass: list[torch.Tensor | None] = [None] * num_layers  # [B, H, T] summed over queries
        self.count: list[torch.Tensor | None] = [None] * num_layers  # [B, T] queries that see each key
        self.norm: list[torch.Tensor | None] = [None] * num_layers  # [B, T]
        self.cos: list[torch.Tensor | None] = [None] * num_layers  # [B, n_candidates, T]

    def clear(self) -> None:
        for records in (self.mass, self.count, self.norm, self.cos):
            records[:] = [None] * len(records)

    def attention_handler(self, layer: int, sink_param: str | None):
        def handler(base, module, query, key, value, attention_mask, **kwargs):
            out = base(module, query, key, value, attention_mask, **kwargs)
            with torch.no_grad():
                # find_sinks' rows carry no padding: a mask it cannot read (flex's BlockMask) is the causal one
                mask = attention_mask if isinstance(attention_mask, torch.Tensor) else None
                allowed = allowed_keys(mask, query.shape[0], query.shape[2], key.shape[2], query.device)
                allowed = allowed[:, 0].expand(query.shape[0], -1, -1)
                scaling = kwargs.get("scaling")
                if scaling is None:
                    scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
                sinks = getattr(module, sink_param) if sink_param else None
                self.mass[layer] = attention_column_mass(query, key, allowed, scaling, kwargs.get("softcap"), sinks)
                self.count[layer] = allowed.sum(dim=1).float()
            return out

        return handler

    def layer_hook(self, layer: int):
        def hook(module, args, output):
            hidden = (output[0] if isinstance(output, tuple) else output).detach().float()  # [B, T, D]
            self.norm[layer] = hidden.norm(dim=-1)
            cands = hidden[:, self.candidates]  # [B, n, D]
            self.cos[layer] = torch.nn.functional.cosine_similarity(hidden[:, None], cands[:, :, None], dim=-1)

        return hook


def _sequences(tokenizer, texts: Sequence[str], seq_len: int, num_sequences: int) -> torch.Tensor:
    """`num_sequences` windows of `seq_len` tokens from the texts joined by blank lines, at evenly spaced offsets."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() < seq_len:
        raise InvalidOptionError(f"the texts hold {ids.numel()} tokens, fewer than seq_len={seq_len}; give more text.")
    room = ids.numel() - seq_len
    starts = [round(i * room / max(num_sequences - 1, 1)) for i in range(num_sequences)]
    return torch.stack([ids[s : s + seq_len] for s in starts])


def _stacked(per_layer: list[torch.Tensor | None]) -> torch.Tensor:
    """One forward's per-layer records `[L, ...]` on the CPU (every layer recorded)."""
    if any(t is None for t in per_layer):
        raise UnsupportedArchitectureError("find_sinks: some layer's attention did not run through the interface")
    return torch.stack([t for t in per_layer if t is not None]).cpu()


def _thresholds(num_layers: int, min_lifetime: int | None, primary_lifetime: int | None) -> tuple[int, int]:
    """The paper's labels (noise <= 4 layers, BOS-like >= L - 15) on deep models; proportional ones on shallow models,
    where L - 15 would leave no room for a secondary sink."""
    if min_lifetime is None:
        min_lifetime = 5 if num_layers >= 24 else max(1, round(num_layers / 6))
    if primary_lifetime is None:
        primary_lifetime = num_layers - 15 if num_layers >= 24 else max(min_lifetime + 1, math.ceil(num_layers / 2))
    if not 1 <= min_lifetime < primary_lifetime:
        raise InvalidOptionError(
            f"sink lifetimes must satisfy 1 <= min_lifetime < primary_lifetime, got {min_lifetime}, {primary_lifetime}"
        )
    return min_lifetime, primary_lifetime


def _clip(norm: torch.Tensor) -> tuple[int, int]:
    """The paper's sink layer range from the primary sink's norm per layer: from the largest increase (its layer)
    to the following largest decrease (exclusive)."""
    if norm.numel() < 2:
        return 0, norm.numel()
    diff = norm[1:] - norm[:-1]
    start = int(diff.argmax()) + 1
    rest = diff[start:]
    end = int(rest.argmin()) + start + 1 if rest.numel() else norm.numel()
    return start, max(end, start + 1)


@torch.no_grad()
def find_sinks(
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor] | None = None,
    *,
    tokenizer=None,
    texts: Sequence[str] | None = None,
    seq_len: int = 512,
    num_sequences: int = 4,
    bos_candidates: Sequence[int] = (0, 1),
    cos_threshold: float = 0.9,
    epsilon: float = 0.3,
    min_lifetime: int | None = None,
    primary_lifetime: int | None = None,
    clip_layers: bool = True,
) -> SinkReport:
    """Find the primary and secondary attention sinks of `model` on real text (see the module docstring).

    Args:
        model (`torch.nn.Module`): An unpatched causal LM whose attention runs through the attention interface.
        batches (`Iterable[torch.Tensor]`, *optional*): Input ids `[B, T]`, all of one length, without padding.
        tokenizer, texts: Alternatively, `num_sequences` windows of `seq_len` tokens are cut from `texts`.
        bos_candidates (`Sequence[int]`, *optional*, defaults to `(0, 1)`): Positions the primary sink is picked from
            (the highest mean norm over layers); `(0, 1, 2)` with a chat template, as the paper.
        cos_threshold (`float`, *optional*, defaults to 0.9): `|cos(h_j, h_bos)|` above which token `j` is flagged.
        epsilon (`float`, *optional*, defaults to 0.3): Threshold of the fraction-of-heads metric.
        min_lifetime, primary_lifetime (`int`, *optional*): Lifetime labels: secondary from `min_lifetime` layers,
            BOS-like from `primary_lifetime`; default the paper's 5 and L - 15 on models of 24 layers or more.
        clip_layers (`bool`, *optional*, defaults to `True`): Flag tokens only in the primary sink's layer range (the
            paper's "sink clipper"); False: in every layer.

    Returns:
        `SinkReport`.
    """
    if batches is None:
        if tokenizer is None or not texts:
            raise InvalidOptionError("find_sinks needs `batches` of input ids, or a `tokenizer` and `texts`")
        batches = [_sequences(tokenizer, texts, seq_len, num_sequences)]
    batches = [b if b.dim() == 2 else b[None] for b in batches]
    if not batches or len({b.shape[1] for b in batches}) != 1:
        raise InvalidOptionError("find_sinks needs one or more batches of input ids of one length")
    seq_len = batches[0].shape[1]
    if max(bos_candidates) >= seq_len:
        raise InvalidOptionError(f"bos_candidates {list(bos_candidates)} must lie inside the {seq_len} tokens")
    config: Any = model.config
    family = resolve_family(config)
    if not family.attention.interface:
        raise UnsupportedArchitectureError(
            f"find_sinks reads each layer's attention through transformers' attention interface; {family.name}'s "
            "attention module computes attention itself."
        )
    layers = family.decoder_layers(model)
    num_layers = len(layers)
    min_lifetime, primary_lifetime = _thresholds(num_layers, min_lifetime, primary_lifetime)
    attentions = [family.attention_module(model, i) for i in range(num_layers)]
    if any(getattr(a, "_zoo_attention_handler", None) is not None for a in attentions):
        raise UnsupportedArchitectureError(
            "find_sinks measures the model's own attention; this model carries attention patches (unpatch it first)."
        )
    recorder = _Recorder(num_layers, bos_candidates)
    hooks = [layer.register_forward_hook(recorder.layer_hook(i)) for i, layer in enumerate(layers)]
    installed = []
    device = next(model.parameters()).device
    try:
        for i, attention in enumerate(attentions):
            install_handler(model, attention, recorder.attention_handler(i, family.attention.sinks))
            installed.append(attention)
        mass, count, norm, cos, ids = [], [], [], [], []
        for batch in tqdm(batches, desc="find_sinks", unit="batch", leave=False):
            recorder.clear()
            model(batch.to(device), use_cache=False)
            mass.append(_stacked(recorder.mass))  # [L, B, H, T]
            count.append(_stacked(recorder.count))  # [L, B, T]
            norm.append(_stacked(recorder.norm))  # [L, B, T]
            cos.append(_stacked(recorder.cos))  # [L, B, n, T]
            ids.append(batch.cpu())
    finally:
        for hook in hooks:
            hook.remove()
        for attention in installed:
            remove_handler(model, attention)
    mass_t, count_t = torch.cat(mass, 1), torch.cat(count, 1)
    norm_t, cos_t, ids_t = torch.cat(norm, 1), torch.cat(cos, 1), torch.cat(ids, 0)
    per_head = mass_t / count_t[:, :, None].clamp(min=1)  # [L, B, H, T] mean attention over the queries that see it
    token_mass = per_head.mean(dim=2)  # [L, B, T]
    heads_fraction = (per_head > epsilon).float().mean(dim=2)  # [L, B, T]

    candidates = list(bos_candidates)
    bos = candidates[int(norm_t[:, :, candidates].mean(dim=(0, 1)).argmax())]
    bos_norm = norm_t[:, :, bos].mean(dim=1)  # [L]
    start, end = _clip(bos_norm) if clip_layers else (0, num_layers)
    sink_layers = list(range(start, end))
    abs_cos = cos_t[:, :, candidates.index(bos)].abs()  # [L, B, T]

    decode = getattr(tokenizer, "decode", None)
    sinks: list[Sink] = []
    noise = 0
    is_sink = torch.zeros(ids_t.shape, dtype=torch.bool)
    is_sink[:, bos] = True
    for b in range(ids_t.shape[0]):
        flagged = abs_cos[start:end, b, bos + 1 :] > cos_threshold  # [layers in range, T - bos - 1]
        entries = [(bos, sink_layers)]
        for j in flagged.any(dim=0).nonzero().flatten().tolist():
            entries.append((bos + 1 + j, [start + r for r in flagged[:, j].nonzero().flatten().tolist()]))
        for position, alive in entries:
            lifetime = len(alive)
            if position == bos or lifetime >= primary_lifetime:
                kind = "primary"
            elif lifetime >= min_lifetime:
                kind = "secondary"
            else:
                noise += 1
                continue
            is_sink[b, position] = True
            masses = [float(token_mass[layer, b, position]) for layer in alive]
            peak = max(range(len(alive)), key=masses.__getitem__) if alive else 0
            token_id = int(ids_t[b, position])
            sinks.append(
                Sink(
                    sequence=b,
                    position=position,
                    token_id=token_id,
                    token=decode([token_id]) if decode else str(token_id),
                    kind=kind,
                    layers=alive,
                    lifetime=lifetime,
                    mass=masses,
                    peak_mass=masses[peak] if masses else 0.0,
                    peak_layer=alive[peak] if alive else -1,
                    heads_fraction=[float(heads_fraction[layer, b, position]) for layer in alive],
                    norm=[float(norm_t[layer, b, position]) for layer in alive],
                )
            )
    other = ~is_sink  # [B, T]
    secondary_mass: list[float | None] = []
    for layer in range(num_layers):
        values = [
            token_mass[layer, s.sequence, s.position] for s in sinks if s.kind == "secondary" and layer in s.layers
        ]
        secondary_mass.append(float(torch.stack(values).mean()) if values else None)
    return SinkReport(
        num_layers=num_layers,
        sequences=ids_t.shape[0],
        seq_len=seq_len,
        bos_position=bos,
        sink_layers=sink_layers,
        epsilon=epsilon,
        cos_threshold=cos_threshold,
        min_lifetime=min_lifetime,
        primary_lifetime=primary_lifetime,
        sinks=sinks,
        mass_by_position=token_mass.mean(dim=1).tolist(),
        bos_mass=token_mass[:, :, bos].mean(dim=1).tolist(),
        bos_heads_fraction=heads_fraction[:, :, bos].mean(dim=1).tolist(),
        bos_norm=bos_norm.tolist(),
        other_norm=[float(norm_t[layer][other].mean()) for layer in range(num_layers)],
        secondary_mass=secondary_mass,
        other_mass=[float(token_mass[layer][other].mean()) for layer in range(num_layers)],
        mean_abs_cos=[float(abs_cos[layer][other].mean()) for layer in range(num_layers)],
        max_abs_cos=[float(abs_cos[layer][other].max()) if bool(other.any()) else 0.0 for layer in range(num_layers)],
        top_tokens=_top_tokens(token_mass, heads_fraction, other, ids_t, decode),
        noise_count=noise,
        meta={"model_type": getattr(model.config, "model_type", None), "family": family.name},
    )


def _top_tokens(token_mass, heads_fraction, other, ids, decode, count: int = 10) -> list[dict[str, Any]]:
    """The `count` (sequence, position) pairs outside the sinks with the highest mass at their best layer."""
    best, layer = token_mass.max(dim=0)  # [B, T]
    best = best.masked_fill(~other, -1.0)
    # the last positions are seen by a few queries only: their mean is a few weights, not a mass over many queries
    best[:, best.shape[1] - max(1, best.shape[1] // 16) :] = -1.0
    top = []
    for flat in best.flatten().topk(min(count, best.numel())).indices.tolist():
        b, t = divmod(flat, best.shape[1])
        if best[b, t] < 0:
            break
        token_id = int(ids[b, t])
        top.append(
            {
                "sequence": b,
                "position": t,
                "token": decode([token_id]) if decode else str(token_id),
                "layer": int(layer[b, t]),
                "mass": float(best[b, t]),
                "heads_fraction": float(heads_fraction[layer[b, t], b, t]),
            }
        )
    return top


def plot_sinks(report: SinkReport, out_dir: str | Path, max_positions: int = 128) -> list[Path]:
    """Three PNGs in `out_dir`: `sink_mass.png` (per-layer heat map of the mass by token position, the first
    `max_positions` positions, log scale), `sink_norms.png` (hidden-state norms and |cos| alignment by layer) and
    `sink_lifetimes.png` (each primary / secondary sink's layers, coloured by the mass it receives)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    grid = torch.tensor(report.mass_by_position)[:, :max_positions].clamp(min=1e-6)
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.18 * report.num_layers))
    image = ax.imshow(
        grid.numpy(), aspect="auto", cmap="magma", norm=LogNorm(vmin=1e-4, vmax=1.0), interpolation="nearest"
    )
    ax.set_xlabel("token position")
    ax.set_ylabel("layer")
    ax.set_title(f"attention mass received (mean over heads and queries, {report.sequences} sequences)", fontsize=10)
    fig.colorbar(image, ax=ax, label="mass")
    fig.tight_layout()
    paths.append(out / "sink_mass.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    layers = list(range(report.num_layers))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(layers, report.bos_norm, label=f"primary sink (pos {report.bos_position})")
    left.plot(layers, report.other_norm, label="other tokens")
    left.set_yscale("log")
    left.set_xlabel("layer")
    left.set_ylabel("hidden-state norm")
    if report.sink_layers:
        left.axvspan(report.sink_layers[0], report.sink_layers[-1], alpha=0.15, label="sink layers")
    left.legend(fontsize=8)
    right.plot(layers, report.bos_mass, label="mass: primary sink")
    right.plot(
        layers,
        [m if m is not None else float("nan") for m in report.secondary_mass],
        "o-",
        ms=3,
        label="mass: secondary sinks",
    )
    right.plot(layers, report.other_mass, label="mass: other tokens")
    right.plot(layers, report.mean_abs_cos, "--", label="|cos(h, h_bos)|: other tokens")
    right.set_yscale("log")
    right.set_xlabel("layer")
    right.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "sink_norms.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    shown = sorted([s for s in report.sinks if s.kind != "noise"], key=lambda s: (s.kind != "primary", s.sequence))
    shown = shown[:40]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.25 * max(len(shown), 1)))
    cmap = plt.get_cmap("viridis")
    peak = max([max(s.mass) for s in shown if s.mass] + [1e-6])
    for row, sink in enumerate(shown):
        for layer, mass in zip(sink.layers, sink.mass, strict=True):
            ax.add_patch(plt.Rectangle((layer - 0.5, row - 0.4), 1, 0.8, color=cmap(mass / peak)))
    ax.set_xlim(-0.5, report.num_layers - 0.5)
    ax.set_ylim(-0.6, max(len(shown), 1) - 0.4)
    ax.set_yticks(
        range(len(shown)), [f"{s.kind[:3]} seq{s.sequence} pos{s.position} {s.token!r}"[:32] for s in shown], fontsize=7
    )
    ax.invert_yaxis()
    ax.set_xlabel("layer")
    ax.set_title(f"sinks and their lifetimes (colour: mass received, max {peak:.2f})", fontsize=10)
    fig.tight_layout()
    paths.append(out / "sink_lifetimes.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
