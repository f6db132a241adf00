"""One page per model (`hf-attn-zoo analyze report`): head usage, expert usage, attention sinks and routing stability.

Every section is measured on the same real text and written as Markdown and HTML beside its plots, so a person can
look rather than read. Sections that do not apply to the model (expert usage of a dense model) say so instead of
being left out silently.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from ..assets.corpora import held_out_texts
from ..errors import InvalidInputError, InvalidOptionError
from ..families.spec import resolve_family
from ..moe.routing import RoutingDecision, observe_routing
from ..outputs import atomic_output, check_output
from ..patches.moh import moh_routers
from ..patching import applied_patches
from .head_usage import head_usage, plot_head_usage, reset_head_usage

__all__ = ["Section", "expert_usage", "head_contributions", "report_batches", "write_report"]

DEFAULT_CORPUS = "python_stdlib_docs"


@dataclass
class Section:
    """One part of the report: a title, a few sentences, an optional table, its plots and its numbers."""

    title: str
    text: list[str]
    table: tuple[list[str], list[list[str]]] | None = None
    images: list[Path] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


def report_batches(
    tokenizer: Any, texts: Sequence[str] | None = None, num_texts: int = 8, max_length: int = 256
) -> list[torch.Tensor]:
    """`[1, <= max_length]` token rows of real text (held-out documents of the default corpus unless `texts`); one
    text per row, so no padding enters the statistics."""
    texts = list(texts) if texts is not None else held_out_texts(DEFAULT_CORPUS)
    rows = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length).input_ids
        if ids.shape[1] >= 8:
            rows.append(ids)
        if len(rows) == num_texts:
            break
    if not rows:
        raise InvalidInputError("no text of at least 8 tokens to analyse; give longer texts.")
    return rows


@torch.no_grad()
def head_contributions(model: PreTrainedModel, batches: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Per layer and query head, the mean L2 norm of what the head adds to the residual stream (its slice of the output
    projection's input times the projection's columns for it) as a share of the layer's total: a head-usage profile of
    any model, patched or not (a MoH head that is off contributes 0).

    Returns:
        `{"layers": {layer: {"share": [per head]}}, "num_heads": int}`.
    """
    family = resolve_family(model.config)
    heads = family.head_layout(model.config).num_heads
    sums: dict[int, torch.Tensor] = {}
    tokens: dict[int, int] = {}
    hooks = []

    def hook(layer: int):
        def record(module: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            if x.shape[-1] % heads:
                return
            x = x.float().reshape(-1, heads, x.shape[-1] // heads)  # [tokens, heads, head_dim]
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.shape[-1] == heads * x.shape[-1]:
                columns = weight.float().reshape(weight.shape[0], heads, x.shape[-1])  # [hidden, heads, head_dim]
                norms = torch.einsum("thd,ohd->tho", x, columns).norm(dim=-1)  # [tokens, heads]
            else:  # an output projection of another shape: the head's output itself
                norms = x.norm(dim=-1)
            sums[layer] = sums.get(layer, 0) + norms.sum(0).cpu()
            tokens[layer] = tokens.get(layer, 0) + norms.shape[0]

        return record

    o_name = family.attention.o
    for index in range(len(family.decoder_layers(model))):
        projection = getattr(family.attention_module(model, index), o_name or "", None)
        if isinstance(projection, torch.nn.Module):
            hooks.append(projection.register_forward_pre_hook(hook(index)))
    try:
        _run(model, batches)
    finally:
        for handle in hooks:
            handle.remove()
    layers = {}
    for index in sorted(sums):
        mean = sums[index] / tokens[index]
        layers[index] = {"share": (mean / mean.sum().clamp_min(1e-12)).tolist()}
    return {"layers": layers, "num_heads": heads}


@torch.no_grad()
def expert_usage(model: PreTrainedModel, batches: Sequence[torch.Tensor]) -> dict[str, Any] | None:
    """Per MoE layer, the share of (token, expert) selections each expert received, with its normalised entropy
    (1 = perfectly balanced) and its imbalance (largest share x number of experts); None for a model without MoE
    layers of a family with a routing rule."""
    family = resolve_family(model.config)
    if family.mlp.kind != "moe" or family.mlp.routing is None:
        return None
    counts: dict[int, torch.Tensor] = {}

    def accumulate(layer: int, decision: RoutingDecision) -> None:
        counts[layer] = counts.get(layer, 0) + decision.counts().cpu()

    with observe_routing(model, accumulate):
        _run(model, batches)
    layers = {}
    for index in sorted(counts):
        share = counts[index].double() / counts[index].sum().clamp_min(1)
        experts = share.numel()
        entropy = -(share[share > 0] * share[share > 0].log()).sum().item() / math.log(experts)
        layers[index] = {
            "share": share.tolist(),
            "entropy": entropy,
            "imbalance": share.max().item() * experts,
        }
    return {"layers": layers}


def _run(model: PreTrainedModel, batches: Sequence[torch.Tensor]) -> None:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for ids in batches:
            model(input_ids=ids.to(device), use_cache=False)
    finally:
        model.train(was_training)


def _heat_map(grid: list[list[float]], rows: list[int], xlabel: str, title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 + 0.35 * len(grid[0])), 1.5 + 0.22 * len(grid)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    step = max(1, len(rows) // 16)
    ax.set_yticks(range(0, len(rows), step), [str(r) for r in rows[::step]])
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="share")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _heads_section(model: PreTrainedModel, tokenizer: Any, batches: Sequence[torch.Tensor], out: Path) -> Section:
    routers = moh_routers(model)
    if routers:
        reset_head_usage(model)
    contributions = head_contributions(model, batches)
    layers = contributions["layers"]
    rows = list(layers)
    grid = [layers[i]["share"] for i in rows]
    image = _heat_map(grid, rows, "query head", "Share of each head in its layer's attention output", out / "heads.png")
    uniform = 1 / contributions["num_heads"]
    table_rows = []
    for index in rows:
        share = layers[index]["share"]
        top = max(range(len(share)), key=share.__getitem__)
        table_rows.append([str(index), f"{top}", f"{share[top]:.2f}", f"{sum(s < uniform / 4 for s in share)}"])
    text = [
        "What each head adds to the residual stream (the mean norm of its output through the output projection) as a "
        f"share of its layer's total, on the report's text; a uniform layer gives every head {uniform:.2f}. Heads far "
        "below that contribute little and are what Mixture-of-Head routing can skip."
    ]
    data: dict[str, Any] = {"contributions": contributions}
    images = [image]
    if routers:
        usage = head_usage(model)
        data["moh_usage"] = usage
        images.append(plot_head_usage(usage, out / "moh_head_usage.png"))
        mean = usage.get("mean_active_fraction")
        text.append(
            f"The model has Mixture-of-Head routers in {len(routers)} layers; mean share of heads active "
            f"per token: {mean:.0%}."
            if mean is not None
            else ""
        )
    table = (["layer", "largest head", "its share", f"heads below {uniform / 4:.3f}"], table_rows)
    return Section("Head usage", [t for t in text if t], table, images, data)


def _experts_section(model: PreTrainedModel, tokenizer: Any, batches: Sequence[torch.Tensor], out: Path) -> Section:
    usage = expert_usage(model, batches)
    if usage is None:
        return Section("Expert usage", ["The model has no MoE layer with a routing rule: nothing to show."])
    layers = usage["layers"]
    rows = list(layers)
    grid = [layers[i]["share"] for i in rows]
    image = _heat_map(grid, rows, "expert", "Share of the routing selections each expert received", out / "experts.png")
    table_rows = [
        [str(i), f"{layers[i]['entropy']:.3f}", f"{layers[i]['imbalance']:.2f}", str(len(layers[i]["share"]))]
        for i in rows
    ]
    text = [
        "Share of the (token, expert) selections each expert received per MoE layer. Normalised entropy 1 means "
        "perfectly balanced; imbalance is the busiest expert's share times the number of experts (1 = balanced)."
    ]
    return Section("Expert usage", text, (["layer", "entropy", "imbalance", "experts"], table_rows), [image], usage)


def _sinks_section(model: PreTrainedModel, tokenizer: Any, batches: Sequence[torch.Tensor], out: Path) -> Section:
    from ..errors import UnsupportedArchitectureError
    from .sinks import find_sinks, plot_sinks

    length = min(b.shape[1] for b in batches)  # find_sinks takes rows of one length
    try:
        # every layer, not only the paper's clipped range: secondary sinks can live outside it (SmolLM2's do)
        report = find_sinks(
            model, [torch.cat([b[:, :length] for b in batches])], tokenizer=tokenizer, clip_layers=False
        )
    except UnsupportedArchitectureError as exc:
        return Section("Attention sinks", [f"Not measured: {exc}"])
    images = plot_sinks(report, out)
    secondary = report.secondary()
    text = [
        f"Primary sink at position {report.bos_position}: it receives {max(report.bos_mass):.0%} of the attention at "
        f"most (layer {report.bos_mass.index(max(report.bos_mass))}). "
        f"{len(secondary)} secondary sinks (alive {report.min_lifetime} to {report.primary_lifetime - 1} layers, "
        f"|cos| with the first token's state above {report.cos_threshold}, looked for in every layer) and "
        f"{report.noise_count} shorter-lived ones, on the report's text (`hf-attn-zoo analyze sinks` measures more)."
    ]
    rows = [
        [
            repr(s.token),
            str(s.sequence),
            str(s.position),
            f"{s.layers[0]}-{s.layers[-1]}",
            str(s.lifetime),
            f"{s.peak_mass:.3f}",
        ]
        for s in sorted(secondary, key=lambda s: -s.peak_mass)[:10]
    ]
    table = (["token", "text", "position", "layers", "lifetime", "peak mass"], rows) if rows else None
    return Section("Attention sinks", text, table, list(images), report.to_json())


def _routing_section(model: PreTrainedModel, tokenizer: Any, batches: Sequence[torch.Tensor], out: Path) -> Section:
    from .routing_stability import plot_routing_stability, routing_stability

    family = resolve_family(model.config)
    if family.mlp.kind != "moe" or family.mlp.routing is None:
        return Section("Routing stability", ["The model has no MoE layer with a routing rule: nothing to show."])
    result = routing_stability(model, batches)
    image = plot_routing_stability(result, out / "routing_stability.png")
    mean, noise = result["mean"], result["perturbation"]["scale"]
    text = [
        f"How steady the routing is, over {result['tokens']} tokens: gate entropy (of the distribution "
        f"top-{result['top_k']} acts on; at most log {result['num_experts']} = {result['max_entropy']:.3f} nats), "
        "expert-selection entropy (of the experts' share of all selections; log E is an even load) and flip rate "
        f"(share of the selections that change under Gaussian noise of {noise} x the embeddings' RMS). Means over the "
        f"MoE layers: {mean['gate_entropy']:.3f}, {mean['selection_entropy']:.3f} and {mean['flip_rate']:.2%}."
    ]
    rows = [
        [layer, f"{v['gate_entropy']:.3f}", f"{v['selection_entropy']:.3f}", f"{v['flip_rate']:.2%}"]
        for layer, v in result["layers"].items()
    ]
    table = (["layer", "gate entropy", "selection entropy", "flip rate"], rows)
    return Section("Routing stability", text, table, [image], result)


SECTIONS = {
    "heads": _heads_section,
    "experts": _experts_section,
    "sinks": _sinks_section,
    "routing": _routing_section,
}


def write_report(
    model: PreTrainedModel,
    tokenizer: Any,
    out_dir: str | Path,
    texts: Sequence[str] | None = None,
    num_texts: int = 8,
    max_length: int = 256,
    sections: Sequence[str] = tuple(SECTIONS),
    title: str | None = None,
    batches: Sequence[torch.Tensor] | None = None,
    overwrite: bool = False,
) -> Path:
    """Measure each of `sections` on the same text and write `report.md`, `report.html` (plots beside them) and
    `report.json` into `out_dir`; returns the Markdown path.

    Args:
        model (`PreTrainedModel`): any causal LM of a supported family, patched or not.
        tokenizer: its tokenizer.
        out_dir (`str | Path`): the folder; written beside it and moved into place when complete. A non-empty
            folder is refused unless `overwrite`.
        texts (`list[str]`, *optional*): the text to analyse; the default corpus's held-out documents otherwise.
        num_texts (`int`, *optional*, defaults to 8), max_length (`int`, *optional*, defaults to 256): how many
            texts, each cut to at most this many tokens.
        sections (`list[str]`, *optional*): any of `heads`, `experts`, `sinks`, `routing`; all by default.
        title (`str`, *optional*): the page's title.
        batches (`list[torch.Tensor]`, *optional*): `[1, L]` token rows to use instead of tokenizing `texts`.
        overwrite (`bool`, *optional*, defaults to `False`): replace a non-empty `out_dir`.
    """
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise InvalidOptionError(f"unknown report sections {unknown}; choose from {list(SECTIONS)}.")
    from tqdm.auto import tqdm

    check_output(out_dir, overwrite, "report folder")
    batches = list(batches) if batches is not None else report_batches(tokenizer, texts, num_texts, max_length)
    family = resolve_family(model.config)
    patches = applied_patches(model)
    overview = [
        f"Family `{family.name}`, {len(family.decoder_layers(model))} decoder layers, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; "
        + (
            "patches: " + "; ".join(f"`{r['method']}` on {len(r['layers'])} layers" for r in patches)
            if patches
            else "not patched"
        )
        + ".",
        f"Measured on {len(batches)} texts of up to {max(b.shape[1] for b in batches)} tokens "
        f"({sum(b.shape[1] for b in batches)} tokens in all).",
    ]
    parts = [Section("Model", overview, data={"family": family.name, "patches": patches})]
    title = title or f"hf-attn-zoo report: {getattr(model.config, '_name_or_path', '') or family.name}"
    with atomic_output(out_dir, overwrite, what="report folder") as out:
        for name in tqdm(list(sections), desc="analyze report", unit="section"):
            parts.append(SECTIONS[name](model, tokenizer, batches, out))
        (out / "report.md").write_text(_markdown(title, parts, out))
        (out / "report.html").write_text(_html(title, parts, out))
        (out / "report.json").write_text(json.dumps({p.title: p.data for p in parts}, indent=1, default=str))
    return Path(out_dir) / "report.md"


def _markdown(title: str, parts: list[Section], out: Path) -> str:
    lines = [f"# {title}", ""]
    for part in parts:
        lines += [f"## {part.title}", ""]
        for paragraph in part.text:
            lines += [paragraph, ""]
        if part.table is not None:
            header, rows = part.table
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            lines.append("")
        for image in part.images:
            lines += [f"![{part.title}]({Path(image).relative_to(out)})", ""]
    return "\n".join(lines)


def _html(title: str, parts: list[Section], out: Path) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for part in parts:
        body.append(f"<h2>{html.escape(part.title)}</h2>")
        body += [f"<p>{_inline(paragraph)}</p>" for paragraph in part.text]
        if part.table is not None:
            header, rows = part.table
            cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
            body.append(f"<table><tr>{cells}</tr>")
            body += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
            body.append("</table>")
        body += [
            f'<img src="{html.escape(str(Path(i).relative_to(out)))}" alt="{html.escape(part.title)}">'
            for i in part.images
        ]
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
        "img{max-width:100%;display:block;margin:1em 0}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _inline(text: str) -> str:
    """Markdown's inline code spans as HTML `<code>` (the only markup the sections use)."""
    pieces = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(pieces))
