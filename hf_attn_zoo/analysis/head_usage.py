"""Head-usage statistics of Mixture-of-Head layers: how often each head of each layer was active."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..patches.moh import moh_routers

__all__ = ["head_usage", "plot_head_usage", "reset_head_usage"]


def head_usage(model: torch.nn.Module) -> dict[str, Any]:
    """Per MoH layer, the fraction of tokens that used each head since the last reset.

    Returns:
        `{"layers": {layer_index: {"fraction": [per head], "tokens": int}}, "mean_active_fraction": float}`;
        the layer index is that of the decoder layer holding the router.
    """
    layers = {}
    for name, router in moh_routers(model).items():
        index = next(int(part) for part in reversed(name.split(".")) if part.isdigit())
        tokens = router.usage_tokens
        fraction = (router.usage_counts / max(tokens, 1)).tolist()
        layers[index] = {"fraction": fraction, "tokens": tokens}
    seen = [sum(v["fraction"]) / len(v["fraction"]) for v in layers.values() if v["tokens"]]
    return {"layers": dict(sorted(layers.items())), "mean_active_fraction": sum(seen) / len(seen) if seen else None}


def reset_head_usage(model: torch.nn.Module) -> None:
    for router in moh_routers(model).values():
        router.reset_usage()


def plot_head_usage(usage: dict[str, Any], path: str | Path, title: str = "MoH head usage") -> Path:
    """Heat map (layers x heads) of the fraction of tokens using each head; also writes the numbers as JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = usage["layers"]
    if not layers:
        raise ValueError("no MoH layer has usage statistics: run the patched model on some text first.")
    grid = [layers[i]["fraction"] for i in layers]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(5.0, 1 + 0.45 * len(grid[0])), 1.5 + 0.25 * len(grid)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax.set_xticks(range(len(grid[0])))
    mean = usage.get("mean_active_fraction")
    ax.set_title(title + (f"\nmean active {mean:.0%}" if mean is not None else ""), fontsize=10)
    fig.colorbar(image, ax=ax, label="fraction of tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    path.with_suffix(".json").write_text(json.dumps(usage, indent=1))
    return path
