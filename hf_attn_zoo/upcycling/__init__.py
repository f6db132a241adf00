"""Upcycle dense checkpoints into Mixture-of-Experts models: sparse upcycling, BTX and BAM, and mergekit-moe configs."""

from .build import UPCYCLE_MODES, save_upcycled, upcycle
from .mergekit import mergekit_upcycle_kwargs, upcycle_from_mergekit
from .sources import Expert
from .targets import seed_families

__all__ = [
    "Expert",
    "UPCYCLE_MODES",
    "mergekit_upcycle_kwargs",
    "save_upcycled",
    "seed_families",
    "upcycle",
    "upcycle_from_mergekit",
]
