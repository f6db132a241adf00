"""Feature maps of linear attention, a small registry: `phi(q) . phi(k)` stands in for `exp(q . k)`.

Each map takes the (projected) vectors `x` `[..., f]` and returns non-negative features `[..., blocks * f]`, so the
normaliser `phi(q) . sum_j phi(k_j)` stays positive. `blocks` says how many `f`-sized blocks the features hold: a
retrofit that moves RoPE onto the features (NaLaFormer) rotates each block.

- `nala`: NaLaFormer's norm-aware map (arXiv:2506.21137, the official `NormAwareLinearAttn`): keys are cubed, both
  split by sign into ReLU parts `[x+; x-]` (only same-sign coordinates interact); a query is divided by its norm `n`
  and raised element-wise to the norm-dependent power `p(n) = 3 (0.5 + tanh n)`, so a long query gives a sharper
  (lower-entropy) distribution, as softmax does.
- `hedgehog`: LoLCATs' / Hedgehog's softmax map (arXiv:2402.04347, 2410.10254): `[softmax(x); softmax(-x)]` over
  the feature dimension, after a learned projection.
- `elu`: `elu(x) + 1` (Katharopoulos et al., 2020), the classic baseline.
- `relu`: `relu(x)` (Kasai et al.'s T2R without its learned MLP: the projection is the patch's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
import torch
import torch.nn.functional as F

__all__ = ["FEATURE_MAPS", "FeatureMap", "register_feature_map"]

MapFunction = Callable[[torch.Tensor, bool], torch.Tensor]  # (x [..., f], is_query) -> [..., blocks * f]


@dataclass(frozen=True)
class FeatureMap:
    name: str
    fn: MapFunction
    blocks: int
    summary: str

    def __call__(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        return self.fn(x, is_query)


FEATURE_MAPS: dict[str, FeatureMap] = {}


def register_feature_map(name: str, blocks: int, summary: str) -> Callable[[MapFunction], MapFunction]:
    """Decorator: add `fn` to `FEATURE_MAPS` under `name` (a new map is then an option value of every linear patch)."""

    def add(fn: MapFunction) -> MapFunction:
        if name in FEATURE_MAPS:
            raise ValueError(f"a feature map named {name!r} is already registered")
        FEATURE_MAPS[name] = FeatureMap(name, fn, blocks, summary)
        return fn

    return add


def _power(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`x ** p` for `x >= 0` whose gradient stays finite at `x = 0` (`d/dp 0^p` is `0 * log 0` otherwise)."""
    positive = x > 0
    return torch.where(positive, x.clamp_min(torch.finfo(x.dtype).tiny).pow(p), torch.zeros_like(x))


@register_feature_map("nala", blocks=2, summary="NaLaFormer's norm-aware map (sign split, k^3, q^p(|q|))")
def nala(x: torch.Tensor, is_query: bool) -> torch.Tensor:
    x = x.float()
    if is_query:
        norm = x.norm(dim=-1, keepdim=True)
        power = 3.0 * (0.5 + torch.tanh(norm))
        x = x / norm.clamp_min(1e-6)
        return torch.cat([_power(F.relu(x), power), _power(F.relu(-x), power)], dim=-1)
    x = x.pow(3)
    return torch.cat([F.relu(x), F.relu(-x)], dim=-1)


@register_feature_map("hedgehog", blocks=2, summary="LoLCATs' Hedgehog map [softmax(x); softmax(-x)]")
def hedgehog(x: torch.Tensor, is_query: bool) -> torch.Tensor:
    x = x.float()
    return torch.cat([torch.softmax(x, dim=-1), torch.softmax(-x, dim=-1)], dim=-1)


@register_feature_map("elu", blocks=1, summary="elu(x) + 1 (Katharopoulos et al.)")
def elu(x: torch.Tensor, is_query: bool) -> torch.Tensor:
    return F.elu(x.float()) + 1


@register_feature_map("relu", blocks=1, summary="relu(x) (T2R-style)")
def relu(x: torch.Tensor, is_query: bool) -> torch.Tensor:
    return F.relu(x.float())
