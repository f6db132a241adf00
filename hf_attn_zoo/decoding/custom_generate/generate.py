"""SCMoE as a `custom_generate` folder:
`model.generate(..., custom_generate=CUSTOM_GENERATE_DIR, trust_remote_code=True)`.

transformers loads this file from a local folder (`<dir>/custom_generate/generate.py`, here
`hf_attn_zoo.decoding.CUSTOM_GENERATE_DIR`) or a hub repository (`hf_attn_zoo.decoding.write_custom_generate` and
`hf_attn_zoo.push_to_hub` copy it there) and calls `generate(model=..., **generate_arguments)` instead of its own
`generate`. It runs the usual `generate` with `hf_attn_zoo.decoding.scmoe_decode` as the decoding loop, so every
`generate` argument works, plus the SCMoE ones (`scmoe=SCMoEConfig(...)` or `alpha`, `beta`, `weak`, `ban_eos`).
"""

from transformers import GenerationMixin

from hf_attn_zoo.decoding.scmoe.decode import move_stop_strings, scmoe_decode


def generate(model, *args, **kwargs):
    kwargs.pop("custom_generate", None)
    # a callable `custom_generate` loses `tokenizer` inside `generate`, so stop strings become a criterion here
    move_stop_strings(kwargs)
    return GenerationMixin.generate(model, *args, custom_generate=scmoe_decode, **kwargs)
