"""NaLaFormer: norm-aware linear attention (Meng et al., arXiv:2506.21137, ICML 2026), made causal for decoders.

Per head, the feature map (`hf_attn_zoo.kernels.feature_maps.nala`, the official `NormAwareLinearAttn`): keys are
cubed, queries and keys split by sign into ReLU parts `phi(x) = [x+; x-]` (only same-sign coordinates interact), and
a query is divided by its norm and raised element-wise to the norm-dependent power `p(||q||) = 3 (0.5 + tanh ||q||)`:
a query's norm, which linear attention usually discards, sets how sharp its attention is. RoPE is applied to the
numerator's features and the normaliser uses the un-rotated ones, so it stays positive. Causal form (the official
code is non-causal, for vision): with `S_t = sum_{j<=t} R phi(k_j) v_j^T` and `z_t = sum_{j<=t} phi(k_j)`,

    o_t = (R phi(q_t))^T S_t / (phi(q_t)^T z_t)

computed chunk-parallel for prefill and training and as a recurrent state when decoding (the memory does not grow
with the context). This is the `linearize` patch with the `nala` map; by default pure linear attention (`window=0`).
A softmax window over the most recent tokens (`window=64`) makes it LoLCATs' hybrid. The vision-only parts (LePE
convolution, output gate) are not part of a decoder retrofit. Not training-free: see `linearize` for the two-stage
recipe (attention transfer, then LoRA). Neutral setting: a window over the model's whole position range.
Official code: https://github.com/ZacharyMeng/NaLaFormer
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PretrainedConfig

from ..errors import InvalidOptionError
from ..families.spec import FamilySpec
from ..options import POSITIONS
from ..registry import register_patch
from .linearize import LinearizeConfig, LinearizePatch

__all__ = ["NalaformerConfig", "NalaformerPatch"]


@dataclass
class NalaformerConfig(LinearizeConfig):
    feature_map: str = field(default="nala", metadata={"help": "always nala (use the linearize patch for others)."})
    window: int = field(
        default=0,
        metadata={
            "help": "exact softmax window over the most recent keys, the query included: 0 = NaLaFormer alone, "
            "64 = LoLCATs-style hybrid; the model's position range = the original attention.",
            "ge": 0,
            "le": POSITIONS,
        },
    )


@register_patch
class NalaformerPatch(LinearizePatch):
    name = "nalaformer"
    summary = "NaLaFormer norm-aware linear attention, causal: chunked prefill, recurrent state cache."
    config_class = NalaformerConfig

    def validate(  # type: ignore[override]  # each patch receives its own config class
        self, config: LinearizeConfig, family: FamilySpec, model_config: PretrainedConfig
    ) -> LinearizeConfig:
        if config.feature_map != "nala":
            raise InvalidOptionError(
                f"nalaformer: feature_map is always nala, got {config.feature_map!r}; use the linearize patch "
                "for other maps.",
                option="feature_map",
            )
        return super().validate(config, family, model_config)
