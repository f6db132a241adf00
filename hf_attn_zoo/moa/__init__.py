"""MoA (arXiv:2406.14909) tooling: plans (`plan`), the attention-influence profiler (`profile`), the MILP search
(`search`), the per-head KV cache (`cache`) and `hf-attn-zoo moa` (`cli`). The patch itself is `patches/moa.py`."""

from ..kernels.kv_cache import kv_cache_bytes
from .cache import MoACacheLayer
from .plan import MoAPlan, load_plan, uniform_plan

__all__ = ["MoACacheLayer", "MoAPlan", "kv_cache_bytes", "load_plan", "uniform_plan"]
