"""Dtype and device discipline on the common grid: bf16 models, meta-device models, bf16 autocast training."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

import hf_attn_zoo
from hf_attn_zoo.families import family_specs
from tests.matrix import FAMILIES, METHOD_CASES, randomize_new_parameters, supported, tiny_model


# state kept in fp32 in any model: routing_attention's EMA centroids (a 0.999 step is below bf16's resolution)
FP32_STATE = {"means"}

GRID = [pytest.param(m, f, id=f"{m}-{f}") for m in sorted(METHOD_CASES) for f in FAMILIES if supported(m, f)]

# the kernel paths the grid's 10-token inputs do not reach (they take the one-call masked paths), on a plain and a
# sliding-window family; without gradients the CPU runs some of them on its fused flash kernel
KERNEL_PATHS = [
    pytest.param(method, family, backend, id=f"{method}-{backend}-{family}")
    for method, backend in [
        ("moba", "gather"),
        ("routing_attention", "sorted"),
        ("power_attention", "blocks"),
        ("sliding_window", "blocks"),
        ("moa", "blocks"),
        ("hyper_attention", None),
    ]
    for family in ("llama", "gemma3")
    if supported(method, family)
]


def _inputs(length: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows, the second left-padded: `(input_ids, attention_mask, labels)`."""
    ids = torch.randint(3, 128, (2, length))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _new_tensors(model: torch.nn.Module, buffers_before: set[str]) -> dict[str, torch.Tensor]:
    buffers = {name: b for name, b in model.named_buffers() if name not in buffers_before}
    return {**hf_attn_zoo.new_parameters(model), **buffers}


def _autocast_step(model: torch.nn.Module, length: int = 10) -> None:
    """One bf16-autocast training step: the loss and every gradient are finite, and gradients reach the new params."""
    model.train()
    ids, mask, labels = _inputs(length)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, attention_mask=mask, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    for name, param in model.named_parameters():
        if param.grad is not None:
            assert torch.isfinite(param.grad).all(), name
    for name, param in hf_attn_zoo.new_parameters(model).items():
        assert param.grad is not None, f"no gradient reached {name}"
        assert param.grad.dtype == param.dtype == torch.float32, name


class _RealFloatAllocations(TorchDispatchMode):
    """Records every op that produces a floating-point tensor off the meta device (real memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not tensor.is_meta:
                self.ops.append(f"{func} -> {tuple(tensor.shape)} {tensor.dtype}")
        return out


@pytest.mark.parametrize("method,family", GRID)
def test_bf16_model_gets_bf16_new_weights_and_a_finite_forward(method, family):
    model = tiny_model(family).to(torch.bfloat16)
    device = model.get_input_embeddings().weight.device
    before = set(dict(model.named_buffers()))
    hf_attn_zoo.patch(model, method, **METHOD_CASES[method])
    randomize_new_parameters(model)
    for name, tensor in _new_tensors(model, before).items():
        assert tensor.device == device, name
        if tensor.is_floating_point():
            expected = torch.float32 if name.rpartition(".")[2] in FP32_STATE else torch.bfloat16
            assert tensor.dtype == expected, f"{name} is {tensor.dtype}"
    ids, mask, _ = _inputs()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("method,family", GRID)
def test_meta_model_patches_and_unpatches_without_real_weights(method, family):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(family_specs()[family].tiny_config())
    structure = [(name, type(module)) for name, module in model.named_modules()]
    keys = list(model.state_dict())
    with _RealFloatAllocations() as allocations:
        hf_attn_zoo.patch(model, method, **METHOD_CASES[method])
    assert not allocations.ops, f"patching a meta model allocated real tensors: {allocations.ops}"
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert tensor.is_meta, f"{name} left the meta device"
    repr(model)  # the new modules' extra_repr reads no values
    hf_attn_zoo.unpatch(model)
    assert [(name, type(module)) for name, module in model.named_modules()] == structure
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("method,family", GRID)
def test_bf16_autocast_training_step_is_finite(method, family):
    model = hf_attn_zoo.patch(tiny_model(family), method, **METHOD_CASES[method])
    randomize_new_parameters(model)
    _autocast_step(model)


@pytest.mark.parametrize("method,family,backend", KERNEL_PATHS)
def test_kernel_paths_under_bf16(method, family, backend):
    options = {**METHOD_CASES[method], **({"backend": backend} if backend else {})}
    model = hf_attn_zoo.patch(tiny_model(family), method, **options)
    randomize_new_parameters(model)
    ids, mask, _ = _inputs(24)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(ids, attention_mask=mask).logits).all()
    _autocast_step(model, 24)
    bf16 = hf_attn_zoo.patch(tiny_model(family).to(torch.bfloat16), method, **options)
    randomize_new_parameters(bf16)
    with torch.no_grad():
        assert torch.isfinite(bf16(ids, attention_mask=mask).logits).all()
