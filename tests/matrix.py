"""The test grid: every family (from families/*.yaml) x every method case."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM

from hf_attn_zoo.families import family_specs
from hf_attn_zoo.registry import get_patch

FAMILIES = sorted(family_specs())

# tiny-model options per method; the neutral setting comes from the patch itself
METHOD_CASES: dict[str, dict] = {
    "bam": {"num_experts": 3},
    "graph_routing": {"mode": "similarity", "learned": True, "strength": 0.8, "temperature": 0.5},
    "combiner": {"factorisation": "logsparse", "block_size": 2, "pooling": "mean"},
    "hyper_attention": {"min_seq_len": 4, "block_size": 2, "sample_size": 2},
    "linearize": {"feature_map": "hedgehog", "window": 3, "chunk": 4},
    "mla": {"rank": 8, "rope_pairs": 2},
    "moa": {"alpha": 2, "beta": 0.125, "sinks": 1, "length": 16},
    "moba": {"block_size": 3, "top_k": 2, "key_conv": 3, "decode": "sparse"},
    "moh": {"router": "learned"},
    "mote": {"off": {"all": [0]}},
    "nalaformer": {"window": 2, "chunk": 4},
    "power_attention": {"block_size": 2, "window_blocks": 1, "sink_blocks": 1},
    "routing_attention": {"num_clusters": 2, "window": 3, "sinks": 1},
    "sliding_window": {"window": 3, "sinks": 1},
}

ATOL_FP32 = 1e-5


def supported(method: str, family: str) -> bool:
    """Whether `method` patches `family`'s tiny model (`Patch.check` gives no reason to refuse)."""
    spec = family_specs()[family]
    return get_patch(method).refusal(spec, spec.tiny_config()) is None


def tiny_model(family: str, **overrides) -> torch.nn.Module:
    spec = family_specs()[family]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(spec.tiny_config(**overrides))
    return model.eval()


def clone(model: torch.nn.Module) -> torch.nn.Module:
    twin = AutoModelForCausalLM.from_config(copy.deepcopy(model.config))
    twin.load_state_dict(model.state_dict())
    return twin.eval()


@torch.no_grad()
def decode_in_steps(model: torch.nn.Module, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """The logits of `ids` from a cached prefill of `prefill` tokens, then one token per call."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    steps = [model(ids[:, :prefill], cache=cache, use_cache=True).logits]
    steps += [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(prefill, ids.shape[1])]
    return torch.cat(steps, dim=1)


def randomize_new_parameters(model: torch.nn.Module) -> None:
    """Give the patch's new parameters (zero-initialised) values, so tests exercise real routing."""
    import hf_attn_zoo

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in hf_attn_zoo.new_parameters(model).values():
            param.copy_(torch.randn(param.shape, generator=generator))
