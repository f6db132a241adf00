"""Architecture adapters (data): see `spec.py` and the `<family>.yaml` files."""

from .spec import FamilySpec, HeadLayout, family_specs, resolve_family, supported_model_types

__all__ = ["FamilySpec", "HeadLayout", "family_specs", "resolve_family", "supported_model_types"]
