"""Per-head MoA rules of one layer, as an attention pattern and as a KV cache that keeps only what each head can reach.

MoA (arXiv:2406.14909, §4 "kernel") gives every KV head its own cache size and packs heads of equal size together.
Here a layer's KV heads are grouped into *buckets* of equal retention `(s, w)` (the sinks and window of the head, or,
with per-query-head rules, the largest of its group: the union of sink+window sets is again sink+window). The cache
layer stores one key/value tensor per bucket, `[B, heads in bucket, kept, D]`, and after every step drops, per
bucket, the positions no later query can attend: everything except the row's first `s` real tokens and the last
`w - 1` positions. Keys keep their original positions (RoPE as computed), so decoding equals the masked full forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..kernels.kv_cache import RetainingLayer
from ..kernels.sparse_attention import AttentionPattern

__all__ = ["Bucket", "LayerRules", "MoACacheLayer", "MoAPattern"]


class _DeviceCopies:
    """Constant host tensors and their copies on other devices, each made at the first use on that device: no
    host-to-device copy per call (nor one captured in a CUDA graph).

    On the host device the tensors themselves serve, so CPU runs never fill the table. A table first filled inside a
    `torch.compile`d call compiles that frame once more at the next call (its guards saw it empty); `prepare` fills
    it beforehand.
    """

    def __init__(self, *tensors: torch.Tensor):
        self.host = tensors
        self._copies: dict[str, tuple[torch.Tensor, ...]] = {}

    def on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device == self.host[0].device:
            return self.host
        key = str(device)
        if key not in self._copies:
            self._copies[key] = tuple(t.to(device) for t in self.host)
        return self._copies[key]


class MoAPattern(AttentionPattern):
    """Per-query-head sink + window: `q` attends `k <= q` iff `k < sinks[h]` or `q - k < windows[h]`.

    `limit` is the layer's own sliding window (Mistral, Gemma 3's local layers): every pair also needs `q - k < limit`.
    """

    per_head = True

    def __init__(self, sinks: list[int], windows: list[int], limit: int | None = None):
        self.sinks, self.windows, self.limit = list(sinks), list(windows), limit
        # tensors, so compiled FlexAttention does not specialise on the values; built once, with one copy per device
        self._tensors = _DeviceCopies(
            torch.tensor(self.sinks), torch.tensor(self.windows), torch.tensor(0 if limit is None else limit)
        )

    def prepare(self, device: torch.device) -> None:
        """Make the pattern's tensors on `device` now (e.g. before the first `torch.compile`d call)."""
        self._tensors.on(torch.device(device))

    def allowed(self, q, k, head):
        sinks, windows, limit = self._tensors.on(q.device)
        allowed = (k <= q) & ((k < sinks[head]) | (q - k < windows[head]))
        return allowed if self.limit is None else allowed & (q - k < limit)

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
    _heads: _DeviceCopies = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_heads", _DeviceCopies(self.kv_heads, self.q_heads))

    def heads_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """`(kv_heads, q_heads)` on `device`, copied once per device."""
        kv_heads, q_heads = self._heads.on(device)
        return kv_heads, q_heads


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
        self._inverse = _DeviceCopies(self.inverse)

    def inverse_on(self, device: torch.device) -> torch.Tensor:
        """`inverse` on `device`, copied once per device."""
        return self._inverse.on(device)[0]

    def prepare(self, device: torch.device) -> None:
        """Make every tensor of the rules on `device` now, so that no call copies them, and a first `torch.compile`d
        call finds them (instead of compiling again after filling the per-device copies)."""
        device = torch.device(device)
        self.pattern.prepare(device)
        self.inverse_on(device)
        for bucket in self.buckets:
            bucket.pattern.prepare(device)
            bucket.heads_on(device)


_Span = tuple[int, int]  # positions `start .. stop - 1`


class MoACacheLayer(RetainingLayer):
    """A dynamic cache layer storing one key/value tensor per bucket of a `LayerRules`.

    `update` appends the new keys to every bucket and returns its inputs (the attention handler reads the buckets);
    `evict` (called by the handler after attending) drops what no later query of the bucket can attend. `pad` (set
    by the handler at the first call) is the longest left padding of the batch, so each row keeps its own first real
    tokens.

    What a bucket keeps is always a run of sinks and a run of recent positions, so its positions are held as at most
    two spans of Python ints (`bucket_spans`) and evicting is slicing: no host sync and no data-dependent shape, so a
    decode step traces under `torch.compile` without a graph break.
    """

    def __init__(self, rules: LayerRules):
        super().__init__()
        self.rules = rules
        self.pad: int | None = None
        self.bucket_keys: list[torch.Tensor] = []
        self.bucket_values: list[torch.Tensor] = []
        self.bucket_spans: list[list[_Span]] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.bucket_keys = [key_states[:, b.heads_on(self.device)[0], :0] for b in self.rules.buckets]
            self.bucket_values = [value_states[:, b.heads_on(self.device)[0], :0] for b in self.rules.buckets]
            self.bucket_spans = [[] for _ in self.rules.buckets]
        stop = self.seen + key_states.shape[-2]
        for i, bucket in enumerate(self.rules.buckets):
            heads = bucket.heads_on(self.device)[0]
            self.bucket_keys[i] = torch.cat([self.bucket_keys[i], key_states[:, heads]], dim=-2)
            self.bucket_values[i] = torch.cat([self.bucket_values[i], value_states[:, heads]], dim=-2)
            spans = self.bucket_spans[i]
            if spans and spans[-1][1] == self.seen:  # the recent run (it ends at `seen`) goes on
                spans[-1] = (spans[-1][0], stop)
            else:
                spans.append((self.seen, stop))
        self.seen = stop
        return key_states, value_states

    def evict(self) -> None:
        """Keep, per bucket, the sinks (`position < s + pad`) and what a query at `seen` or later still reaches."""
        limit = self.rules.limit
        for i, bucket in enumerate(self.rules.buckets):
            sinks = (
                max(0, self.seen - limit + 1) if limit is not None else 0,
                min(bucket.sink + (self.pad or 0), self.seen),
            )
            recent = (max(0, self.seen - bucket.window + 1), self.seen)
            # sinks start no later than the recent run (windows are clipped to the limit): merge where they touch
            kept = [(sinks[0], recent[1])] if sinks[1] >= recent[0] else [s for s in (sinks, recent) if s[0] < s[1]]
            if kept == self.bucket_spans[i]:
                continue
            held = self.bucket_spans[i]
            # every kept span lies inside one held span: its keys are one slice
            slices = [slice(_index(held, a), _index(held, a) + b - a) for a, b in kept] or [slice(0, 0)]
            self.bucket_keys[i] = torch.cat([self.bucket_keys[i][:, :, s] for s in slices], dim=-2)
            self.bucket_values[i] = torch.cat([self.bucket_values[i][:, :, s] for s in slices], dim=-2)
            self.bucket_spans[i] = kept

    def bucket_contiguous(self, i: int) -> bool:
        return self.bucket_spans[i] == [(0, self.seen)]

    def bucket_positions(self, i: int) -> torch.Tensor:
        """The positions of bucket `i`'s keys `[S_i]`."""
        spans = self.bucket_spans[i] or [(0, 0)]  # a bucket may keep nothing (a window shorter than one token)
        return torch.cat([torch.arange(a, b, device=self.device) for a, b in spans])

    @property
    def nbytes(self) -> int:
        """Bytes held by the keys and values of every bucket."""
        return sum(t.numel() * t.element_size() for t in (*self.bucket_keys, *self.bucket_values))

    def _map(self, fn) -> None:
        self.bucket_keys = [fn(t) for t in self.bucket_keys]
        self.bucket_values = [fn(t) for t in self.bucket_values]

    def reset(self) -> None:
        super().reset()
        self.pad = None
        self.bucket_keys, self.bucket_values, self.bucket_spans = [], [], []

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        # each bucket where it is (an offloaded one is on the CPU); beam search comes here too (`reorder_cache`)
        self._map(lambda t: t[indices.to(t.device)])

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        self._map(lambda t: t.to(self.device, non_blocking=True))


def _index(spans: list[_Span], position: int) -> int:
    """Where `position` (one of those `spans` hold) sits among them, in position order."""
    return sum(min(max(position - a, 0), b - a) for a, b in spans)
