"""Sharing a patched model: its model card (`model_card.py`, written by `save_pretrained` through `save_hook.py`), the
files a reload needs and `push_to_hub` (`push.py`).

Kept free of imports so that `patching.py` can install the save hook without an import cycle; the public names are
exported by `hf_attn_zoo/__init__.py`.
"""
