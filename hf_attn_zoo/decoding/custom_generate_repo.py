"""SCMoE as a `custom_generate` repository, in the layout transformers' hub convention expects.

transformers (`GenerationMixin.load_custom_generate`) looks for `custom_generate/generate.py` in the folder or hub repo
given as `generate(..., custom_generate=<repo or folder>, trust_remote_code=True)`, checks
`custom_generate/requirements.txt` against the installed packages, and calls the file's `generate(model, ...)`. The
hub lists such repositories by the `custom_generate` tag in their README.md metadata.

`write_custom_generate(dir)` writes that folder (the `generate.py` this package ships, a `requirements.txt` asking
for hf-attn-zoo) and, in a folder without a README.md, a card tagged `custom_generate`; `push_to_hub` adds the same
files to the repository of a MoE model SCMoE can decode, so `generate(custom_generate=<that repo>)` works from the
model's own repository.

This is the one place hf-attn-zoo meets remote code, and only as transformers' opt-in convention for *decoding*: the
user passes `trust_remote_code=True` to `generate` (or to `from_pretrained`, which then makes SCMoE the model's
`generate`), and the file run is a thin call into `hf_attn_zoo.decoding.scmoe_decode`. The model itself never needs
remote code: `hf_attn_zoo.from_pretrained` loads it without.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import OutputExistsError, ZooError
from ..outputs import OVERWRITE_HINT, atomic_output
from ..version import __version__
from .scmoe.contrast import check_model
from .scmoe.decode import CUSTOM_GENERATE_DIR

__all__ = ["custom_generate_files", "scmoe_refusal", "write_custom_generate"]

FOLDER = "custom_generate"
_README = "README.md"

_STANDALONE_CARD = """---
library_name: transformers
tags:
- custom_generate
- hf-attn-zoo
- scmoe
---

# SCMoE self-contrast decoding (`custom_generate`)

SCMoE, from "Unchosen Experts Can Contribute Too: Unleashing MoE Models' Power by Self-Contrast"
([arXiv:2405.14507](https://arxiv.org/abs/2405.14507)): the next token maximises
`(1 + beta) log p_strong - beta log p_weak` over the alpha-plausible tokens, where the weak distribution is another
routing of the same MoE model (by default each token's rank-2 expert), computed in the same batched forward.

## Base model

Any Mixture-of-Experts causal LM whose family hf-attn-zoo knows (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, GPT-OSS,
...; `hf_attn_zoo.decoding.check_model(model)` says whether it can).

## Model compatibility

MoE decoders only (a dense model is refused with the reason). Greedy or sampling; no beam search.

## Additional arguments

`scmoe=hf_attn_zoo.decoding.SCMoEConfig(...)`, or `alpha` (plausibility cutoff, 0.1), `beta` (contrast strength,
0.5; a list gives one per batch row), `weak` (`"rank:2"`, `"top1"`, `"top_m:2"`), `ban_eos`.

## Output type changes

None: the same outputs as `generate` (with `return_dict_in_generate=True`, `scores` are the contrastive scores).

## Example usage

```python
import hf_attn_zoo
model = hf_attn_zoo.from_pretrained("MOE_MODEL")
out = model.generate(**inputs, custom_generate="THIS_REPO", trust_remote_code=True, beta=0.5, max_new_tokens=64)
```

`requirements.txt` asks for `hf-attn-zoo`; `generate.py` calls `hf_attn_zoo.decoding.scmoe_decode`.
"""


def custom_generate_files() -> dict[str, bytes]:
    """The files of the `custom_generate/` folder, by their path in a repository."""
    source = Path(CUSTOM_GENERATE_DIR) / FOLDER / "generate.py"
    return {
        f"{FOLDER}/generate.py": source.read_bytes(),
        f"{FOLDER}/requirements.txt": f"hf-attn-zoo>={__version__}\n".encode(),
    }


def scmoe_refusal(model: torch.nn.Module) -> str | None:
    """Why SCMoE cannot decode `model` (e.g. a dense model), or `None` when it can; works on the meta device."""
    try:
        check_model(model)
    except ZooError as error:
        return str(error)
    return None


def write_custom_generate(directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write SCMoE's `custom_generate/` folder into `directory` (a new repository folder, or a saved MoE model).

    Writes `custom_generate/generate.py` and `custom_generate/requirements.txt`; a folder without a README.md also
    gets a card tagged `custom_generate` (a standalone decoding repository); an hf-attn-zoo model card there is
    rewritten to describe the decoding too; somebody else's README.md is left alone.

    Args:
        directory (`str | os.PathLike`): the folder (created when missing).
        overwrite (`bool`, *optional*, defaults to `False`): replace a `custom_generate/` folder that differs.

    Returns:
        `Path`: `directory / "custom_generate"`.

    Example:
        >>> hf_attn_zoo.decoding.write_custom_generate("scmoe-decoding")
        >>> model.generate(ids, custom_generate="scmoe-decoding", trust_remote_code=True, beta=0.5)
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputExistsError(f"{directory} is a file; give the folder the custom_generate/ folder goes into.")
    files = custom_generate_files()
    target = directory / FOLDER
    current = {f"{FOLDER}/{p.name}": p.read_bytes() for p in target.iterdir() if p.is_file()} if target.is_dir() else {}
    if current != files:
        if target.exists() and not overwrite:
            raise OutputExistsError(f"{target} already holds other files; refusing to replace them: {OVERWRITE_HINT}.")
        with atomic_output(target, overwrite=True, what="custom_generate folder") as partial:
            for name, data in files.items():
                (partial / Path(name).name).write_bytes(data)
    readme = directory / _README
    if not readme.exists():
        with atomic_output(readme, is_file=True, what="README.md") as partial:
            partial.write_text(_STANDALONE_CARD, encoding="utf-8")
    elif (directory / "config.json").is_file():
        from ..sharing.model_card import is_own_card, write_card_or_warn

        if is_own_card(readme):
            write_card_or_warn(directory)
    return target
