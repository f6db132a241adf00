"""A model converted with the `mla` patch, written as a stock DeepSeek-V3 checkpoint (`model_type: deepseek_v3`, dense
MLP layers): plain transformers loads it without this package and without remote code, with the same logits.

The patch's layers map onto DeepSeek-V3's attention weight for weight (`q_proj` = the query map folded into the
query rows, `kv_a_proj_with_mqa` = the latent and RoPE-key rows, `kv_b_proj` = `B` repeated for each query head of a
KV head). Three things need care:

- **The shared RoPE key.** The patch already has DeepSeek's layout (`[no-RoPE; RoPE]` queries through its query map,
  one shared RoPE key in the `rotate_half` slot layout), but each slot turns at the frequency of the pair it came
  from: the rotary is written as `longrope` with one factor per slot (no length switch, attention factor = the
  source's), so every layer must keep the same frequencies.
- **The latent norm.** DeepSeek normalises the latent (`kv_a_layernorm`, RMSNorm, eps 1e-6); the patch does not.
  The latent rows are scaled by a tiny `s` so that `mean(c^2)` stays ~1e-8 of eps, where the norm is linear to fp32
  rounding, and the norm weight `sqrt(eps) / s` undoes the scale. (bf16 and fp32 hold these exponents; fp16 would
  underflow.)
- **The score scale** `1/sqrt(qk_head_dim)` of DeepSeek, folded into the query rows to keep the source's own.

What DeepSeek-V3 cannot express is refused by name (q bias, sliding windows, MoE layers, layers with different RoPE
widths, ...), and the written checkpoint is loaded back with plain transformers and compared with the patched model
before it is moved into place.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import UnsupportedArchitectureError
from .families.rope import channel_pairs
from .families.spec import resolve_family
from .outputs import atomic_output
from .patches.mla import LatentKV

__all__ = ["export_deepseek_v3"]

_LATENT_EPS = 1e-6  # DeepseekV3RMSNorm's default, which kv_a_layernorm is built with
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def _refuse(reason: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(f"export_deepseek_v3: {reason}")


def _layers(model: Any, family: Any) -> list[LatentKV]:
    text = model.config.get_text_config()
    latents = []
    for index in range(text.num_hidden_layers):
        latent_kv = getattr(family.attention_module(model, index), "mla", None)
        if not isinstance(latent_kv, LatentKV):
            raise _refuse(
                f"layer {index} is not converted; patch every layer with mla (layers='all') before exporting."
            )
        latents.append(latent_kv)
    widths = {(m.rank, m.rope_width) for m in latents}
    if len(widths) > 1:
        raise _refuse(
            f"the layers differ in (rank, RoPE channels) {sorted(widths)} (NoPE layers keep none); DeepSeek-V3 "
            "has one of each for all layers."
        )
    if latents[0].rope_width == 0:
        raise _refuse("no RoPE channel is kept (rope_pairs=0); DeepSeek-V3 needs qk_rope_head_dim >= 2.")
    return latents


def _check_expressible(model: Any, family: Any) -> None:
    text = model.config.get_text_config()
    if family.mlp.kind != "dense":
        raise _refuse("the model has MoE layers; the export writes dense MLP layers only.")
    if getattr(text, "sliding_window", None) is not None and any(
        t != "full_attention" for t in getattr(text, "layer_types", None) or ["sliding_attention"]
    ):
        raise _refuse("the model has sliding-window layers, which DeepSeek-V3's attention cannot express.")
    attention = family.attention_module(model, 0)
    if getattr(attention, family.attention.q).bias is not None:
        raise _refuse("the query projection has a bias; DeepSeek-V3's q_proj has none.")
    mlp = family.mlp_module(model, 0)
    if not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
        raise _refuse("the MLP is not a gated gate_proj / up_proj / down_proj block like DeepSeek-V3's.")
    if any(getattr(mlp, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj")):
        raise _refuse("the MLP projections have biases; DeepSeek-V3's have none.")
    layer = family.decoder_layers(model)[0]
    if not all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm")):
        raise _refuse("the decoder layers are not pre-norm blocks with input_layernorm / post_attention_layernorm.")


def _rotary(model: Any) -> Any:
    rotaries = {id(m): m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)}
    if len(rotaries) != 1:
        raise _refuse(f"the model has {len(rotaries)} rotary embeddings; the export needs exactly one.")
    rotary = next(iter(rotaries.values()))
    if getattr(rotary, "rope_type", "default") not in _STATIC_ROPE:
        raise _refuse(f"its RoPE ({rotary.rope_type}) changes with the length; supported: {', '.join(_STATIC_ROPE)}.")
    return rotary


def _slot_pairs(latent_kv: LatentKV, pair_of: list[int]) -> list[int]:
    """The RoPE frequency (pair id) that turns each slot of a layer's shared key."""
    return [pair_of[int(c)] for c in latent_kv.slot_pairs[:, 0]]


def _config(model: Any, latent_kv: LatentKV, rotary: Any, slot_freq: torch.Tensor, bias: bool) -> Any:
    from transformers import DeepseekV3Config

    text = model.config.get_text_config()
    heads = text.num_attention_heads
    rope_dim = latent_kv.rope_width
    base = 10000.0
    standard = base ** (torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)
    factors = (1.0 / (slot_freq.double() * standard)).tolist()
    mlp_width = text.intermediate_size
    return DeepseekV3Config(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=mlp_width,
        moe_intermediate_size=mlp_width,
        num_hidden_layers=text.num_hidden_layers,
        first_k_dense_replace=text.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        n_shared_experts=1,
        n_routed_experts=1,
        num_experts_per_tok=1,
        n_group=1,
        topk_group=1,
        kv_lora_rank=latent_kv.rank,
        q_lora_rank=None,
        qk_rope_head_dim=rope_dim,
        qk_nope_head_dim=latent_kv.nope_width,
        v_head_dim=latent_kv.head_dim,
        hidden_act=text.hidden_act,
        max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=text.rms_norm_eps,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": base,
            "short_factor": factors,
            "long_factor": factors,
            "original_max_position_embeddings": text.max_position_embeddings,
            "attention_factor": float(getattr(rotary, "attention_scaling", 1.0)),
        },
        rope_interleave=False,
        attention_bias=bias,
        attention_dropout=getattr(text, "attention_dropout", 0.0),
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        pad_token_id=getattr(text, "pad_token_id", None),
    )


@torch.no_grad()
def _state_dict(model: Any, family: Any, latents: list[LatentKV], bias: bool) -> dict[str, torch.Tensor]:
    text = model.config.get_text_config()
    heads, d = text.num_attention_heads, latents[0].head_dim
    kv_heads, nope = latents[0].kv_heads, latents[0].nope_width
    group = heads // kv_heads
    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": model.get_input_embeddings().weight,
        "model.norm.weight": _final_norm(model).weight,
    }
    if not getattr(text, "tie_word_embeddings", False):
        out["lm_head.weight"] = model.get_output_embeddings().weight
    for index, latent_kv in enumerate(latents):
        prefix = f"model.layers.{index}."
        attention = family.attention_module(model, index)
        layer = family.decoder_layers(model)[index]
        down = latent_kv.kv_down
        weight = down.weight.double()
        bias_column = down.bias.double() if down.bias is not None else weight.new_zeros(weight.shape[0])
        rows = torch.cat([weight, bias_column[:, None]], 1)
        # the latent rows scaled into the linear range of kv_a_layernorm: mean(c^2) <= 1e-8 eps for inputs of rms <= 1e4
        latent_rows = rows[: latent_kv.rank]
        bound = torch.linalg.matrix_norm(latent_rows, ord=2).item() * 1e4 * math.sqrt(text.hidden_size + 1)
        scale = 1e-4 * math.sqrt(_LATENT_EPS * latent_kv.rank) / max(bound, 1e-30)
        rows = torch.cat([latent_rows * scale, rows[latent_kv.rank :]])
        out[prefix + "self_attn.kv_a_proj_with_mqa.weight"] = rows[:, :-1]
        if bias:
            out[prefix + "self_attn.kv_a_proj_with_mqa.bias"] = rows[:, -1]
        out[prefix + "self_attn.kv_a_layernorm.weight"] = torch.full(
            (latent_kv.rank,), math.sqrt(_LATENT_EPS) / scale, dtype=torch.float64
        )
        up = latent_kv.kv_up.weight.view(kv_heads, nope + d, latent_kv.rank)
        out[prefix + "self_attn.kv_b_proj.weight"] = up.repeat_interleave(group, 0).reshape(-1, latent_kv.rank)
        # queries: the query map folded into the query rows; DeepSeek's 1/sqrt(qk_head_dim) made the source's scale
        q_weight = getattr(attention, family.attention.q).weight.double().view(heads, d, -1)
        q_rows = torch.einsum("hed,hdi->hei", latent_kv.query_map.double(), q_weight)
        q_rows = q_rows * attention.scaling * math.sqrt(nope + latent_kv.rope_width)
        out[prefix + "self_attn.q_proj.weight"] = q_rows.reshape(-1, q_rows.shape[-1])
        o_proj = getattr(attention, family.attention.o)
        out[prefix + "self_attn.o_proj.weight"] = o_proj.weight
        if bias:
            out[prefix + "self_attn.o_proj.bias"] = (
                o_proj.bias if o_proj.bias is not None else o_proj.weight.new_zeros(o_proj.out_features)
            )
        mlp = family.mlp_module(model, index)
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[prefix + f"mlp.{name}.weight"] = getattr(mlp, name).weight
        out[prefix + "input_layernorm.weight"] = layer.input_layernorm.weight
        out[prefix + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
    dtype = model.get_input_embeddings().weight.dtype
    return {k: v.detach().to(dtype).contiguous().cpu() for k, v in out.items()}


def _final_norm(model: Any) -> Any:
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    norm = getattr(inner, "norm", None)
    if norm is None:
        raise _refuse("the decoder has no final `norm`.")
    return norm


def export_deepseek_v3(
    model: Any, out_dir: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False, atol: float = 1e-4
) -> Path:
    """Write `model` (every layer patched with `mla`) as a stock DeepSeek-V3 checkpoint in `out_dir`.

    The checkpoint is loaded back with plain `transformers` and its logits compared with `model`'s on a random batch
    (fp32, tolerance `atol` relative to the logits' scale) before it is moved into place.

    Returns:
        `Path`: `out_dir`.

    Raises:
        `UnsupportedArchitectureError`: what DeepSeek-V3 cannot express, by name; or logits that differ.
    """
    from transformers import AutoModelForCausalLM

    family = resolve_family(model.config)
    _check_expressible(model, family)
    latents = _layers(model, family)
    rotary = _rotary(model)
    attention = family.attention_module(model, 0)
    bias = any(
        getattr(getattr(attention, getattr(family.attention, p)), "bias", None) is not None for p in "kvo"
    ) or any(m.kv_down.bias is not None for m in latents)
    _, pair_of = channel_pairs(family, model.config)
    ids = _slot_pairs(latents[0], pair_of)
    slot_freq = rotary.inv_freq.detach().double().cpu()[ids]
    if any(_slot_pairs(m, pair_of) != ids for m in latents[1:]):
        # one rotary for all layers: the slots must turn at the same frequencies in every layer
        raise _refuse(
            "the layers keep different RoPE frequency pairs; DeepSeek-V3 has one rotary for all layers. Convert with "
            "rope_scope='model' (one choice of frequencies for every layer), or rope_selection high, low or uniform."
        )
    config = _config(model, latents[0], rotary, slot_freq, bias)
    state = _state_dict(model, family, latents, bias)
    with atomic_output(out_dir, overwrite=overwrite, what="DeepSeek-V3 export") as tmp:
        stock = AutoModelForCausalLM.from_config(config).to(model.get_input_embeddings().weight.dtype)
        missing, unexpected = stock.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        if unexpected or [k for k in missing if k not in tied]:
            raise _refuse(f"the weights do not fit DeepSeek-V3 (missing {missing[:3]}, unexpected {unexpected[:3]}).")
        stock.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _compare(model, tmp, atol)
    return Path(out_dir)


@torch.no_grad()
def _compare(model: Any, folder: Path, atol: float) -> None:
    """Load `folder` with plain transformers in fp32 and compare its logits with `model`'s (in fp32 too)."""
    import copy

    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    fp32 = model.get_input_embeddings().weight.dtype == torch.float32
    reference = model if fp32 else copy.deepcopy(model).float()
    was_training = reference.training
    reference.eval()
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    device = next(reference.parameters()).device
    expected, got = reference(ids.to(device)).logits.cpu(), stock(ids).logits
    reference.train(was_training)
    error = (expected - got).abs().max().item() / max(expected.abs().max().item(), 1e-30)
    if not error <= atol:
        raise _refuse(
            f"the DeepSeek-V3 checkpoint's logits differ from the patched model's (max relative error {error:.2e} > "
            f"{atol}): this family's blocks differ from DeepSeek-V3's in a way the export does not map (e.g. norm or "
            "embedding scaling)."
        )
