"""Upcycle dense checkpoints into Mixture-of-Experts models: sparse upcycling, BTX and BAM, and mergekit-moe configs."""

from .build import UPCYCLE_MODES, save_upcycled, upcycle
from .mergekit import mergekit_upcycle_kwargs, upcycle_from_mergekit
from .sources import Expert
from .targets import SEED_MODEL_TYPES

__all__ = ["Expert", "SEED_MODEL_TYPES", "UPCYCLE_MODES", "mergekit_upcycle_kwargs", "save_upcycled", "upcycle",
           "upcycle_from_mergekit"]
