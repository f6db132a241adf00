"""One exception class per kind of bad input.

Every error the library raises on purpose is a `ZooError` (a `ValueError`), and its message names what is wrong
and how to fix it. The model is never modified when one of them is raised by `patch()`.
"""

from __future__ import annotations

__all__ = [
    "ZooError",
    "UnknownMethodError",
    "InvalidOptionError",
    "UnsupportedArchitectureError",
    "PatchConflictError",
    "CheckpointMismatchError",
    "MissingAssetError",
    "RecipeError",
    "IncompatibleModelsError",
    "UnknownModelError",
    "PlanError",
    "OutputExistsError",
    "InvalidInputError",
    "UnsupportedCheckpointError",
    "CorruptCheckpointError",
]


class ZooError(ValueError):
    """Base class of every error raised by hf_attn_zoo on bad input."""


class UnknownMethodError(ZooError):
    """A patch name that is not registered (typo, or a checkpoint made by a newer version)."""


class InvalidOptionError(ZooError):
    """An unknown option, an option of the wrong type, or a value out of range; `option` names it where it is one."""

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


class UnsupportedArchitectureError(ZooError):
    """A `model_type` without a family adapter, or a family the method cannot handle."""


class PatchConflictError(ZooError):
    """Patches that cannot be combined (e.g. the same layer patched twice by a method that forbids it)."""


class CheckpointMismatchError(ZooError):
    """Saved weights that do not match the patches recorded in the checkpoint's config."""


class MissingAssetError(ZooError):
    """An offline asset (model, corpus, benchmark data) whose package is not installed."""


class RecipeError(ZooError):
    """A tuning recipe that does not parse or validate; the message names the file, the key and the line."""


class IncompatibleModelsError(ZooError):
    """Models that cannot be merged (upcycling): different architecture, shapes, layer count or tokenizer."""


class UnknownModelError(ZooError):
    """A model name that is not a shipped config, a local folder with a config.json, or a reachable hub id."""


class PlanError(ZooError):
    """A plan that cannot run: more GPUs than the sharding can use, or memory that does not fit (`hf-attn-zoo plan`)."""


class OutputExistsError(ZooError):
    """An output folder or file that already holds something else (another model, run or report); nothing is
    overwritten unless asked (`--overwrite` on the command line, `overwrite=True` in Python)."""


class InvalidInputError(InvalidOptionError):
    """Inputs a patched model cannot take: no tokens, or more positions than `max_position_embeddings`.

    A subclass of `InvalidOptionError`, which the sparse-attention kernels raise for the same over-long inputs."""


class UnsupportedCheckpointError(CheckpointMismatchError):
    """A checkpoint whose patch records this version cannot apply (written by a newer hf-attn-zoo)."""


class CorruptCheckpointError(CheckpointMismatchError):
    """A weights file that cannot be read: truncated, or not a safetensors file at all."""
