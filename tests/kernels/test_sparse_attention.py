"""The static sparse-attention kernel: its three backends agree, padding is relative, caches are reused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_attn_zoo.errors import UnsupportedArchitectureError
from hf_attn_zoo.kernels import sparse_attention as sparse_attention_module
from hf_attn_zoo.kernels.masks import key_padding, left_padding
from hf_attn_zoo.kernels.sparse_attention import (
    AttentionPattern,
    block_mask_cache_info,
    clear_block_mask_cache,
    sparse_attention,
)
from hf_attn_zoo.patches.power_attention import PowerPattern
from hf_attn_zoo.patches.sliding_window import SinkWindowPattern


class PerHeadWindow(AttentionPattern):
    """Head h attends a window of windows[h] keys."""

    per_head = True

    def __init__(self, windows: list[int]):
        self.windows = torch.tensor(windows)

    def allowed(self, q, k, head):
        return (k <= q) & (q - k < self.windows[head])

    def cache_key(self):
        return ("per_head_window", tuple(self.windows.tolist()))


def _qkv(batch=1, heads=4, kv_heads=2, q_len=300, kv_len=300, dim=16, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=g)
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=g)
    v = torch.randn(batch, kv_heads, kv_len, dim, generator=g)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _reference(q, k, v, pattern, scaling, padding=None, softcap=None):
    """Loop over rows and heads: softmax over the allowed keys of each query (positions from the first real key)."""
    batch, heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    group = heads // k.shape[1]
    out = torch.zeros(batch, q_len, heads, v.shape[-1])
    for b in range(batch):
        off = 0 if padding is None else int(padding[b].float().argmax())
        qpos = torch.arange(kv_len - q_len, kv_len)[:, None] - off
        kpos = torch.arange(kv_len)[None, :] - off
        for h in range(heads):
            head = torch.tensor(h) if pattern.per_head else None
            mask = pattern.allowed(qpos, kpos, head) & (kpos >= 0)
            if padding is not None:
                mask = mask & padding[b][None, :]
            scores = (q[b, h] @ k[b, h // group].T) * scaling
            if softcap:
                scores = softcap * torch.tanh(scores / softcap)
            scores = scores.masked_fill(~mask, float("-inf"))
            weights = torch.softmax(scores, -1).nan_to_num(0.0)
            out[b, :, h] = weights @ v[b, h // group]
    return out


PATTERNS = [
    SinkWindowPattern(40, 4),
    SinkWindowPattern(7, 0, dilation=3),
    PowerPattern(16, 2, 1),
    PerHeadWindow([5, 50, 300, 1]),
]


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: str(p.cache_key()[0]))
@pytest.mark.parametrize("backend", ["masked", "blocks"])
def test_backends_equal_the_reference(pattern, backend):
    q, k, v = _qkv(q_len=200, kv_len=300)  # the queries are the last 200 positions (prefill over a cache)
    out = sparse_attention(q, k, v, pattern, scaling=0.25, backend=backend)
    torch.testing.assert_close(out, _reference(q, k, v, pattern, 0.25), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern", PATTERNS[:3], ids=lambda p: str(p.cache_key()[0]))
def test_flex_equals_the_chunked_path(pattern):
    q, k, v = _qkv(q_len=640, kv_len=640)
    flex = sparse_attention(q, k, v, pattern, scaling=0.25, backend="flex")
    blocks = sparse_attention(q, k, v, pattern, scaling=0.25, backend="blocks")
    torch.testing.assert_close(flex, blocks, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "pattern", [SinkWindowPattern(20, 3), PerHeadWindow([5, 50, 300, 1])], ids=["sink_window", "per_head"]
)
def test_left_padding_counts_positions_from_the_first_real_token(pattern):
    q, k, v = _qkv(q_len=150, kv_len=150)
    pad = 37
    padded = [F.pad(t, (0, 0, pad, 0)) for t in (q, k, v)]
    padding = torch.arange(150 + pad)[None] >= pad
    alone = sparse_attention(q, k, v, pattern, scaling=0.25, backend="masked")
    for backend in ("masked", "blocks", "flex"):
        out = sparse_attention(*padded, pattern, scaling=0.25, padding=padding, backend=backend)
        torch.testing.assert_close(out[:, pad:], alone, atol=1e-5, rtol=1e-5)
        assert out[:, :pad].abs().max() == 0, f"{backend}: padding queries must output zeros"


@pytest.mark.parametrize("pattern", [PowerPattern(32, 2, 1), PerHeadWindow([5, 50, 300, 1])], ids=["power", "per_head"])
def test_chunked_path_gradients_equal_the_masked_path(pattern):
    grads = []
    for backend in ("masked", "blocks"):
        q, k, v = _qkv(q_len=700, kv_len=700, grad=True)
        sparse_attention(q, k, v, pattern, scaling=0.25, backend=backend).square().sum().backward()
        grads.append([t.grad for t in (q, k, v)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_kept_positions_attend_like_the_full_cache():
    """A cache that evicted keys (positions given) reads exactly what the pattern allows of the full cache."""
    pattern = SinkWindowPattern(10, 2)
    q, k, v = _qkv(q_len=1, kv_len=64)
    full = sparse_attention(q, k, v, pattern, scaling=0.25)
    kept = torch.tensor([0, 1, *range(54, 64)])
    out = sparse_attention(q, k[:, :, kept], v[:, :, kept], pattern, scaling=0.25, key_positions=kept)
    torch.testing.assert_close(out, full, atol=1e-6, rtol=1e-6)


def test_block_masks_are_built_once_per_pattern_and_shape():
    clear_block_mask_cache()
    pattern = SinkWindowPattern(64, 4)
    q, k, v = _qkv(q_len=512, kv_len=512)
    for _ in range(3):
        sparse_attention(q, k, v, pattern, scaling=0.25, backend="flex")
    assert block_mask_cache_info() == {"hits": 2, "misses": 1, "size": 1}
    sparse_attention(q, k, v, SinkWindowPattern(64, 4), scaling=0.25, backend="flex")  # equal pattern, new object
    assert block_mask_cache_info()["misses"] == 1


def test_gathered_blocks_share_one_call_per_mask_and_are_planned_once():
    """Every full chunk of a sliding window gathers keys with the same mask: they run as one group, for every row."""
    clear_block_mask_cache()
    pattern = SinkWindowPattern(256, 4)
    q, k, v = _qkv(batch=2, heads=6, kv_heads=2, q_len=2048, kv_len=2048)
    outs = [sparse_attention(q, k, v, pattern, scaling=0.25, backend="blocks") for _ in range(3)]
    assert block_mask_cache_info() == {"hits": 2, "misses": 1, "size": 1}
    (plan,) = sparse_attention_module._GATHER_PLANS.values()
    assert len(plan.groups) <= 4
    largest = max(plan.groups, key=lambda g: g.units.numel())
    assert largest.units.numel() >= 2 * 5  # chunks 3..7 of both rows
    assert largest.keys.shape[1] == 256 + 255 + 4  # exactly the keys a chunk of 256 queries reads: window + sinks
    torch.testing.assert_close(outs[0], _reference(q, k, v, pattern, 0.25), atol=1e-5, rtol=1e-5)


def test_blocks_take_query_positions_in_any_order():
    pattern = SinkWindowPattern(40, 4)
    q, k, v = _qkv(q_len=600, kv_len=600)
    order = torch.randperm(600, generator=torch.Generator().manual_seed(0))
    out = sparse_attention(q[:, :, order], k, v, pattern, scaling=0.25, query_positions=order, backend="blocks")
    full = sparse_attention(q, k, v, pattern, scaling=0.25, backend="masked")
    torch.testing.assert_close(out, full[:, order], atol=1e-5, rtol=1e-5)


def test_prefill_lengths_in_one_chunk_bucket_share_a_plan():
    clear_block_mask_cache()
    pattern = PowerPattern(64, 2, 1)
    for length in (1700, 1790):  # both round up to 1792 = 7 chunks of 256
        q, k, v = _qkv(q_len=length, kv_len=length)
        out = sparse_attention(q, k, v, pattern, scaling=0.25, backend="blocks")
        torch.testing.assert_close(out, _reference(q, k, v, pattern, 0.25), atol=1e-5, rtol=1e-5)
    assert block_mask_cache_info() == {"hits": 1, "misses": 1, "size": 1}


def test_auto_backend_trains_on_cpu_without_flex():
    q, k, v = _qkv(q_len=2304, kv_len=2304, grad=True)
    out = sparse_attention(q, k, v, SinkWindowPattern(64, 4), scaling=0.25)  # flex has no CPU backward
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_key_padding_reads_every_mask_format():
    real = torch.tensor([[False, False, True, True], [True, True, True, True]])
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    bool_4d = causal[None, None] & real[:, None, None, :]
    float_4d = torch.zeros(2, 1, 4, 4).masked_fill(~bool_4d, torch.finfo(torch.float32).min)
    for mask in (bool_4d, float_4d, real.long()):
        assert torch.equal(key_padding(mask, 2, 4), real)
    assert key_padding(torch.ones(2, 4, dtype=torch.long), 2, 4) is None
    assert left_padding(real, 2, torch.device("cpu")).tolist() == [2, 0]
    with pytest.raises(UnsupportedArchitectureError, match="attn_implementation='sdpa'"):
        key_padding(object(), 2, 4)


@pytest.mark.parametrize("pattern", PATTERNS[:2] + PATTERNS[3:], ids=lambda p: str(p.cache_key()[0]))
def test_a_logit_softcap_equals_the_reference_forward_and_backward(pattern):
    q, k, v = _qkv(batch=2, q_len=120, kv_len=120, grad=True)
    with torch.no_grad():
        q.mul_(4)  # scores large enough for the cap to matter
    padding = torch.ones(2, 120, dtype=torch.bool)
    padding[1, :9] = False
    out = sparse_attention(q, k, v, pattern, scaling=0.25, padding=padding, softcap=5.0)
    qr, kr, vr = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    expected = _reference(qr, kr, vr, pattern, 0.25, padding, softcap=5.0)
    rows = padding[:, -120:]  # padding queries attend nothing: compare the real ones
    torch.testing.assert_close(out[rows], expected[rows], atol=1e-5, rtol=1e-5)
    uncapped = sparse_attention(q, k, v, pattern, scaling=0.25, padding=padding, backend="masked")
    assert (uncapped[rows] - out[rows]).abs().max() > 1e-2, "the cap should change these scores"
    grad = torch.randn_like(out) * rows[:, :, None, None]
    out.backward(grad)
    expected.backward(grad)
    for ours, theirs in ((q, qr), (k, kr), (v, vr)):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-4, rtol=1e-4)
