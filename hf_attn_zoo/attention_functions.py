"""Static-pattern methods as stand-alone transformers attention implementations (no patching)."""

from __future__ import annotations

import functools

from .errors import InvalidOptionError
from .kernels.pattern_handler import pattern_attention_handler
from .kernels.sparse_attention import PaddingTracker
from .registry import get_patch

__all__ = ["register_attention_function"]


def register_attention_function(method: str, name: str | None = None, **options) -> str:
    """Register a static-pattern method as a transformers attention implementation; returns its name.

    The attention function goes into `AttentionInterface` and transformers' `sdpa_mask` into
    `AttentionMaskInterface` under the same name (without a mask function transformers would pass no mask, and
    padding would be ignored). Every layer then uses the pattern, through the model's own KV cache:

        >>> name = hf_attn_zoo.register_attention_function("sliding_window", window=512, sinks=4)
        >>> model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=name)  # or set_attn_implementation

    `hf_attn_zoo.patch` is the richer route: per-layer selection, option checks against the model, the bounded KV
    cache, records in the config for save/reload. The default name is `zoo_<method>`.
    """
    from transformers import AttentionInterface, AttentionMaskInterface, PretrainedConfig
    from transformers.masking_utils import sdpa_mask

    impl = get_patch(method)
    if not hasattr(impl, "pattern"):
        raise InvalidOptionError(
            f"{method} is not a static attention pattern, so it has no stand-alone attention function; apply it with "
            "hf_attn_zoo.patch(model, ...)."
        )
    config = impl.configure(options, None, PretrainedConfig())
    name = name or f"zoo_{method}"
    handler = functools.partial(
        pattern_attention_handler,
        pattern=impl.pattern(config),
        tracker=PaddingTracker(),
        backend=getattr(config, "backend", "auto"),
    )
    AttentionInterface.register(name, lambda module, *args, **kwargs: handler(None, module, *args, **kwargs))
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
