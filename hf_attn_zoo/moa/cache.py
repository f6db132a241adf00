"""Per-head MoA rules of one layer, as an attention pattern and as a KV cache that keeps only what each head can reach.

MoA (arXiv:2406.14909, §4 "kernel") gives every KV head its own cache size and packs heads of equal size together.
Here a layer's KV heads are grouped into *buckets* of equal retention `(s, w)` (the sinks and window of the head, or,
with per-query-head rules, the largest of its group: the union of sink+window sets is again sink+window). The cache
layer stores one key/value tensor per bucket, `[B, heads in bucket, kept, D]`, and after every step drops, per
bucket, the positions no later query can attend: everything except the row's first `s` real tokens and the last
`w - 1` positions. Keys keep their original positions (RoPE as computed), so decoding equals the masked full forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.kv_cache import RetainingLayer
from ..kernels.sparse_attention import AttentionPattern

__all__ = ["Bucket", "LayerRules", "MoACacheLayer", "MoAPattern"]


class MoAPattern(AttentionPattern):
    """Per-query-head sink + window: `q` attends `k <= q` iff `k < sinks[h]` or `q - k < windows[h]`.

    `limit` is the layer's own sliding window (Mistral, Gemma 3's local layers): every pair also needs `q - k < limit`.
    """

    per_head = True

    def __init__(self, sinks: list[int], windows: list[int], limit: int | None = None):
        self.sinks, self.windows, self.limit = list(sinks), list(windows), limit
        self._tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._tensors:
            self._tensors[key] = (torch.tensor(self.sinks, device=device), torch.tensor(self.windows, device=device))
        return self._tensors[key]

    def allowed(self, q, k, head):
        sinks, windows = self._on(q.device)
        allowed = (k <= q) & ((k < sinks[head]) | (q - k < windows[head]))
        return allowed if self.limit is None else allowed & (q - k < torch.tensor(self.limit))

    def cache_key(self):
        return ("moa", tuple(self.sinks), tuple(self.windows), self.limit)


@dataclass(frozen=True)
class Bucket:
    """KV heads kept alike: their indices, the query heads reading them, the retention and those heads' pattern."""

    kv_heads: torch.Tensor
    q_heads: torch.Tensor
    sink: int
    window: int
    pattern: MoAPattern


class LayerRules:
    """The rules `(s, w)` of each query head of one layer, the whole-layer pattern and its KV buckets.

    `limit`: the layer's own sliding window, if it has one (windows are clipped to it and sinks expire beyond it).
    """

    def __init__(self, rules: list[tuple[int, int]], num_kv_heads: int, limit: int | None = None):
        if limit is not None:
            rules = [(s, min(w, limit)) for s, w in rules]
        self.rules, self.limit = rules, limit
        self.pattern = MoAPattern([s for s, _ in rules], [w for _, w in rules], limit)
        group = len(rules) // num_kv_heads
        retention: dict[tuple[int, int], list[int]] = {}
        for kv in range(num_kv_heads):
            members = rules[kv * group : (kv + 1) * group]
            retention.setdefault((max(s for s, _ in members), max(w for _, w in members)), []).append(kv)
        self.buckets = []
        for (sink, window), kv_heads in sorted(retention.items()):
            q_heads = [kv * group + g for kv in kv_heads for g in range(group)]
            self.buckets.append(
                Bucket(
                    torch.tensor(kv_heads),
                    torch.tensor(q_heads),
                    sink,
                    window,
                    MoAPattern([rules[h][0] for h in q_heads], [rules[h][1] for h in q_heads], limit),
                )
            )
        order = torch.cat([b.q_heads for b in self.buckets])
        # bucket outputs are concatenated in bucket order; this puts the query heads back in model order
        self.inverse = torch.argsort(order)


class MoACacheLayer(RetainingLayer):
    """A dynamic cache layer storing one key/value tensor per bucket of a `LayerRules`.

    `update` appends the new keys to every bucket and returns its inputs (the attention handler reads the buckets);
    `evict` (called by the handler after attending) drops what no later query of the bucket can attend. `pad` (set
    by the handler) is the longest left padding of the batch, so each row keeps its own first real tokens.
    """

    def __init__(self, rules: LayerRules):
        super().__init__()
        self.rules = rules
        self.pad = 0
        self.bucket_keys: list[torch.Tensor] = []
        self.bucket_values: list[torch.Tensor] = []
        self.bucket_positions: list[torch.Tensor] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.bucket_keys = [key_states[:, b.kv_heads.to(self.device), :0] for b in self.rules.buckets]
            self.bucket_values = [value_states[:, b.kv_heads.to(self.device), :0] for b in self.rules.buckets]
            self.bucket_positions = [torch.empty(0, dtype=torch.long, device=self.device) for _ in self.rules.buckets]
        new = torch.arange(self.seen, self.seen + key_states.shape[-2], device=self.device)
        for i, bucket in enumerate(self.rules.buckets):
            heads = bucket.kv_heads.to(self.device)
            self.bucket_keys[i] = torch.cat([self.bucket_keys[i], key_states[:, heads]], dim=-2)
            self.bucket_values[i] = torch.cat([self.bucket_values[i], value_states[:, heads]], dim=-2)
            self.bucket_positions[i] = torch.cat([self.bucket_positions[i], new])
        self.seen += key_states.shape[-2]
        return key_states, value_states

    def evict(self) -> None:
        """Keep, per bucket, the sinks (`position < s + pad`) and what a query at `seen` or later still reaches."""
        for i, bucket in enumerate(self.rules.buckets):
            positions = self.bucket_positions[i]
            sinks = positions < bucket.sink + self.pad
            if self.rules.limit is not None:
                sinks &= positions > self.seen - self.rules.limit
            keep = sinks | (positions > self.seen - bucket.window)
            if not bool(keep.all()):
                self.bucket_keys[i] = self.bucket_keys[i][:, :, keep]
                self.bucket_values[i] = self.bucket_values[i][:, :, keep]
                self.bucket_positions[i] = positions[keep]

    def bucket_contiguous(self, i: int) -> bool:
        return self.bucket_positions[i].numel() == self.seen

    @property
    def nbytes(self) -> int:
        """Bytes held by the keys and values of every bucket."""
        return sum(t.numel() * t.element_size() for t in (*self.bucket_keys, *self.bucket_values))

    def _map(self, fn) -> None:
        self.bucket_keys = [fn(t) for t in self.bucket_keys]
        self.bucket_values = [fn(t) for t in self.bucket_values]

    def reset(self) -> None:
        super().reset()
        self.pad = 0
        self.bucket_keys, self.bucket_values, self.bucket_positions = [], [], []

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        self._map(lambda t: t.to(self.device, non_blocking=True))
