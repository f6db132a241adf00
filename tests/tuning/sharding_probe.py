"""An init hook for the sharded-training tests: records, at the first training forward, how each process holds the
parameters the patches created (and the MoE blocks'), then writes it as `probe_rank<R>.json`.

Registered on the causal LM before the Trainer wraps it, so this pre-hook runs before FSDP's own: the layers are
still sharded when it looks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

import hf_attn_zoo as zoo


def record(model: torch.nn.Module, train_dataset, out: str, names: str = "new") -> None:
    # looked up by name when the probe fires: FSDP replaces the parameter objects with sharded ones
    watched = (
        set(zoo.new_parameters(model))
        if names == "new"
        else {name for name, _ in model.named_parameters() if ".mlp." in name}
    )
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)

    def probe(module, args, kwargs):
        if not module.training or (folder / f"probe_rank{os.environ.get('RANK', '0')}.json").exists():
            return
        seen = {}
        parameters = dict(module.named_parameters())
        for name in sorted(watched):
            parameter = parameters[name]
            local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
            seen[name] = {
                "class": type(parameter.data).__name__,
                "shape": list(parameter.shape),
                "local_numel": local.numel(),
                "requires_grad": parameter.requires_grad,
            }
        (folder / f"probe_rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(seen))

    model.register_forward_pre_hook(probe, with_kwargs=True)
