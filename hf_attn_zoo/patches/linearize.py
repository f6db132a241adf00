"""Linearizing a pretrained softmax model: linear attention with a chosen feature map, optionally hybrid with an exact
softmax window over the most recent tokens (LoLCATs, arXiv:2410.10254), on the layers you choose.

Each patched layer keeps its q/k/v/o projections and computes, for query `i` (`d = i - j`, `w_h = sigmoid(gamma_h)`):

    out_i = (w_h sum_{d < W} exp(s_ij - m_i) v_j + sum_{d >= W} phi(q_i) . phi(k_j) v_j)
          / (w_h sum_{d < W} exp(s_ij - m_i)     + sum_{d >= W} psi(q_i) . psi(k_j))

`s_ij` is the scaled score `q_i . k_j`, capped as the family's attention does under a logit softcap (Gemma 2; the linear
terms have no logits to cap). `phi` is a feature map of `hf_attn_zoo.kernels.feature_maps` (`nala`, `hedgehog`, `elu`,
`relu`, or one registered there) applied after a learned per-head projection `x -> x P_h` (`d -> feature_dim`, identity
at patch time; q and k each have their own, keys per KV head). Where RoPE goes (`rope`): `features` (default, for every
map) maps the vectors *before* RoPE (the rotation is undone with the family's own `apply_rotary_pos_emb` and `-sin`),
rotates each feature block with the query's or key's RoPE for the numerator, and keeps the un-rotated features `psi` for
the normaliser (NaLaFormer): scores then depend on relative positions only, as softmax's do, and the normaliser stays
positive. `inputs` maps the vectors as the model rotated them and uses them for both (LoLCATs): the scores then depend
on absolute positions (a left-padded row shifts them). `W = 0` is pure linear attention. On a layer with its own sliding
window (Mistral, Gemma's local layers) the softmax window is at most that window and the linear part covers the rest of
it: a local layer stays local.

Prefill and training run the chunked form (`hf_attn_zoo.kernels.linear_attention`, linear in the length; its linear
part on flash-linear-attention's Triton kernels for CUDA tensors when that is installed); decoding keeps the last
`W - 1` keys for the window and a fixed-size state for everything older (`LinearStateLayer`), so the memory stops
growing with the context.

Two-stage linearizing (LoLCATs): `attention_transfer(model)` (the `linear_attention_transfer` recipe callback) makes
every patched layer also run its original softmax attention, pass *that* output on, and add `weight * MSE(hybrid,
softmax)` as an auxiliary loss: with the model frozen and `what: new`, only the feature projections and window
weights learn to reproduce each layer's attention. Stage 2 trains LoRA on q/k/v/o with the LM loss.

Not training-free. Neutral setting: a window as long as the model's position range (every key in the exact softmax).
"""

from __future__ import annotations

import functools
import math
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn
from transformers import PretrainedConfig, TrainerCallback

from ..errors import InvalidOptionError, UnsupportedArchitectureError
from ..families.rope import capture_position_embeddings, pre_rope_refusal, rotary_function
from ..families.spec import FamilySpec
from ..kernels.feature_maps import FEATURE_MAPS, FeatureMap
from ..kernels.kv_cache import current_kv_layer, use_kv_layer
from ..kernels.linear_attention import LinearFeatures, fla_available, hybrid_attention
from ..kernels.linear_cache import LinearStateLayer
from ..kernels.pattern_handler import max_positions, model_window, unsupported_attention_reason
from ..kernels.register import install_handler, remove_handler
from ..kernels.sparse_attention import PaddingTracker
from ..options import POSITIONS
from ..registry import Capabilities, Patch, PatchConfig, PatchHandle, register_patch, take_module_losses
from ..tuning.callback_hooks import register_callback

__all__ = [
    "LinearAttentionTransfer",
    "LinearizeConfig",
    "LinearizePatch",
    "LinearMaps",
    "attention_transfer",
    "linear_attention_layers",
]

_ROPE_ATTR = "_zoo_linear_rope"


@dataclass
class LinearizeConfig(PatchConfig):
    feature_map: str = field(
        default="hedgehog",
        metadata={
            "help": "feature map: nala (NaLaFormer), hedgehog (LoLCATs), elu, relu, or one registered with "
            "hf_attn_zoo.kernels.feature_maps.register_feature_map."
        },
    )
    window: int = field(
        default=64,
        metadata={
            "help": "exact softmax window over the most recent keys, the query included (LoLCATs: 64); 0 = pure "
            "linear attention; the model's position range = the original attention.",
            "ge": 0,
            "le": POSITIONS,
        },
    )
    feature_dim: int | None = field(
        default=None,
        metadata={"help": "width of the learned per-head projection before the map (default: the head dim).", "ge": 1},
    )
    learned: bool = field(
        default=True,
        metadata={"help": "learn a per-head projection before the map (identity at patch time); False = the raw map."},
    )
    rope: Literal["features", "inputs"] = field(
        default="features",
        metadata={
            "help": "features: map the un-rotated q/k, rotate the numerator's features, normalise with the "
            "un-rotated ones (NaLaFormer; relative positions only); inputs: map q/k as the model rotated them "
            "(LoLCATs; absolute positions)."
        },
    )
    window_init: float = field(
        default=0.1,
        metadata={"help": "initial softmax-window weight sigmoid(gamma) per head (LoLCATs: 0.1).", "gt": 0, "lt": 1},
    )
    chunk: int = field(default=64, metadata={"help": "query block of the chunked prefill.", "ge": 1})
    backend: Literal["auto", "torch", "fla"] = field(
        default="auto",
        metadata={
            "help": "linear part in PyTorch (torch) or on flash-linear-attention's Triton kernels (fla, GPU); auto: "
            "fla for CUDA tensors when it is installed."
        },
    )


class LinearMaps(nn.Module):
    """One layer's learned parts: the q and k projections before the feature map (`[H, d, f]`, `[KV, d, f]`) and the
    per-head softmax-window logit `gamma` `[H]`. Also carries the attention-transfer switch and its last loss."""

    def __init__(
        self,
        feature_map: FeatureMap,
        heads: int,
        kv_heads: int,
        head_dim: int,
        config: LinearizeConfig,
        *,
        device: torch.device | str | None,
        dtype: torch.dtype,
    ):
        super().__init__()
        self.feature_map = feature_map
        self.feature_dim = config.feature_dim or head_dim
        meta = torch.device(device or "cpu").type == "meta"
        if config.learned:
            eye = torch.eye(head_dim, self.feature_dim, device=device, dtype=dtype)
            self.q_map = nn.Parameter(eye.expand(heads, -1, -1).clone())
            self.k_map = nn.Parameter(eye.expand(kv_heads, -1, -1).clone())
        if config.window > 0:
            logit = math.log(config.window_init / (1 - config.window_init))
            self.window_logit = nn.Parameter(torch.full((heads,), logit, device=device, dtype=dtype))
        if meta:  # a meta-device model: the checkpoint fills the values
            for p in self.parameters():
                p.data = torch.empty_like(p, device="meta")
        self.transfer_weight: float | None = None
        self.last_aux_loss: torch.Tensor | None = None
        self.patch_tag = ""  # which patch call made it (a string survives PEFT's modules_to_save deep copies)

    def extra_repr(self) -> str:
        return f"feature_map={self.feature_map.name}, feature_dim={self.feature_dim}"

    def project(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        """`x` `[B, n, L, d]` through the per-head projection (if learned) and the map: `[B, n, L, blocks * f]`."""
        weight = getattr(self, "q_map" if is_query else "k_map", None)
        if weight is not None:
            x = torch.einsum("bnld,ndf->bnlf", x.float(), weight.float())
        return self.feature_map(x, is_query)

    def record_transfer(self, out: torch.Tensor, teacher: torch.Tensor, real: torch.Tensor | None) -> None:
        """Keep the attention-transfer loss of this call: the MSE of `out` to the softmax output `teacher` (both
        `[B, Q, H, D]`) over the real query rows (`real` `[B, Q]`). A method, so that it sets the loss on this module
        even when PEFT wraps it (`modules_to_save`)."""
        error = (out.float() - teacher.float()).pow(2).mean(-1).mean(-1)  # [B, Q]
        rows = real.float() if real is not None else torch.ones_like(error)
        self.last_aux_loss = (error * rows).sum() / rows.sum().clamp_min(1)

    @property
    def window_weight(self) -> torch.Tensor | None:
        logit = getattr(self, "window_logit", None)
        return None if logit is None else torch.sigmoid(logit.float())


def _rotate_blocks(x: torch.Tensor, blocks: int, rope: Callable, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Each `f`-sized block of features `x` `[B, n, L, blocks * f]` rotated with the family's RoPE."""
    batch, heads, length, _ = x.shape
    split = x.unflatten(-1, (blocks, -1)).permute(0, 1, 3, 2, 4).flatten(1, 2)  # [B, n * blocks, L, f]
    rotated, _ = rope(split, split[:, :1], cos, sin)
    return rotated.unflatten(1, (heads, blocks)).permute(0, 1, 3, 2, 4).flatten(-2)


def _features(
    maps: LinearMaps, query: torch.Tensor, keys: torch.Tensor, module: nn.Module, rope: Callable | None
) -> LinearFeatures:
    """Numerator and normaliser features of `query` and `keys` (the keys of this call, rotated as the model did)."""
    if rope is None:  # map the vectors as they are (rope="inputs", or a layer without RoPE)
        fq, fk = maps.project(query, True), maps.project(keys, False)
        return LinearFeatures(fq, fk, fq, fk)
    cos, sin = module.__dict__.pop(_ROPE_ATTR)
    q_pre, k_pre = rope(query, keys, cos, -sin)  # the family's rotation by -angle undoes it
    fq, fk = maps.project(q_pre, True), maps.project(k_pre, False)
    blocks = maps.feature_map.blocks
    return LinearFeatures(
        _rotate_blocks(fq, blocks, rope, cos, sin), _rotate_blocks(fk, blocks, rope, cos, sin), fq, fk
    )


def _linear_handler(
    base,
    module,
    query,
    key,
    value,
    attention_mask,
    *,
    tracker: PaddingTracker,
    window: int,
    span: int | None,
    rope: Callable | None,
    chunk: int,
    backend: str,
    **kwargs,
):
    """Attention handler of a linearized layer (see `hf_attn_zoo.kernels.register`)."""
    maps: LinearMaps = module.linear_maps
    layer = current_kv_layer(module)
    cache = layer if isinstance(layer, LinearStateLayer) else None
    batch, _, q_len, _ = query.shape
    total = cache.seen if cache is not None else key.shape[2]
    padding = tracker.padding(attention_mask, batch, total)
    if cache is None and key.shape[2] != q_len and rope is not None:
        raise UnsupportedArchitectureError(
            "linear attention with rope='features' decodes with its own cache (the features of past keys come from "
            "their un-rotated vectors); use transformers' DynamicCache (generate's default), not a static one."
        )
    new_keys = key[:, :, -q_len:] if cache is not None else key
    features = _features(maps, query, new_keys, module, rope)
    if cache is not None:
        fk, fk_norm = cache.add_features(features.k, features.k_norm)
        features = features._replace(k=fk, k_norm=fk_norm)
    real = padding[:, total - key.shape[2] : total] if padding is not None else None
    out = hybrid_attention(
        query,
        key,
        value,
        features,
        window=window,
        window_weight=maps.window_weight,
        scaling=kwargs.get("scaling") or query.shape[-1] ** -0.5,
        span=span,
        key_real=real,
        state=cache.state if cache is not None else None,
        chunk=chunk,
        backend="fla" if backend == "fla" or (backend == "auto" and query.is_cuda and fla_available()) else "torch",
        softcap=kwargs.get("softcap"),
    )
    if cache is not None:
        cache.fold(real)
    if maps.transfer_weight is not None:  # attention transfer: learn to match the softmax output, pass that on
        teacher, _ = base(module, query, key, value, attention_mask, **kwargs)
        maps.record_transfer(out, teacher, padding[:, -q_len:] if padding is not None else None)
        return teacher, None
    return out, None


def linear_attention_layers(model: nn.Module) -> dict[str, LinearMaps]:
    """The linearized layers' learned parts (`LinearMaps`), by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LinearMaps)}


@contextmanager
def attention_transfer(model: nn.Module, weight: float = 1000.0) -> Iterator[None]:
    """Within the block, every linearized layer passes its softmax output on and adds `weight * MSE(linear, softmax)`
    to the auxiliary loss (LoLCATs' stage 1: their weight is 1000)."""
    layers = list(linear_attention_layers(model).values())
    if not layers:
        raise InvalidOptionError("attention transfer: the model has no linearized layer (patch it with linearize)")
    for maps in layers:
        maps.transfer_weight = weight
    try:
        yield
    finally:
        for maps in layers:
            maps.transfer_weight, maps.last_aux_loss = None, None


class LinearAttentionTransfer(TrainerCallback):
    """Stage 1 of linearizing as a recipe callback: attention transfer for the whole run (see `attention_transfer`)."""

    def __init__(self, model: nn.Module, weight: float = 1000.0):
        if weight <= 0:
            raise InvalidOptionError(f"linear_attention_transfer: weight={weight} must be > 0")
        self.model, self.weight = model, weight
        self._context: Any = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._context = attention_transfer(self.model, self.weight)
        self._context.__enter__()

    def on_train_end(self, args, state, control, **kwargs):
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None


@register_callback("linear_attention_transfer")
def _transfer_callback(model: nn.Module, recipe: Any, weight: float = 1000.0) -> TrainerCallback:
    return LinearAttentionTransfer(model, weight)


@register_patch
class LinearizePatch(Patch):
    name = "linearize"
    summary = "Linear attention (nala / hedgehog / elu / relu maps) + optional softmax window (LoLCATs), state cache."
    config_class: ClassVar[type[PatchConfig]] = LinearizeConfig
    capabilities = Capabilities(training_free=False, new_params=True, kv_cache=True, generate=True, static_cache=False)
    targets = ("attention_fn",)

    def check(self, family: FamilySpec, model_config: PretrainedConfig) -> str | None:
        return pre_rope_refusal(family, "the features are built on") or unsupported_attention_reason(family)

    def validate(  # type: ignore[override]  # each patch receives its own config class
        self, config: LinearizeConfig, family: FamilySpec, model_config: PretrainedConfig
    ) -> LinearizeConfig:
        if config.feature_map not in FEATURE_MAPS:
            raise InvalidOptionError(
                f"{self.name}: unknown feature_map {config.feature_map!r}; choose one of {sorted(FEATURE_MAPS)} "
                "(or register one with hf_attn_zoo.kernels.feature_maps.register_feature_map).",
                option="feature_map",
            )
        if config.backend == "fla" and not fla_available():
            raise InvalidOptionError(
                f"{self.name}: backend='fla' needs flash-linear-attention (pip install flash-linear-attention, GPU); "
                "or use backend='auto'.",
                option="backend",
            )
        layout = family.head_layout(model_config)
        if config.feature_dim is not None and not config.learned and config.feature_dim != layout.head_dim:
            raise InvalidOptionError(
                f"{self.name}: feature_dim={config.feature_dim} needs learned=True (the projection makes the width); "
                f"without it the features keep the head dim ({layout.head_dim}).",
                option="feature_dim",
            )
        if config.rope == "features":
            if (config.feature_dim or layout.head_dim) != layout.head_dim:
                raise InvalidOptionError(
                    f"{self.name}: rope='features' rotates each feature block with the model's RoPE, so feature_dim "
                    f"must equal the head dim ({layout.head_dim}); got {config.feature_dim}. Use rope='inputs'.",
                    option="feature_dim",
                )
        return replace(config, feature_dim=config.feature_dim or layout.head_dim)

    def apply(  # type: ignore[override]
        self, model, config: LinearizeConfig, family: FamilySpec, layers: list[int], handle: PatchHandle
    ) -> None:
        layout = family.head_layout(model.config)
        windows = [model_window(model.config, index) or max_positions(model.config) for index in layers]
        if config.window < max_positions(model.config) and all(w <= config.window for w in windows):
            raise InvalidOptionError(
                f"{self.name}: no selected layer has a linear part: their own sliding windows ({sorted(set(windows))}) "
                f"are no longer than window={config.window}, so every key stays in the exact softmax. Use a smaller "
                "window, or select global layers.",
                option="window",
            )
        tracker = PaddingTracker()
        for hook in tracker.install(model):
            handle.on_revert(hook.remove)
        tag = uuid.uuid4().hex
        feature_map = FEATURE_MAPS[config.feature_map]
        for index in layers:
            attention = family.attention_module(model, index)
            rope = None
            if config.rope == "features" and family.uses_rope(model.config, index):
                rope = rotary_function(attention, f"{self.name} with rope='features' (use rope='inputs')")
                hook = capture_position_embeddings(attention, _ROPE_ATTR, self.name)
                handle.on_revert(hook.remove)
            weight = next(attention.parameters())
            maps = LinearMaps(
                feature_map,
                layout.num_heads,
                layout.num_kv_heads,
                layout.head_dim,
                config,
                device=weight.device,
                dtype=weight.dtype,
            )
            maps.train(attention.training)
            maps.patch_tag = tag
            attention.linear_maps = maps
            handle.on_revert(functools.partial(delattr, attention, "linear_maps"))
            handle.modules.append(maps)
            own = model_window(model.config, index)
            window = config.window if own is None else min(config.window, own)
            recent = max(window - 1, 0) if own is None else own - 1
            hook = use_kv_layer(attention, functools.partial(LinearStateLayer, recent, own is None))
            handle.on_revert(hook.remove)
            handler = functools.partial(
                _linear_handler,
                tracker=tracker,
                window=window,
                span=own,
                rope=rope,
                chunk=config.chunk,
                backend=config.backend,
            )
            install_handler(model, attention, handler)
            handle.on_revert(functools.partial(remove_handler, model, attention))

        def transfer_loss(model: nn.Module) -> torch.Tensor | None:
            taken = take_module_losses(model, LinearMaps, tag)
            losses = [m.transfer_weight * loss for m, loss in taken if m.transfer_weight is not None]
            return torch.stack(losses).mean() if losses else None

        handle.aux_loss_fn = transfer_loss

    def neutral_config(self, family: FamilySpec, model_config: PretrainedConfig) -> PatchConfig:
        return self.config_class.from_options(self.name, {"window": max_positions(model_config)})
