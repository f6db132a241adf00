"""HyperAttention: Long-context Attention in Near-Linear Time (arXiv:2310.05869, ICLR 2024).

Prefill attention is approximated by sortLSH block-diagonal attention plus a uniformly sampled residual, with
causal masking by recursive halving: exact causal attention on leaves of at most `min_seq_len` tokens, the
approximation on the off-diagonal rectangles (`hf_attn_zoo.kernels.hyper_attention`). Inputs of at most
`min_seq_len` tokens use the model's own attention (exact), which is also the neutral setting
(`min_seq_len >= max_position_embeddings`).

Replaces the attention function of the selected layers (`zoo` dispatcher; projections, RoPE and the cache stay the
family's own). Training-free, no parameters: the LSH projections and residual samples are drawn from a generator
seeded with `seed + layer index` at every call, so outputs are reproducible and a reloaded model is bit-exact.
Gradients flow to the queries, keys and values through both parts (the sort and sample indices are constants).

Prefill only (HyperAttention is a prefill method): decode steps (fewer queries than keys) attend the whole cache
exactly. So `kv_cache=False`: cached decode is exact attention, which differs from the approximate full forward of
the same tokens; `generate` works. With padding, each row is approximated over its real tokens only, with positions
counted from its first real token when the call gives no `position_ids` (as `generate` does: the LSH buckets of
rotated queries and keys depend on absolute positions), so a padded row gives the output of the same row unpadded;
padding queries output zeros. A layer's logit softcap (Gemma 2) caps the scores of every exact part of the
approximation, as the family's own attention does. Layers with the model's own sliding window (Gemma 3's local
layers) keep their attention, which is already local; a model whose every layer is local is refused. Attention
dropout is not applied on the approximated path.
Official code: https://github.com/insuhan/hyper-attn (ChatGLM2 only; patches all layers or the first/last N).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from transformers import PretrainedConfig

from ..errors import InvalidOptionError
from ..families.spec import FamilySpec
from ..kernels.hyper_attention import hyper_attention, padded_hyper_attention
from ..kernels.pattern_handler import check_length, max_positions, model_window, unsupported_attention_reason
from ..kernels.register import install_handler, remove_handler
from ..kernels.sparse_attention import PaddingTracker
from ..options import POSITIONS
from ..registry import Capabilities, Patch, PatchConfig, PatchHandle, register_patch

__all__ = ["HyperAttentionConfig", "HyperAttentionPatch", "hyper_attention_handler"]

MAX_LSH_PROJS = 16


@dataclass
class HyperAttentionConfig(PatchConfig):
    block_size: int = field(
        default=256,
        metadata={"help": "keys per sortLSH block of the block-diagonal part (paper: 256).", "ge": 1, "le": POSITIONS},
    )
    sample_size: int = field(
        default=256,
        metadata={"help": "keys sampled uniformly for the residual part (paper: 256).", "ge": 1, "le": POSITIONS},
    )
    lsh_num_projs: int = field(
        default=7,
        metadata={
            "help": "Gaussian projections of the angular LSH, 2^r buckets (paper: 7).",
            "ge": 1,
            "le": MAX_LSH_PROJS,
        },
    )
    min_seq_len: int = field(
        default=4096,
        metadata={
            "help": "exact attention up to this many tokens (whole inputs "
            "and the causal recursion's leaves; paper: 4096).",
            "ge": 1,
        },
    )
    seed: int = field(
        default=0, metadata={"help": "seed of the LSH projections and samples (layer i uses seed + i).", "ge": 0}
    )


def hyper_attention_handler(
    base,
    module,
    query,
    key,
    value,
    attention_mask,
    *,
    config: HyperAttentionConfig,
    seed: int,
    tracker: PaddingTracker,
    **kwargs,
):
    """Attention handler of a HyperAttention layer (see `hf_attn_zoo.kernels.register`)."""
    length = query.shape[2]
    check_length(module, key.shape[2])
    if key.shape[2] != length or length <= config.min_seq_len:
        return base(module, query, key, value, attention_mask, **kwargs)
    options = dict(
        scaling=kwargs.get("scaling"),
        block_size=config.block_size,
        sample_size=config.sample_size,
        lsh_num_projs=config.lsh_num_projs,
        min_seq_len=config.min_seq_len,
        seed=seed,
        softcap=kwargs.get("softcap"),
    )
    padding = tracker.padding(attention_mask, query.shape[0], length)
    if padding is None:
        out = hyper_attention(query, key, value, causal=True, **options)
    else:
        out = padded_hyper_attention(query, key, value, padding, **options)
    return out.transpose(1, 2).contiguous(), None


def _positions_from_first_real_token(module, args, kwargs):
    """Forward pre-hook of the causal LM: without `position_ids`, count a padded row's positions from its first real
    token (as `generate` does), so its rotated queries and keys, and hence its LSH buckets, are the unpadded row's."""
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if kwargs.get("position_ids") is not None or len(args) > 2:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    # without padding the positions below are the default ones: under torch.compile they are computed, not checked
    if not torch.compiler.is_compiling() and bool(mask.all()):
        return None
    inputs = kwargs.get("input_ids", args[0] if args else None)
    inputs = kwargs.get("inputs_embeds") if inputs is None else inputs
    if inputs is None:
        return None
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -inputs.shape[1] :]
    return args, {**kwargs, "position_ids": positions}


def _local_window(model_config: PretrainedConfig, layer: int) -> int | None:
    """The model's own sliding window on `layer` when it is shorter than the position range, else None."""
    window = model_window(model_config, layer)
    limit = max_positions(model_config)
    return window if window is not None and (not limit or window < limit) else None


def _num_layers(model_config: PretrainedConfig) -> int:
    text = getattr(model_config, "text_config", None) or model_config
    return int(text.num_hidden_layers)


@register_patch
class HyperAttentionPatch(Patch):
    name = "hyper_attention"
    summary = "HyperAttention: sortLSH block-diagonal + sampled residual, causal by recursive halving (prefill)."
    config_class = HyperAttentionConfig
    capabilities = Capabilities(training_free=True, new_params=False, kv_cache=False, generate=True)
    targets = ("attention_fn",)

    def check(self, family: FamilySpec, model_config: PretrainedConfig) -> str | None:
        reason = unsupported_attention_reason(family)
        if reason is not None:
            return reason
        if all(_local_window(model_config, i) is not None for i in range(_num_layers(model_config))):
            return (
                f"every layer attends only its own sliding window of {model_window(model_config, 0)} tokens "
                "(already local); HyperAttention approximates global attention"
            )
        return None

    def apply(
        self, model, config: HyperAttentionConfig, family: FamilySpec, layers: list[int], handle: PatchHandle
    ) -> None:
        global_layers = [i for i in layers if _local_window(model.config, i) is None]
        if not global_layers:
            raise InvalidOptionError(
                f"hyper_attention: layers {layers} all attend their own sliding window (already "
                "local); select global-attention layers."
            )
        tracker = PaddingTracker()
        for hook in tracker.install(model):
            handle.on_revert(hook.remove)
        hook = model.register_forward_pre_hook(_positions_from_first_real_token, with_kwargs=True)
        handle.on_revert(hook.remove)
        for index in global_layers:
            attention = family.attention_module(model, index)
            handler = functools.partial(
                hyper_attention_handler, config=config, seed=config.seed + index, tracker=tracker
            )
            install_handler(model, attention, handler)
            handle.on_revert(lambda a=attention: remove_handler(model, a))

    def neutral_config(self, family: FamilySpec, model_config: PretrainedConfig) -> HyperAttentionConfig:
        limit = max_positions(model_config)
        default = HyperAttentionConfig()
        sizes = min(default.block_size, limit) if limit else default.block_size
        return HyperAttentionConfig(block_size=sizes, sample_size=sizes, min_seq_len=max(limit, default.min_seq_len))
