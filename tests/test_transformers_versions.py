"""What differs between the transformers this package supports: 5.17 (the GPU machine's) and the latest (here).

A smoke run of the GPU study and of `benchmarks/gpu_check.py` under transformers 5.17 found three breaks, each fixed
by reading what the installed version has instead of assuming the latest: a family whose model type 5.17 lacks
(`internlm3`) broke every family lookup, `TrainingArguments` only knows `gradient_checkpointing` there, and a model's
forward takes its KV cache as `past_key_values` (SCMoE and the efficiency probe passed `cache=`, which `**kwargs`
swallowed: decoding without a cache). These tests pin each rule on the installed version and on a stand-in for the
other one.
"""

from __future__ import annotations

import inspect

import torch
from transformers import TrainingArguments

from hf_attn_zoo.families import spec
from hf_attn_zoo.wrappers import cache_kwargs
from hf_attn_zoo.tuning.trainer import checkpointing_args


def test_a_family_whose_model_type_transformers_lacks_is_left_out(monkeypatch):
    from transformers.models.auto import configuration_auto

    every = spec.family_specs()
    name, family = next(iter(every.items()))
    names = {k: v for k, v in configuration_auto.CONFIG_MAPPING_NAMES.items() if k != family.model_types[0]}
    monkeypatch.setattr(configuration_auto, "CONFIG_MAPPING_NAMES", names)
    spec.family_specs.cache_clear()
    try:
        assert set(spec.family_specs()) == set(every) - {name}
    finally:
        spec.family_specs.cache_clear()


def test_checkpointing_arguments_are_ones_this_trainer_takes(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **checkpointing_args(True))
    name = next(iter(checkpointing_args(True)))
    assert getattr(args, name) is True and getattr(args, f"{name}_kwargs") == {"use_reentrant": False}


class _OldForward(torch.nn.Module):
    def forward(self, input_ids, attention_mask=None, past_key_values=None, **kwargs):
        return input_ids


def test_the_kv_cache_goes_by_the_name_the_models_forward_takes():
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32)
    current = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
    assert cache_kwargs(LlamaForCausalLM(tiny), "the cache") == {current: "the cache"}
    assert cache_kwargs(_OldForward(), "the cache") == {"past_key_values": "the cache"}
