"""hf-attn-zoo: attention and Mixture-of-Experts surgery on pretrained Hugging Face Transformers models.

>>> import hf_attn_zoo
>>> model = hf_attn_zoo.patch(model, "moh", router="onorm")
>>> model.save_pretrained("out"); model = hf_attn_zoo.from_pretrained("out")
"""

from __future__ import annotations

from . import analysis, assets, decoding, moe
from . import patches as _patches  # noqa: F401  (registers every method)
from .decoding.registry import DECODING_METHODS, decoding_info
from .errors import ZooError
from .attention_functions import register_attention_function
from .loading import from_pretrained
from .moe_losses import install_router_losses
from .patching import applied_patches, aux_loss, new_module_names, new_parameters, patch, patch_plan, unpatch
from .planning import plan
from .registry import PATCHES, MethodInfo, method_info, register_patch
from .sharing.model_card import render_model_card, write_model_card
from .sharing.push import push_to_hub
from .upcycling import Expert, upcycle
from .version import __version__ as __version__

__all__ = [
    "Expert",
    "analysis",
    "assets",
    "decoding",
    "moe",
    "ZooError",
    "applied_patches",
    "aux_loss",
    "from_pretrained",
    "install_router_losses",
    "methods",
    "new_module_names",
    "new_parameters",
    "patch",
    "patch_plan",
    "plan",
    "push_to_hub",
    "register_attention_function",
    "register_patch",
    "render_model_card",
    "unpatch",
    "upcycle",
    "write_model_card",
]


def methods() -> list[MethodInfo]:
    """Every registered method: name, one-line summary, options (name, type, default, help, bounds) and kind: the
    patches (`kind="patch"`, applied with `patch`), then the decoding methods (`kind="decoding"`, e.g. SCMoE)."""
    return [method_info(PATCHES[name]) for name in sorted(PATCHES)] + [
        decoding_info(DECODING_METHODS[name]) for name in sorted(DECODING_METHODS)
    ]
