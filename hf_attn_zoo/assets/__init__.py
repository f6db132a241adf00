"""Offline assets located inside installed packages: the default model, text corpora, benchmark data."""

from .model import DEFAULT_MODEL, cache_dir, default_model_path, load_default_model, package_dir, resolve_model

__all__ = ["DEFAULT_MODEL", "cache_dir", "default_model_path", "load_default_model", "package_dir", "resolve_model"]
