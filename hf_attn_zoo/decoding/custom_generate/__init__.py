"""The `custom_generate` folder transformers loads from `hf_attn_zoo.decoding.CUSTOM_GENERATE_DIR` (a package only
so that wheels ship `generate.py`)."""
