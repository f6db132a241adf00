"""Routing attention: Efficient Content-Based Sparse Attention with Routing Transformers (Roy, Saffar, Vaswani,
Grangier; TACL 2021, arXiv:2003.05997), retrofitted to a pretrained model.

The paper: half of the heads are local (a causal window), half are *routing* heads whose queries attend only the keys
of the same k-means cluster. Per head, `c` centroids `mu` (about `sqrt(N)`); queries and keys are normalised (layer
norm without scale and bias; one shared Q = K projection in their language models) and assigned to the nearest
centroid; each cluster attends within itself, causally. The centroids are not trained by gradient but by online
k-means, `mu <- lambda mu + (1 - lambda) * (normalised mean of the query and key vectors assigned to mu)`
(lambda = 0.999), plus a commitment loss `||x - mu(x)||^2` (weight 1e-4 in lucidrains' code) that pulls the q/k
projections toward their centroids. The paper routes *balanced* top-w clusters (each centroid takes its w closest
tokens), an efficiency device for fixed-size TPU blocks that uses the whole sequence at once.

The retrofit (this patch), on a pretrained model's own q/k/v projections:
- `routing_heads` query heads (default: half, the last ones) route; the others are local. Every head also attends
  its causal `window` (the query included) and the row's first `sinks` tokens, so a routing head adds the keys of its
  cluster to the local context instead of replacing it (the pretrained heads were trained with a local context).
- Separate q and k from the pretrained projections, L2-normalised (no shared QK, which would need retraining).
  Pretrained queries and keys occupy different regions of the sphere, so k-means on both splits them into query
  clusters and key clusters and a routed query then meets few keys. By default (`centroid_data="keys"`) the
  centroids are fitted to the keys only (init and EMA) and each query is routed to the key cluster whose centroid it
  scores highest, a maximum-inner-product search over key clusters. Measured on SmolLM2-135M-Instruct (window 32, 8
  clusters, held-out loss, no tuning): dense 2.90, window only 3.27, k-means on queries and keys 3.28, on keys 3.17.
  Clusters are assigned on the vectors *before* RoPE (the rotation is inverted with the family's own
  `apply_rotary_pos_emb`): the clustering is content-based and independent of the absolute position, so a
  left-padded row routes exactly like the same row without padding.
- GQA-aware: centroids per KV head (`[KV, c, D]`), shared by the routing query heads of its group; a query of head
  `h` is compared with the keys and centroids of KV head `h // group`.
- A layer with its own sliding window (Mistral, Gemma 3's local layers) stays local: nothing beyond it is attended;
  a layer's logit softcap (Gemma 2) caps the attention scores as the family's own attention does.
- Per-token nearest-centroid assignment instead of balanced top-w: a token's cluster depends only on its own vector,
  so decoding reproduces the full forward (the cluster id of every cached key is kept in the KV cache,
  `RoutingKVLayer`); no balanced capacity, so a cluster may be large.
- Centroids are persistent buffers (`attention.routing_centroids.means`, saved with the model), updated by the EMA in
  training mode only, after the forward that used them (a recomputation by activation checkpointing routes by the
  centroids its forward used, and does not step again). At patch time they are random unit vectors from `seed`
  (deterministic, never uninitialised: lucidrains/routing-transformer#4); run `init_routing_centroids` (the
  `routing_kmeans_init` recipe hook) on real text before tuning or evaluating, which runs spherical k-means on the
  model's own normalised q/k vectors.

Not training-free (the pretrained heads never saw a clustered context); no new parameters (the centroids are EMA
buffers). Neutral setting: one cluster and a window over the whole position range (dense causal attention).
Official code: https://github.com/google-research/google-research/tree/master/routing_transformer
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig

from ..errors import InvalidOptionError, UnsupportedArchitectureError
from ..families.rope import capture_position_embeddings, pre_rope_refusal, rotary_function
from ..families.spec import FamilySpec, HeadLayout
from ..kernels.kv_cache import RetainingLayer, current_kv_layer, use_kv_layer
from ..kernels.pattern_handler import check_length, max_positions, model_window, unsupported_attention_reason
from ..kernels.register import install_handler, remove_handler
from ..kernels.routing_attention import routing_attention
from ..kernels.sparse_attention import PaddingTracker
from ..options import POSITIONS, QUERY_HEADS
from ..registry import Capabilities, Patch, PatchConfig, PatchHandle, register_patch, take_module_losses
from ..tuning.init_hooks import register_init_hook

__all__ = [
    "RoutingAttentionConfig",
    "RoutingAttentionPatch",
    "RoutingCentroids",
    "RoutingKVLayer",
    "init_routing_centroids",
    "routing_centroids",
]

logger = logging.getLogger(__name__)

_ROPE_ATTR = "_zoo_rope"


@dataclass
class RoutingAttentionConfig(PatchConfig):
    num_clusters: int = field(
        default=16, metadata={"help": "k-means centroids per KV head (paper: about sqrt(N)).", "ge": 1}
    )
    routing_heads: int | None = field(
        default=None,
        metadata={
            "help": "query heads that route (the last ones); the others are local. Default: half (paper).",
            "ge": 0,
            "le": QUERY_HEADS,
        },
    )
    window: int = field(
        default=256,
        metadata={"help": "causal local window of every head, the query included.", "ge": 1, "le": POSITIONS},
    )
    sinks: int = field(
        default=4, metadata={"help": "initial real tokens every query attends (0 = none).", "ge": 0, "le": POSITIONS}
    )
    ema_decay: float = field(
        default=0.999, metadata={"help": "online k-means decay lambda (paper: 0.999).", "ge": 0, "lt": 1}
    )
    commitment_weight: float = field(
        default=1e-4,
        metadata={
            "help": "weight of the commitment loss ||x - mu(x)||^2 (lucidrains: 1e-4), averaged over patched layers.",
            "ge": 0,
        },
    )
    centroid_data: Literal["keys", "queries_and_keys"] = field(
        default="keys",
        metadata={
            "help": "vectors the centroids are fitted to (k-means init and EMA): keys, with "
            "queries routed to the key clusters (retrofit default: measured on SmolLM2 it beats "
            "queries_and_keys, whose clusters split queries from keys), or queries_and_keys "
            "(the paper, which shares Q = K)."
        },
    )
    seed: int = field(
        default=0,
        metadata={
            "help": "seed of the random unit centroids set at patch time (before init_routing_centroids).",
            "ge": 0,
        },
    )
    backend: Literal["auto", "masked", "sorted"] = field(
        default="auto",
        metadata={
            "help": "auto (one masked SDPA for short inputs and decode, cluster-sorted gather "
            "for long ones), or force one."
        },
    )


class RoutingCentroids(nn.Module):
    """The k-means centroids of one layer (`means` `[KV, C, D]`, unit vectors, a persistent buffer) and the routing.

    Called with the pre-RoPE query `[B, H, Q, D]` and new keys `[B, KV, Q, D]`, it returns their cluster ids
    (`[B, H, Q]`, -1 for local heads; `[B, KV, Q]`). In training mode it also sets `last_aux_loss` (the commitment
    loss) and applies the EMA update; while `recorded` is a dict it collects the normalised vectors for k-means.
    `means` lives on `device` (the patch passes q_proj's) in float32 whatever the model's dtype: it is an EMA state,
    and a 0.999-decay step is below bf16's resolution (in bf16 most entries never move). Distances, the commitment
    loss and the EMA run in float32. Under several processes each EMA step sums the whole global batch (an
    all-reduce), so every process keeps the same centroids, whatever shards the parameters.
    """

    def __init__(
        self, layout: HeadLayout, config: RoutingAttentionConfig, seed: int, *, device: torch.device | str | None = None
    ):
        super().__init__()
        self.config = config
        self.seed = seed
        shape = (layout.num_kv_heads, config.num_clusters, layout.head_dim)
        if torch.device(device or "cpu").type == "meta":
            # nothing to draw on a meta-device model: the checkpoint or init_routing_centroids fills them later
            means = torch.empty(shape, device=device)
        else:
            # drawn on the CPU: the same centroids on every device
            generator = torch.Generator().manual_seed(seed)
            means = F.normalize(torch.randn(shape, generator=generator), dim=-1).to(device)
        self.register_buffer("means", means)
        # from Python ints, not nonzero/unique: those need values, which a meta-device model does not have
        self.routing_heads = list(range(layout.num_heads - config.routing_heads, layout.num_heads))
        routed_kv = sorted({h // layout.group_size for h in self.routing_heads})
        heads = torch.tensor(self.routing_heads, dtype=torch.long, device=device)
        routing = torch.arange(layout.num_heads, device=device) >= layout.num_heads - config.routing_heads
        self.register_buffer("routing", routing, persistent=False)
        self.register_buffer("routing_index", heads, persistent=False)
        self.register_buffer("routing_kv", heads // layout.group_size, persistent=False)
        self.register_buffer("routed_kv", torch.tensor(routed_kv, dtype=torch.long, device=device), persistent=False)
        self.last_aux_loss: torch.Tensor | None = None
        self.recorded: dict[int, list[torch.Tensor]] | None = None
        # the centroids before the last EMA step: what its forward routed by (see `_routing_means`)
        self._before_step: torch.Tensor | None = None

    def _routing_means(self) -> torch.Tensor:
        """The centroids this call routes by: `means`, except in a recomputation by activation checkpointing (inside
        the backward pass), which must route as its forward did, before that forward's EMA step."""
        return self._before_step if self._before_step is not None and _recomputing() else self.means

    def extra_repr(self) -> str:
        kv, clusters, dim = self.means.shape
        return (
            f"kv_heads={kv}, clusters={clusters}, head_dim={dim}, routing_heads={self.routing_heads}, "
            f"ema_decay={self.config.ema_decay}"
        )

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, real: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, q_len, _ = query.shape
        # fp32 distances to the centroids: in bf16 close scores tie and the argmax flips
        q = F.normalize(query[:, self.routing_index].float(), dim=-1)  # [B, R, Q, D]
        k = F.normalize(key.float(), dim=-1)  # [B, KV, Q, D]
        means = self._routing_means().float()
        with torch.no_grad():
            q_routes = torch.einsum("brqd,rcd->brqc", q, means[self.routing_kv]).argmax(-1)
            k_routes = torch.einsum("bkqd,kcd->bkqc", k, means).argmax(-1)
        q_clusters = torch.full((batch, heads, q_len), -1, dtype=torch.long, device=query.device)
        q_clusters[:, self.routing_index] = q_routes
        if self.recorded is not None:
            self._record(q, k, real)
        self.last_aux_loss = None
        if self.training and self.routing_index.numel():
            self._train_step(q, q_routes, k[:, self.routed_kv], k_routes[:, self.routed_kv], real)
        return q_clusters, k_routes

    def _flat(self, x, routes, kv_index, real):
        """Real vectors of `x` `[B, n, Q, D]` as rows `[N, D]`, with their flat centroid index `kv * C + c` `[N]`."""
        index = kv_index[None, :, None] * self.means.shape[1] + routes
        if real is not None:
            keep = real[:, None, :].expand_as(routes)
            return x[keep], index[keep]
        return x.reshape(-1, x.shape[-1]), index.reshape(-1)

    def _train_step(self, q, q_routes, k, k_routes, real) -> None:
        q_vectors, q_index = self._flat(q, q_routes, self.routing_kv, real)
        k_vectors, k_index = self._flat(k, k_routes, self.routed_kv, real)
        vectors, index = torch.cat([q_vectors, k_vectors]), torch.cat([q_index, k_index])
        if vectors.shape[0]:
            # commitment loss on queries and keys (gradient to the q/k projections only: the centroids are buffers)
            centroids = self._routing_means().float().flatten(0, 1)[index]
            self.last_aux_loss = (vectors - centroids).pow(2).sum(-1).mean()
        if _recomputing():  # count each step once
            return
        if self.config.centroid_data == "keys":
            vectors, index = k_vectors, k_index
        self._before_step = self.means.detach().clone()
        with torch.no_grad():
            flat = self.means.float().flatten(0, 1)
            sums = torch.zeros_like(flat).index_add_(0, index, vectors.detach())
            counts = torch.bincount(index, minlength=flat.shape[0])
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                # one step over the global batch on every process (even one with nothing to add: a collective),
                # so the copies stay equal; FSDP keeps buffers per process, DDP would broadcast process 0's
                torch.distributed.all_reduce(sums)
                torch.distributed.all_reduce(counts)
            hit = counts > 0
            decay = self.config.ema_decay
            # unit centroids (spherical k-means): the EMA of the normalised batch mean, renormalised
            updated = F.normalize(decay * flat + (1 - decay) * F.normalize(sums, dim=-1), dim=-1)
            flat = torch.where(hit[:, None], updated, flat)
            self.means.copy_(flat.view_as(self.means))

    def _record(self, q, k, real) -> None:
        for g in self.routed_kv.tolist():
            parts = [k[:, g : g + 1]]
            if self.config.centroid_data == "queries_and_keys":
                parts.append(q[:, self.routing_kv == g])
            for part in parts:
                rows = part.transpose(1, 2)  # [B, Q, n, D]
                rows = rows[real] if real is not None else rows.flatten(0, 1)
                self.recorded.setdefault(g, []).append(rows.reshape(-1, rows.shape[-1]).detach().cpu())


def _recomputing() -> bool:
    """Whether this forward is a recomputation by activation checkpointing: it runs inside the backward pass."""
    return torch._C._current_graph_task_id() != -1


class RoutingKVLayer(RetainingLayer):
    """A dynamic cache layer that keeps every position and, alongside, the cluster id of every cached key.

    Clusters come from the pre-RoPE keys, which the cache no longer holds: storing the ids makes each decode step
    route exactly as the full forward did.
    """

    def __init__(self) -> None:
        super().__init__()
        self.clusters: torch.Tensor | None = None  # [B, KV, S]

    def add_clusters(self, new: torch.Tensor) -> torch.Tensor:
        self.clusters = new if self.clusters is None else torch.cat([self.clusters, new], dim=-1)
        if self.clusters.shape[-1] != self.seen:
            raise RuntimeError(
                f"routing_attention: the cache holds {self.seen} keys but {self.clusters.shape[-1]} "
                "cluster ids; a cache filled before the patch cannot be continued, start a new one."
            )
        return self.clusters

    def reset(self) -> None:
        super().reset()
        self.clusters = None

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.clusters is not None:
            self.clusters = self.clusters.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.clusters is not None:
            self.clusters = self.clusters[indices]


def _routing_handler(
    base,
    module,
    query,
    key,
    value,
    attention_mask,
    *,
    tracker: PaddingTracker,
    config: RoutingAttentionConfig,
    rope,
    span: int | None,
    **kwargs,
):
    """Attention handler of a routing layer (see `hf_attn_zoo.kernels.register`)."""
    layer = current_kv_layer(module)
    batch, _, q_len, _ = query.shape
    total = key.shape[2]
    check_length(module, total)
    padding = tracker.padding(attention_mask, batch, total)
    real = padding[:, -q_len:] if padding is not None else None
    if rope is None:  # a NoPE layer: the vectors are already position-free
        q_pre, k_pre = query, key[:, :, -q_len:]
    else:  # the family's own rotation with -sin is its inverse: cluster the pre-RoPE (content) vectors
        cos, sin = module.__dict__.pop(_ROPE_ATTR)
        q_pre, k_pre = rope(query, key[:, :, -q_len:], cos, -sin)
    q_clusters, k_clusters = module.routing_centroids(q_pre, k_pre, real)
    if isinstance(layer, RoutingKVLayer):
        k_clusters = layer.add_clusters(k_clusters)
    elif total != q_len:
        raise UnsupportedArchitectureError(
            "routing_attention decodes with a dynamic cache, which keeps the cluster id of every cached key; use "
            "transformers' DynamicCache (generate's default) instead of a static or offloaded cache."
        )
    out = routing_attention(
        query,
        key,
        value,
        q_clusters,
        k_clusters,
        module.routing_centroids.routing,
        window=config.window,
        sinks=config.sinks,
        scaling=kwargs.get("scaling"),
        padding=padding,
        span=span,
        dropout=kwargs.get("dropout", 0.0) or 0.0,
        backend=config.backend,
        softcap=kwargs.get("softcap"),
    )
    return out, None


@register_patch
class RoutingAttentionPatch(Patch):
    name = "routing_attention"
    summary = "Routing Transformer: window + sinks, plus same-k-means-cluster keys on routing heads (EMA centroids)."
    config_class = RoutingAttentionConfig
    capabilities = Capabilities(training_free=False, new_params=False, kv_cache=True, generate=True, static_cache=False)
    targets = ("attention_fn",)

    def check(self, family: FamilySpec, model_config: PretrainedConfig) -> str | None:
        return pre_rope_refusal(family, "the clusters are built on") or unsupported_attention_reason(family)

    def validate(
        self, config: RoutingAttentionConfig, family: FamilySpec, model_config: PretrainedConfig
    ) -> RoutingAttentionConfig:
        heads = family.head_layout(model_config).num_heads
        return replace(config, routing_heads=heads // 2 if config.routing_heads is None else config.routing_heads)

    def apply(
        self, model, config: RoutingAttentionConfig, family: FamilySpec, layers: list[int], handle: PatchHandle
    ) -> None:
        layout = family.head_layout(model.config)
        tracker = PaddingTracker()
        for hook in tracker.install(model):
            handle.on_revert(hook.remove)
        tag = uuid.uuid4().hex
        for index in layers:
            attention = family.attention_module(model, index)
            rope = rotary_function(attention, self.name) if family.uses_rope(model.config, index) else None
            # built in place next to q_proj: no real memory on a meta-device model
            device = getattr(attention, family.attention.q).weight.device
            centroids = RoutingCentroids(layout, config, seed=config.seed * 65537 + index, device=device)
            # a new module starts in training mode: follow the model, or eval forwards would run the EMA update
            centroids.train(attention.training)
            centroids.patch_tag = tag
            attention.routing_centroids = centroids
            handle.on_revert(lambda a=attention: delattr(a, "routing_centroids"))
            if rope is not None:
                hook = capture_position_embeddings(attention, _ROPE_ATTR, self.name)
                handle.on_revert(hook.remove)
            hook = use_kv_layer(attention, RoutingKVLayer)
            handle.on_revert(hook.remove)
            handler = functools.partial(
                _routing_handler, tracker=tracker, config=config, rope=rope, span=model_window(model.config, index)
            )
            install_handler(model, attention, handler)
            handle.on_revert(lambda a=attention: remove_handler(model, a))

        def commitment_loss(model: nn.Module) -> torch.Tensor | None:
            losses = [loss for _, loss in take_module_losses(model, RoutingCentroids, tag)]
            if not losses or config.commitment_weight == 0:
                return None
            return config.commitment_weight * torch.stack(losses).mean()

        handle.aux_loss_fn = commitment_loss

    def neutral_config(self, family: FamilySpec, model_config: PretrainedConfig) -> RoutingAttentionConfig:
        return RoutingAttentionConfig(num_clusters=1, window=max_positions(model_config), sinks=0)


def routing_centroids(model: nn.Module) -> dict[str, RoutingCentroids]:
    """The routing-attention centroid modules of a model, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, RoutingCentroids)}


def _within_distance(x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of unit vectors `x` `[n, D]` to their nearest unit centroid: `2 - 2 max_c x . mu_c`."""
    return (2 - 2 * (x @ means.T).max(-1).values).mean()


def _spherical_kmeans(x: torch.Tensor, clusters: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """Spherical k-means (unit centroids, nearest = largest dot product), seeded with distinct random vectors."""
    n, dim = x.shape
    picks = torch.randperm(n, generator=generator)[:clusters]
    extra = F.normalize(torch.randn(clusters - picks.numel(), dim, generator=generator), dim=-1)
    means = torch.cat([x[picks], extra])
    for _ in range(iterations):
        assign = (x @ means.T).argmax(-1)
        sums = torch.zeros_like(means).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=clusters)
        # an empty cluster keeps its centroid
        means = torch.where(counts[:, None] > 0, F.normalize(sums, dim=-1), means)
    return means


@torch.no_grad()
def init_routing_centroids(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], iterations: int = 10, max_vectors: int = 65536
) -> dict[str, float]:
    """Initialise every routing layer's centroids by spherical k-means on the model's own normalised q/k vectors.

    Runs the model (eval mode, no gradient) over `batches` (dicts with `input_ids`, optionally `attention_mask`),
    records per layer and KV head its normalised pre-RoPE key vectors (and, with `centroid_data="queries_and_keys"`,
    the query vectors of its routing heads; real tokens only; at most `max_vectors`, subsampled deterministically),
    then runs `iterations` of k-means seeded
    from the layer's seed. Returns the mean within-cluster squared distance before and after, averaged over layers
    and KV heads, and the number of layers and vectors.
    """
    modules = [m for m in routing_centroids(model).values() if m.routing_index.numel()]
    if iterations < 1:
        raise InvalidOptionError(f"init_routing_centroids: iterations={iterations} must be >= 1.")
    if not modules:
        raise InvalidOptionError(
            "init_routing_centroids needs a model patched with routing_attention and at least one routing head."
        )
    was_training = model.training
    model.eval()
    for m in modules:
        m.recorded = {}
    try:
        for batch in batches:
            model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")})
        before, after, vectors = [], [], 0
        for m in modules:
            generator = torch.Generator().manual_seed(m.seed)
            for g, parts in sorted(m.recorded.items()):
                x = torch.cat(parts)
                if x.shape[0] > max_vectors:
                    x = x[torch.randperm(x.shape[0], generator=generator)[:max_vectors]]
                if x.shape[0] == 0:
                    continue
                # k-means in fp32 on the CPU
                current = m.means[g].float().cpu()
                means = _spherical_kmeans(x, current.shape[0], iterations, generator)
                before.append(_within_distance(x, current).item())
                after.append(_within_distance(x, means).item())
                vectors += x.shape[0]
                m.means[g] = means.to(m.means)
    finally:
        for m in modules:
            m.recorded = None
        model.train(was_training)
    if not before:
        raise InvalidOptionError("init_routing_centroids: the batches held no real tokens.")
    return {
        "distance_before": sum(before) / len(before),
        "distance_after": sum(after) / len(after),
        "layers": len(modules),
        "vectors": vectors,
    }


@register_init_hook("routing_kmeans_init")
def routing_kmeans_init(model, train_dataset, tokens: int = 4096, batch_size: int = 8, iterations: int = 10) -> None:
    """Recipe hook: `init_routing_centroids` on the first `tokens` training tokens (before any tuning step)."""
    blocks = max(1, min(len(train_dataset), tokens // len(train_dataset[0]["input_ids"])))
    ids = torch.stack([torch.as_tensor(row) for row in train_dataset[:blocks]["input_ids"]])
    device = next(model.parameters()).device
    fit = init_routing_centroids(
        model, [{"input_ids": chunk.to(device)} for chunk in ids.split(batch_size)], iterations=iterations
    )
    logger.info(
        "routing_kmeans_init: within-cluster distance %.3f -> %.3f on %d vectors",
        fit["distance_before"],
        fit["distance_after"],
        fit["vectors"],
    )
