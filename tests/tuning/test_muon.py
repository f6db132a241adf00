"""`optim.name: muon`: the parameter rule, the Newton-Schulz update (per expert on fused experts), the combined
optimizer against torch's Muon and AdamW, and recipe runs (training, resume, `lr_scale`, validation)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import hf_attn_zoo as zoo
from hf_attn_zoo.errors import RecipeError
from hf_attn_zoo.tuning import load_recipe, run_recipe
from hf_attn_zoo.tuning.muon import (
    MuonWithAdamW,
    classify_parameters,
    muon_param_groups,
    naive_zeropower_via_newtonschulz,
    zeropower_via_newtonschulz,
)
from tests.matrix import METHOD_CASES, tiny_model
from tests.tuning.test_train import _Crash, tiny_recipe

# bf16 Newton-Schulz: a batched and a per-matrix run of the same ops agree to about one bf16 rounding
ATOL_NS = 1e-2
# the iteration's singular values land in about [0.68, 1.15], not at 1 (Keller Jordan's coefficients)
SINGULAR_RANGE = (0.5, 1.3)
MUON = {"name": "muon", "lr": 3e-3, "warmup_steps": 0, "schedule": "constant"}


def _kinds(model: torch.nn.Module) -> dict[str, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these models has a shape Muon cannot take
        return classify_parameters(model)


def test_dense_model_matrices_go_to_muon_embeddings_and_norms_to_adamw():
    kinds = _kinds(tiny_model("llama"))
    assert kinds["model.embed_tokens.weight"] == kinds["lm_head.weight"] == "embedding"
    assert kinds["model.layers.0.input_layernorm.weight"] == kinds["model.norm.weight"] == "vector"
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert kinds[f"model.layers.1.{proj}.weight"] == "matrix", proj
    assert set(kinds.values()) == {"embedding", "vector", "matrix"}


def test_mla_latent_projections_go_to_muon_and_the_rest_as_in_the_dense_model():
    model = zoo.patch(tiny_model("llama"), "mla", rank=8, rope_pairs=2)
    kinds = _kinds(model)
    latent = {n: k for n, k in kinds.items() if ".mla." in n}
    assert latent and set(latent.values()) == {"matrix"}  # kv_down, kv_up: non-square hidden matrices
    assert not any(".mla." in n for n, p in model.named_buffers() if n in kinds)  # the query map is no parameter
    assert kinds["model.embed_tokens.weight"] == "embedding" and kinds["model.norm.weight"] == "vector"


def test_tied_embeddings_are_one_adamw_parameter():
    model = tiny_model("gemma")
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    kinds = _kinds(model)
    assert [n for n, k in kinds.items() if k == "embedding"] == ["model.embed_tokens.weight"]


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_moe_routers_go_to_adamw_and_fused_experts_to_muon(family: str):
    model = tiny_model(family)
    kinds = _kinds(model)
    routers = [n for n, k in kinds.items() if k == "router"]
    experts = [n for n, k in kinds.items() if k == "experts"]
    layers = len(model.model.layers)
    assert routers and all(".mlp.gate." in n or ".mlp.router." in n for n in routers)
    assert sorted(experts) == sorted(
        f"model.layers.{i}.mlp.experts.{p}" for i in range(layers) for p in ("gate_up_proj", "down_proj")
    )
    # GPT-OSS: per-expert biases [E, out] and attention sinks are vectors
    assert all(kinds[n] == "vector" for n in kinds if n.endswith("bias") and ".router." not in n)

    groups = muon_param_groups(model, lr=1.0, adamw_lr=0.5, weight_decay=0.1)
    transposed = bool(model.model.layers[0].mlp.experts.is_transposed)
    expert_ids = {id(p) for n, p in model.named_parameters() if n in experts}
    (expert_group,) = [g for g in groups if {id(p) for p in g["params"]} & expert_ids]
    assert expert_group["use_muon"] and expert_group["transposed"] == transposed and expert_group["lr"] == 1.0
    assert all(g["lr"] == 0.5 for g in groups if not g["use_muon"])


def test_gates_and_empty_matrices_are_vectors_and_a_step_runs():
    # an upcycled model's Qwen2-MoE layers have an empty shared expert ([0, hidden]) beside the [1, hidden] gate
    model = tiny_model("qwen2_moe", shared_expert_intermediate_size=0).train()
    kinds = _kinds(model)
    mlp = "model.layers.0.mlp"
    assert kinds[f"{mlp}.shared_expert_gate.weight"] == kinds[f"{mlp}.shared_expert.up_proj.weight"] == "vector"
    optimizer = MuonWithAdamW(muon_param_groups(model, lr=0.01, adamw_lr=0.01, weight_decay=0.0), lr=0.01)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


def test_patch_routers_go_to_adamw_and_attention_experts_to_muon():
    moh = zoo.patch(tiny_model("llama"), "moh", router="learned")
    kinds = _kinds(moh)
    assert {n for n, k in kinds.items() if k == "router"} == set(zoo.new_parameters(moh))

    bam = zoo.patch(tiny_model("llama"), "bam", num_experts=3)
    kinds = _kinds(bam)
    new = zoo.new_parameters(bam)
    assert {n for n in new if kinds[n] == "router"} == {n for n in new if "attention_router" in n}
    assert kinds["model.layers.0.self_attn.q_proj_experts.weight"] == "experts"


def test_an_unexpected_shape_is_named_in_a_warning_and_trained_with_adamw():
    model = zoo.patch(tiny_model("llama"), "moba", **METHOD_CASES["moba"])
    conv = "model.layers.0.self_attn.moba_key_conv.weight"
    assert dict(model.named_parameters())[conv].ndim == 3
    with pytest.warns(UserWarning, match=rf"muon: .*{conv} \(2, \d+, 3\).*AdamW"):
        groups = muon_param_groups(model, lr=1.0, adamw_lr=1.0, weight_decay=0.0)
    conv_param = dict(model.named_parameters())[conv]
    assert [g["use_muon"] for g in groups if any(p is conv_param for p in g["params"])] == [False]


@pytest.mark.parametrize("shape", [(4, 24, 16), (3, 16, 40), (2, 32, 48)])
def test_batched_newton_schulz_equals_the_per_expert_loop(shape: tuple[int, ...]):
    torch.manual_seed(0)
    # experts of very different scales: a normalisation over the whole stack would shrink the small ones
    stack = torch.randn(shape) * torch.logspace(-2, 2, shape[0])[:, None, None]
    batched = zeropower_via_newtonschulz(stack).float()
    naive = torch.stack([naive_zeropower_via_newtonschulz(m) for m in stack]).float()
    torch.testing.assert_close(batched, naive, rtol=0, atol=ATOL_NS)
    singular = torch.linalg.svdvals(batched)
    assert singular.min() > SINGULAR_RANGE[0] and singular.max() < SINGULAR_RANGE[1]


@pytest.mark.parametrize("adjust_lr", ["match_rms_adamw", "original"])
def test_muon_groups_step_like_torch_muon(adjust_lr: str):
    torch.manual_seed(0)
    ours, theirs = torch.nn.Parameter(torch.randn(12, 20)), torch.nn.Parameter(torch.zeros(12, 20))
    theirs.data.copy_(ours.data)
    optimizer = MuonWithAdamW([{"params": [ours], "use_muon": True}], lr=0.02, weight_decay=0.1, adjust_lr=adjust_lr)
    reference = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust_lr)
    for _ in range(3):
        grad = torch.randn(12, 20)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        optimizer.step()
        reference.step()
    torch.testing.assert_close(ours.data, theirs.data, rtol=0, atol=ATOL_NS * 0.02)


def test_adamw_groups_step_like_torch_adamw():
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(7)), torch.nn.Parameter(torch.randn(5, 3))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    optimizer = MuonWithAdamW([{"params": ours}], lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-6)
    reference = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-6)
    for _ in range(3):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape)
            b.grad = a.grad.clone()
        optimizer.step()
        reference.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.data, b.data, rtol=0, atol=0)


def test_a_moe_step_orthogonalises_each_expert_of_the_fused_tensor():
    model = tiny_model("qwen3_moe").train()
    lr, momentum = 0.01, 0.95
    groups = muon_param_groups(model, lr=lr, adamw_lr=lr, weight_decay=0.0)
    optimizer = MuonWithAdamW(groups, lr=lr, momentum=momentum)
    ids = torch.randint(0, model.config.vocab_size, (4, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    experts = model.model.layers[0].mlp.experts.gate_up_proj
    before, grad = experts.detach().clone(), experts.grad.clone()
    optimizer.step()
    # first Nesterov step from a zero buffer; NS amplifies rounding in the weak directions of an expert that saw few
    # tokens, so the reference starts from the very same bf16 input
    update = grad.lerp(torch.zeros_like(grad).lerp(grad, 1 - momentum), momentum)
    ratio = 0.2 * max(experts.shape[-2:]) ** 0.5
    expected = before - lr * ratio * torch.stack([naive_zeropower_via_newtonschulz(u) for u in update]).float()
    torch.testing.assert_close(experts.detach(), expected, rtol=0, atol=lr * ratio * ATOL_NS)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_one_muon_step_moves_matrices_orthogonally_and_the_rest_by_adamw(tmp_path: Path, tiny_model_dir: Path):
    adamw_lr = 1e-3
    path = tiny_recipe(
        tmp_path, tiny_model_dir, train={"max_steps": 1}, optim={**MUON, "adamw_lr": adamw_lr, "max_grad_norm": None}
    )
    result = run_recipe(path)
    before, after = _weights(tiny_model_dir), _weights(result.final_dir)
    up = "model.layers.0.mlp.up_proj.weight"  # [128, 64]: match_rms_adamw scales lr by 0.2 * sqrt(128)
    singular = torch.linalg.svdvals(after[up] - before[up]) / (MUON["lr"] * 0.2 * 128**0.5)
    assert singular.median() > SINGULAR_RANGE[0] and singular.max() < SINGULAR_RANGE[1]
    # AdamW's first step moves each parameter with a gradient by about its learning rate
    embed = "model.embed_tokens.weight"
    torch.testing.assert_close((after[embed] - before[embed]).abs().max().item(), adamw_lr, rtol=1e-2, atol=0)
    routers = [n for n in after if "head_router" in n]
    assert routers and all(0 < after[n].abs().max() <= adamw_lr * 1.01 for n in routers)  # the routers start at 0


class _Groups(TrainerCallback):
    """Records `(use_muon, lr, names)` of each optimizer group when training starts."""

    def __init__(self):
        self.groups: list[tuple[bool, float, list[str]]] = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        names = {id(p): n for n, p in model.named_parameters()}
        self.groups = [(g["use_muon"], g["lr"], [names[id(p)] for p in g["params"]]) for g in optimizer.param_groups]


def test_lr_scale_and_adamw_lr_apply_to_their_groups(tmp_path: Path, tiny_model_dir: Path):
    groups = _Groups()
    optim = {**MUON, "adamw_lr": 1e-3, "lr_scale": {"head_router": 10.0}}
    result = run_recipe(tiny_recipe(tmp_path, tiny_model_dir, train={"max_steps": 2}, optim=optim), callbacks=[groups])
    assert result.global_step == 2
    by_name = {name: (muon, lr) for muon, lr, names in groups.groups for name in names}
    assert by_name["model.layers.0.self_attn.head_router.proj.weight"] == (False, pytest.approx(1e-2))
    assert by_name["model.embed_tokens.weight"] == (False, pytest.approx(1e-3))
    assert by_name["model.layers.1.mlp.up_proj.weight"] == (True, pytest.approx(3e-3))


def test_lora_adapters_train_with_muon_and_the_copied_routers_with_adamw(tmp_path: Path, tiny_model_dir: Path):
    groups = _Groups()
    lora = {"what": "lora", "max_steps": 1, "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}
    run_recipe(tiny_recipe(tmp_path, tiny_model_dir, train=lora, optim=MUON), callbacks=[groups])
    by_name = {name: muon for muon, _, names in groups.groups for name in names}
    adapters = [n for n in by_name if "lora_" in n]
    routers = [n for n in by_name if "head_router.modules_to_save" in n]
    assert adapters and all(by_name[n] for n in adapters)
    assert routers and not any(by_name[n] for n in routers)


def test_muon_recipe_lowers_the_loss_and_resumes_exactly(tmp_path: Path, tiny_model_dir: Path):
    optim = {**MUON, "warmup_steps": 1, "schedule": "cosine", "min_lr": 1e-4, "weight_decay": 0.1}
    crashed = tiny_recipe(tmp_path, tiny_model_dir, "crashed", train={"max_steps": 4, "save_steps": 2}, optim=optim)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(crashed, callbacks=[_Crash(at=3)])
    resumed = run_recipe(crashed)
    assert resumed.resumed_from == str(tmp_path / "crashed" / "checkpoint-2")

    straight = run_recipe(tiny_recipe(tmp_path, tiny_model_dir, "straight", train={"max_steps": 4}, optim=optim))
    assert straight.loss_history[-1][1] < straight.loss_history[0][1]
    assert [loss for _, loss in resumed.loss_history] == [loss for _, loss in straight.loss_history]
    a, b = _weights(resumed.final_dir), _weights(straight.final_dir)
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_muon_options_need_optim_name_muon_and_unsharded_matrices(tmp_path: Path, tiny_model_dir: Path):
    plain = tiny_recipe(tmp_path, tiny_model_dir, "plain", optim={"momentum": 0.9, "adamw_lr": 1e-3})
    with pytest.raises(RecipeError) as info:
        load_recipe(plain)
    for key in ("momentum", "adamw_lr"):
        assert f"optim.{key}: only optim.name: muon uses it, but the optimizer is 'adamw_torch'" in str(info.value)
    sharded = tiny_recipe(tmp_path, tiny_model_dir, "sharded", optim=MUON, train={"distributed": {"strategy": "fsdp"}})
    with pytest.raises(RecipeError, match="optim.name: muon orthogonalises whole weight matrices.*strategy ddp"):
        load_recipe(sharded)


def test_shipped_muon_recipe_differs_from_the_dense_baseline_only_in_the_optimizer():
    muon = load_recipe("dense/smollm2_quick_muon").model_dump()
    dense = load_recipe("dense/smollm2_quick").model_dump()
    assert muon["optim"]["name"] == "muon" and dense["optim"]["name"] == "adamw_torch"
    for section in ("model", "patches", "data", "train", "seed"):
        assert muon[section] == dense[section], section
    differing = {k for k in dense["optim"] if dense["optim"][k] != muon["optim"][k]}
    assert differing == {"name"}
