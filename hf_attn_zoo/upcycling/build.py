"""`upcycle`: build a Mixture-of-Experts model from dense checkpoints of one architecture.

Three modes (see docs/upcycling.md):

- `sparse` (Komatsuzaki et al., arXiv:2212.05055): every FFN expert is a copy of the seed's MLP (optional noise to
  break symmetry); everything else is the seed's.
- `btx` (Branch-Train-MiX, arXiv:2403.07816): FFN expert j = the MLP of dense model j (the seed and its
  specialised descendants); attention, norms and embeddings averaged over the models.
- `bam` (BAM, arXiv:2408.08274, Sec. 3): as `btx` for the FFN, and **attention experts**: expert j's full Q/K/V/O
  (or per-expert Q/O with averaged shared K/V, `bam_options={"kv": "shared"}`) mixed by a soft router
  (`MoA(x) = sum_j softmax(W x)_j MHA_j(x)`), through the `bam` patch; norms and embeddings averaged.

The FFN MoE is a stock transformers architecture (see `targets.py`), so `sparse`/`btx` results load with plain
`AutoModelForCausalLM`; `bam` results record the `bam` patch and load with `hf_attn_zoo.from_pretrained`.
Weights are read one tensor at a time from the sources' safetensors files, so peak memory is about the output model.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.initialization import no_init_weights

from ..errors import InvalidOptionError
from ..families.spec import resolve_family
from ..outputs import atomic_output, check_output
from ..registry import get_patch
from .router_init import RouterInit, router_weights
from .sources import Expert, Source, check_compatible, open_source
from .targets import moe_config

__all__ = ["UPCYCLE_MODES", "save_upcycled", "upcycle"]

logger = logging.getLogger(__name__)

Mode = Literal["sparse", "btx", "bam"]
UPCYCLE_MODES = ("sparse", "btx", "bam")
_DEFAULT_TOP_K = {"sparse": 2, "btx": 2, "bam": 1}  # BTX's top-2; BAM's experiments use top-1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RECORD_KEY = "hf_attn_zoo_upcycling"


def upcycle(
    seed: str | Path,
    experts: Sequence[str | Path | Expert] = (),
    *,
    mode: Mode = "btx",
    num_experts: int | None = None,
    top_k: int | None = None,
    layers: str | Sequence[int] = "all",
    router_init: RouterInit = "random",
    prompts: Sequence[Sequence[str]] | None = None,
    noise: float = 0.0,
    include_seed: bool = True,
    shared: Literal["average", "seed"] | None = None,
    bam_options: dict[str, Any] | None = None,
    dtype: str = "auto",
    output_dir: str | Path | None = None,
    random_seed: int = 0,
    overwrite: bool = False,
) -> PreTrainedModel:
    """Build an MoE from a dense `seed` and dense `experts` of the same architecture and shapes.

    Args:
        seed (`str | Path`): folder, hub id or `"default"` (SmolLM2-135M-Instruct). Gives the config and tokenizer.
        experts (`list`): dense models (or `Expert`s with prompts) that become FFN (and, for `bam`, attention)
            experts, after the seed when `include_seed`. Empty for `sparse`.
        mode (`str`): `sparse`, `btx` or `bam`.
        num_experts (`int`, *optional*): number of experts; for `sparse` the number of seed copies (default 4),
            otherwise it must equal the number of expert models.
        top_k (`int`, *optional*): experts per token in the FFN (default 2 for sparse/btx, 1 for bam).
        layers (`"all"` or `list[int]`): layers whose FFN (and attention, for bam) become experts; the others keep
            the averaged dense MLP.
        router_init (`str`): `random`, `hidden` (mean normalised layer input on each expert's prompts) or `embed`.
        prompts (`list[list[str]]`, *optional*): per-expert example prompts (override `Expert.prompts`).
        noise (`float`): relative std of Gaussian noise on every expert copy (sparse upcycling symmetry breaking).
        include_seed (`bool`): the seed is expert 0 (BTX/BAM, as the papers do).
        shared (`str`, *optional*): non-expert weights `average`d over all models (default for btx/bam) or taken
            from the `seed` (default for sparse; mergekit's behaviour).
        bam_options (`dict`, *optional*): options of the `bam` patch (`routing`, `top_k`, `kv`, `parallel_block`).
        dtype (`str`): `auto` (the seed's), `float32`, `bfloat16` or `float16`.
        output_dir (`str | Path`, *optional*): save the model and the seed's tokenizer there.
        random_seed (`int`): seed of the random router init and of the noise.
        overwrite (`bool`): replace an `output_dir` that already holds something (refused otherwise, before any
            work; the folder is written beside it and moved into place once complete).

    Returns:
        The MoE model (a `MixtralForCausalLM`, `Qwen2MoeForCausalLM` or `Qwen3MoeForCausalLM`; for `bam` with the
        `bam` patch applied).
    """
    if mode not in UPCYCLE_MODES:
        raise InvalidOptionError(f"mode={mode!r} is not one of {', '.join(UPCYCLE_MODES)}.")
    if noise < 0:
        raise InvalidOptionError(f"noise={noise} must be >= 0.")
    if output_dir is not None:
        check_output(output_dir, overwrite, "output_dir")
    started = time.perf_counter()
    seed_source = open_source(seed)
    specs = [e if isinstance(e, Expert) else Expert(str(e)) for e in experts]
    if mode == "sparse":
        if specs:
            raise InvalidOptionError(
                "mode='sparse' copies the seed's MLP into every expert and takes no expert "
                "models; use mode='btx' or 'bam' to merge other models."
            )
        count = 4 if num_experts is None else num_experts
        specs = [Expert(str(seed), noise_scale=noise) for _ in range(count)]
    else:
        if include_seed:
            specs = [Expert(str(seed))] + specs
        if len(specs) < 2:
            raise InvalidOptionError(
                f"mode={mode!r} needs at least two expert models (the seed counts when "
                "include_seed); to build experts from the seed alone use mode='sparse'."
            )
        if num_experts is not None and num_experts != len(specs):
            raise InvalidOptionError(
                f"num_experts={num_experts} but {len(specs)} expert models were given "
                f"({'seed + ' if include_seed else ''}experts)."
            )
        specs = [dataclasses.replace(spec, noise_scale=spec.noise_scale or noise) for spec in specs]
    n = len(specs)
    if n < 2:
        raise InvalidOptionError(f"num_experts={n}: an MoE needs at least 2 experts.")
    top_k = _DEFAULT_TOP_K[mode] if top_k is None else top_k
    if not 1 <= top_k <= n:
        raise InvalidOptionError(f"top_k={top_k} must be between 1 and the number of experts ({n}).")
    if prompts is not None:
        if len(prompts) != n:
            raise InvalidOptionError(f"prompts has {len(prompts)} lists but there are {n} experts.")
        specs = [dataclasses.replace(spec, prompts=list(texts)) for spec, texts in zip(specs, prompts)]
    shared = shared or ("seed" if mode == "sparse" else "average")
    if shared not in ("average", "seed"):
        raise InvalidOptionError(f"shared={shared!r} is not one of average, seed.")
    if bam_options and mode != "bam":
        raise InvalidOptionError(f"bam_options are only used with mode='bam' (got mode={mode!r}).")

    # one Source per distinct model; experts may repeat a model (sparse) or use the seed
    by_name: dict[str, Source] = {str(seed): seed_source}
    for spec in specs:
        if spec.source not in by_name:
            by_name[spec.source] = open_source(spec.source)
    sources = list(by_name.values())
    check_compatible(sources)
    expert_sources = [by_name[spec.source] for spec in specs]
    num_layers = seed_source.config.num_hidden_layers
    moe_layers = _layers(layers, num_layers)
    config = moe_config(seed_source.config, n, top_k, moe_layers)
    if mode == "bam":  # refuse bad attention-expert options before any weight is read
        bam = get_patch("bam")
        bam.configure({"num_experts": n, **(bam_options or {})}, resolve_family(config), config)
    torch_dtype = _dtype(dtype, seed_source)
    config.dtype = torch_dtype
    shared_sources = sources if shared == "average" else [seed_source]

    ffn_routers = router_weights(
        router_init,
        seed_source,
        [s.prompts for s in specs],
        [s.negative_prompts for s in specs],
        n,
        moe_layers,
        "ffn",
        random_seed,
    )
    attention_routers = None
    if mode == "bam":
        attention_routers = router_weights(
            router_init,
            seed_source,
            [s.prompts for s in specs],
            [s.negative_prompts for s in specs],
            n,
            moe_layers,
            "attention",
            random_seed,
        )

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval()
    family = resolve_family(model.config)
    generator = torch.Generator().manual_seed(random_seed)
    bam_kv_shared = mode == "bam" and (bam_options or {}).get("kv", "experts") == "shared"

    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, param in tqdm(params.items(), desc=f"upcycle ({mode}, {n} experts)", unit="tensor"):
            layer = _layer_of(name)
            if name.endswith(f"{family.mlp.module}.{family.mlp.router}.weight") and layer in ffn_routers:
                param.copy_(ffn_routers[layer])
            elif ".experts.gate_up_proj" in name:
                _fill_gate_up(param, expert_sources, specs, layer, generator)
            elif ".experts.down_proj" in name:
                _fill_down(param, expert_sources, specs, layer, generator)
            elif ".shared_expert" in name:
                param.zero_()  # the empty shared expert of a Qwen2-MoE target
            elif mode == "bam" and layer in moe_layers and _is_expert_attention(name, bam_kv_shared):
                param.copy_(seed_source.tensor(name))  # attention expert 0 = the seed's; the rest come below
            else:
                param.copy_(_average(shared_sources, name))
    model.tie_weights()

    if mode == "bam":
        from ..patching import patch

        options = {"num_experts": n, **(bam_options or {})}
        patch(model, "bam", layers=moe_layers, **options)
        _fill_attention_experts(model, family, expert_sources, specs, moe_layers, attention_routers, generator)

    setattr(
        model.config,
        RECORD_KEY,
        {
            "mode": mode,
            "experts": [s.source for s in specs],
            "top_k": top_k,
            "layers": moe_layers,
            "router_init": router_init,
            "shared": shared,
            "noise": noise,
        },
    )
    logger.info("upcycled %s in %.1f s", mode, time.perf_counter() - started)
    if output_dir is not None:
        save_upcycled(model, seed_source, output_dir, overwrite=overwrite)
    return model


def save_upcycled(
    model: PreTrainedModel, seed: Source | str | Path, output_dir: str | Path, overwrite: bool = False
) -> Path:
    """Save an upcycled model (safetensors, transformers v5 fused-experts layout) with the seed's tokenizer.

    A non-empty `output_dir` is refused (`OutputExistsError`) unless `overwrite`; the folder is written beside it and
    moved into place once complete."""
    from transformers import AutoTokenizer

    output_dir = Path(output_dir)
    seed_path = seed.path if isinstance(seed, Source) else open_source(seed).path
    with atomic_output(output_dir, overwrite, what="output_dir") as tmp:
        model.save_pretrained(tmp, save_original_format=False)
        try:
            AutoTokenizer.from_pretrained(seed_path).save_pretrained(tmp)
        except (OSError, ValueError):
            logger.warning("the seed %s has no tokenizer; %s is saved without one.", seed_path, output_dir)
    return output_dir


def _layers(layers: str | Sequence[int], num_layers: int) -> list[int]:
    if layers == "all":
        return list(range(num_layers))
    if isinstance(layers, str) or not layers:
        raise InvalidOptionError(f"layers={layers!r}: give 'all' or a non-empty list of layer indices.")
    out = sorted(set(int(i) for i in layers))
    bad = [i for i in out if not 0 <= i < num_layers]
    if bad:
        raise InvalidOptionError(
            f"layers {bad} are out of range: the seed has {num_layers} layers (0..{num_layers - 1})."
        )
    return out


def _dtype(name: str, seed: Source) -> torch.dtype:
    if name == "auto":
        value = getattr(seed.config, "dtype", None) or torch.float32
        return getattr(torch, value) if isinstance(value, str) else value
    if name not in _DTYPES:
        raise InvalidOptionError(f"dtype={name!r} is not one of auto, {', '.join(_DTYPES)}.")
    return _DTYPES[name]


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _average(sources: list[Source], name: str) -> torch.Tensor:
    total = sources[0].tensor(name).float()
    for source in sources[1:]:
        total += source.tensor(name).float()
    return total / len(sources)


def _noisy(weight: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    if scale == 0:
        return weight
    return weight + torch.randn(weight.shape, generator=generator) * (scale * weight.float().std())


def _mlp_tensor(source: Source, layer: int, proj: str) -> torch.Tensor:
    return source.tensor(f"model.layers.{layer}.mlp.{proj}.weight").float()


def _fill_gate_up(param, sources, specs, layer, generator) -> None:
    inter = param.shape[1] // 2
    for e, (source, spec) in enumerate(zip(sources, specs)):
        param[e, :inter] = _noisy(_mlp_tensor(source, layer, "gate_proj"), spec.noise_scale, generator)
        param[e, inter:] = _noisy(_mlp_tensor(source, layer, "up_proj"), spec.noise_scale, generator)


def _fill_down(param, sources, specs, layer, generator) -> None:
    for e, (source, spec) in enumerate(zip(sources, specs)):
        down = _noisy(_mlp_tensor(source, layer, "down_proj"), spec.noise_scale, generator)
        param[e] = down * spec.residual_scale


_ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _is_expert_attention(name: str, kv_shared: bool) -> bool:
    projections = ("q_proj", "o_proj") if kv_shared else _ATTENTION_PROJECTIONS
    return any(f".self_attn.{p}." in name for p in projections)


def _fill_attention_experts(model, family, sources, specs, layers, routers, generator) -> None:
    """Write expert j's attention projections (j >= 1) and the attention router into the `bam` patch's weights."""
    with torch.no_grad():
        for layer in layers:
            attention = family.attention_module(model, layer)
            attention.attention_router.weight.copy_(routers[layer])
            for proj in _ATTENTION_PROJECTIONS:
                module = getattr(attention, proj)
                if not hasattr(module, "experts_weight"):
                    continue  # shared K/V (kv="shared") stay averaged
                prefix = f"model.layers.{layer}.self_attn.{proj}"
                for e in range(1, len(sources)):
                    weight = _noisy(sources[e].tensor(f"{prefix}.weight").float(), specs[e].noise_scale, generator)
                    module.experts_weight[e - 1].copy_(weight)
                    if getattr(module, "experts_bias", None) is not None:
                        module.experts_bias[e - 1].copy_(sources[e].tensor(f"{prefix}.bias"))
