"""`torch.compile` of every patched model: no graph break in the steady state, and the same outputs as eager.

Each method of the registry runs on the tiny model of the first family that takes it (Llama; an MoE family for the
MoE methods), with its options of the test grid. The steady state is:

- the forward without a cache, on a batch without padding and on a left-padded one: traced without a graph break
  (the model's hooks are graphs of their own), and a second call with the same shapes compiles nothing new;
- where the method caches (`Capabilities.kv_cache`), one-token decode steps after an eager prefill, over a
  `DynamicCache` (holding the method's own cache layers): the first step compiles, the second once more (the growing
  cache length becomes a dynamic size), and the next ones compile nothing (unless the patch declares
  `Capabilities.static_decode_graph=False`: Combiner's region structure follows the length); no step breaks the graph.

Not covered: the call that lays out a fresh bounded cache (given an attention mask, the prefill of `sliding_window`'s
and `moa`'s caches reads the batch's longest left padding on the host once: how many leading positions to keep),
training, and the backends a method runs only for long inputs outside `torch.compile` (`blocks`, `gather`, `sorted`:
they size their work from the data; under `torch.compile` `auto` picks the masked paths).

Compiled with the `eager` backend: what is tested is Dynamo's tracing (graph breaks, guards, recompiles); Inductor
would only add code generation time.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from transformers import DynamicCache

import hf_attn_zoo
from hf_attn_zoo.registry import PATCHES
from tests.matrix import FAMILIES, METHOD_CASES, randomize_new_parameters, supported, tiny_model

# about two minutes on one core: Dynamo traces each tiny model several times
pytestmark = pytest.mark.slow

ATOL = 1e-5
DECODE_STEPS = 3  # two warm-up steps (static, then dynamic cache length), then the steady state


def _family(method: str) -> str:
    return next(f for f in ("llama", "mixtral", *FAMILIES) if supported(method, f))


METHODS = sorted(PATCHES)
CACHING = [m for m in METHODS if PATCHES[m].capabilities.kv_cache]


def _patched(method: str) -> torch.nn.Module:
    model = hf_attn_zoo.patch(tiny_model(_family(method)), method, **METHOD_CASES[method])
    randomize_new_parameters(model)
    return model


def _compiled(fn: Callable) -> tuple[Callable, CompileCounterWithBackend]:
    """`fn` compiled from a clean slate, and the backend that counts the graphs it compiles."""
    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounterWithBackend("eager")
    return torch.compile(fn, backend=backend), backend


def _graph_breaks() -> dict[str, int]:
    """Graph breaks since `_compiled`, by reason: those Dynamo resumes after, and those that make it give up on a
    frame (counted apart, as `unimplemented`)."""
    return {**counters["graph_break"], **counters["unimplemented"]}


def _batch(padded: bool) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 128, (2, 12))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :4] = 0
    return {"input_ids": ids, "attention_mask": mask} if padded else {"input_ids": ids}


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_forward_compiles_without_graph_breaks_and_matches_eager(method, padded):
    model = _patched(method)
    inputs = _batch(padded)
    compiled, backend = _compiled(model)
    # compiled first: the first call of a process is the one that may find caches empty
    out = compiled(**inputs, use_cache=False).logits
    assert _graph_breaks() == {}
    expected = model(**inputs, use_cache=False).logits
    real = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
    torch.testing.assert_close(out[real], expected[real], atol=ATOL, rtol=ATOL)
    # the model's hooks compile as graphs of their own: count them all, then none may be added
    frames = backend.frame_count
    compiled(**_batch(padded), use_cache=False)  # new values, same shapes
    assert backend.frame_count == frames, "a second call with the same shapes recompiled"


@pytest.mark.parametrize("method", CACHING)
@torch.no_grad()
def test_decode_steps_compile_without_graph_breaks_and_match_eager(method):
    model = _patched(method)
    ids = torch.randint(3, 128, (2, 10 + DECODE_STEPS))
    caches = [DynamicCache(config=model.config) for _ in range(2)]
    for cache in caches:
        model(ids[:, :10], cache=cache, use_cache=True)
    compiled, backend = _compiled(model)
    frames = []
    for t in range(10, ids.shape[1]):
        step = ids[:, t : t + 1]
        out = compiled(step, cache=caches[1], use_cache=True).logits
        expected = model(step, cache=caches[0], use_cache=True).logits
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)
        frames.append(backend.frame_count)
    assert _graph_breaks() == {}, _graph_breaks()
    if PATCHES[method].capabilities.static_decode_graph:
        assert frames[-1] == frames[1], f"compiled frames after each step: {frames} (a recompile in the steady state)"


@torch.no_grad()
def test_generate_with_a_compiled_forward_decodes_without_recompiling():
    """`generate` (left-padded batch, greedy) with the forward compiled: the tokens of the eager model, and once the
    first call compiled what it needs (its prefill lays out the bounded cache), a second one compiles nothing."""
    model = _patched("sliding_window")
    ids = torch.randint(3, 128, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    options = {"attention_mask": mask, "max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    expected = model.generate(ids, **options)
    model.forward, backend = _compiled(model.forward)
    assert torch.equal(model.generate(ids, **options), expected)
    frames = backend.frame_count
    assert torch.equal(model.generate(ids, **options), expected)
    assert backend.frame_count == frames, "the second generate recompiled"
