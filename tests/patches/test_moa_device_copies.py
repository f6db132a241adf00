"""MoA's per-head tensors are copied to a device once, not at every call (a host-to-device copy per layer and
forward on a GPU, which a CUDA graph cannot replay); the meta device stands in for a second device here."""

from __future__ import annotations

import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from hf_attn_zoo.moa.cache import LayerRules, MoAPattern


def _positions(device):
    q = torch.arange(8, device=device)[None, None, :, None]
    return q, q.transpose(-1, -2), torch.arange(4, device=device)[None, :, None, None]


def test_the_pattern_copies_its_tensors_once_per_device():
    pattern = MoAPattern([1, 0, 2, 1], [3, 4, 2, 5], limit=4)
    host = pattern.allowed(*_positions("cpu"))
    assert not pattern._tensors._copies  # the host device uses the host tensors
    pattern.allowed(*_positions("meta"))
    copies = pattern._tensors._copies["meta"]
    assert pattern.allowed(*_positions("meta")).shape == host.shape
    assert all(a is b for a, b in zip(pattern._tensors._copies["meta"], copies, strict=True))
    q, k, head = _positions("cpu")
    sinks, windows = torch.tensor([1, 0, 2, 1])[head], torch.tensor([3, 4, 2, 5])[head]
    assert torch.equal(host, (k <= q) & ((k < sinks) | (q - k < windows)) & (q - k < 4))


def test_prepared_rules_hold_every_tensor_on_the_device():
    rules = LayerRules([(1, 3), (1, 3), (0, 5), (0, 6)], num_kv_heads=2, limit=None)
    rules.prepare(torch.device("meta"))
    for bucket in rules.buckets:
        assert all(t.is_meta for t in bucket.heads_on(torch.device("meta")))
        assert "meta" in bucket.pattern._tensors._copies
    assert rules.inverse_on(torch.device("meta")).is_meta and "meta" in rules.pattern._tensors._copies
    assert torch.equal(rules.inverse_on(torch.device("cpu")), rules.inverse)


def test_a_prepared_pattern_compiles_once_without_graph_breaks():
    pattern = MoAPattern([1, 0, 2, 1], [3, 4, 2, 5], limit=4)
    pattern.prepare("meta")
    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounterWithBackend("eager")
    compiled = torch.compile(pattern.allowed, backend=backend)
    for _ in range(3):
        compiled(*_positions("meta"))
    assert backend.frame_count == 1
    assert not counters["graph_break"]
