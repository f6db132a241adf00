"""MoE router losses (`hf_attn_zoo.install_router_losses`) and the recipe `moe:` section, on tiny random MoE models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import TrainerCallback
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import hf_attn_zoo as zoo
from hf_attn_zoo.errors import InvalidOptionError, PatchConflictError, RecipeError, UnsupportedArchitectureError
from hf_attn_zoo.moe_losses import load_balancing_loss, router_z_loss
from hf_attn_zoo.tuning import load_recipe, run_recipe
from tests.matrix import randomize_new_parameters, tiny_model

MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe"]
ALPHA, BETA = 0.01, 0.001


def moe_model(family: str = "mixtral") -> torch.nn.Module:
    model = tiny_model(family)
    with torch.no_grad():  # sharper routers than the random init, so that routing is clearly unbalanced
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(8.0)
    return model


def ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def router_logits(model, input_ids, attention_mask=None) -> tuple[torch.Tensor, ...]:
    """Every MoE layer's router logits `(B*T, N)`, from transformers' own recording (eval mode, no hooks of ours)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, output_router_logits=True)
    model.train(was_training)
    return out.router_logits


def hand_losses(logits: torch.Tensor, top_k: int, keep: torch.Tensor | None = None) -> tuple[float, float]:
    """`N sum_i f_i P_i` and `mean_t logsumexp(x_t)^2` written out, over the rows where `keep` is true."""
    if keep is not None:
        logits = logits[keep.reshape(-1).bool()]
    tokens, experts = logits.shape
    probs = torch.softmax(logits.double(), dim=-1)
    chosen = probs.topk(top_k, dim=-1).indices
    f = [sum(int(e in chosen[t].tolist()) for t in range(tokens)) / tokens for e in range(experts)]
    p = probs.mean(0).tolist()
    balance = experts * sum(fi * pi for fi, pi in zip(f, p))
    z = sum(torch.logsumexp(logits[t].double(), -1).item() ** 2 for t in range(tokens)) / tokens
    return balance, z


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_losses_equal_the_hand_formulas_and_transformers_and_reach_the_train_loss(family: str):
    model = moe_model(family)
    x = ids()
    logits = router_logits(model, x)
    k, n = model.config.num_experts_per_tok, logits[0].shape[-1]
    assert len(logits) == model.config.num_hidden_layers
    hand = [hand_losses(layer, k) for layer in logits]
    for layer, (balance, z) in zip(logits, hand):
        reference = load_balancing_loss_func((layer,), n, k)
        torch.testing.assert_close(load_balancing_loss(layer, layer.softmax(-1).topk(k).indices), reference)
        assert load_balancing_loss(layer, layer.softmax(-1).topk(k).indices).item() == pytest.approx(balance, abs=1e-5)
        assert router_z_loss(layer).item() == pytest.approx(z, rel=1e-5)
    assert max(b for b, _ in hand) > k * 1.05  # the routing is unbalanced: the test is not checking a constant

    plain = model(x, labels=x).loss  # eval mode
    handle = zoo.install_router_losses(model, load_balance_weight=ALPHA, z_loss_weight=BETA)
    model.train()
    out = model(x, labels=x)
    metrics = handle.pop_metrics()
    balance = sum(b for b, _ in hand) / len(hand)  # averaged over the MoE layers
    z = sum(z for _, z in hand) / len(hand)
    assert metrics["load_balance"].item() == pytest.approx(balance, abs=1e-5)
    assert metrics["z"].item() == pytest.approx(z, rel=1e-5)
    assert out.aux_loss.item() == pytest.approx(ALPHA * balance + BETA * z, rel=1e-5)
    torch.testing.assert_close(out.loss, plain + out.aux_loss)
    assert zoo.aux_loss(model) is None  # read and cleared by the forward
    handle.remove()


def test_nothing_happens_in_eval_mode():
    model = moe_model()
    x = ids()
    before = model(x, labels=x)
    handle = zoo.install_router_losses(model)
    after = model(x, labels=x)  # tiny_model() is in eval mode
    assert getattr(after, "aux_loss", None) is None and type(after) is type(before)
    torch.testing.assert_close(after.loss, before.loss, rtol=0, atol=0)
    assert handle._capture.routed == [] and handle.pop_metrics() == {}
    handle.remove()


def test_the_aux_loss_alone_trains_the_routers():
    model = moe_model("qwen3_moe")
    zoo.install_router_losses(model, load_balance_weight=1.0, z_loss_weight=0.0)
    model.train()
    model(ids()).aux_loss.backward()  # no labels: the loss is the aux loss only
    for layer in model.model.layers:
        assert layer.mlp.gate.weight.grad is not None and layer.mlp.gate.weight.grad.abs().sum() > 0
    assert model.lm_head.weight.grad is None


def test_padding_tokens_do_not_count():
    model = moe_model()
    x = ids(batch=2, length=10)
    mask = torch.ones_like(x)
    mask[0, :4] = 0  # left padding
    mask[1, 7:] = 0  # right padding
    logits = router_logits(model, x, mask)
    k, n = model.config.num_experts_per_tok, logits[0].shape[-1]
    hand = [hand_losses(layer, k, keep=mask) for layer in logits]
    for layer, (balance, _) in zip(logits, hand):
        assert load_balancing_loss_func((layer,), n, k, attention_mask=mask).item() == pytest.approx(balance, abs=1e-5)
        assert hand_losses(layer, k)[0] != pytest.approx(balance, abs=1e-3)  # the padding would change the value

    handle = zoo.install_router_losses(model)
    model.train()
    model(x, attention_mask=mask, labels=x)
    metrics = handle.pop_metrics()
    assert metrics["load_balance"].item() == pytest.approx(sum(b for b, _ in hand) / len(hand), abs=1e-5)
    assert metrics["z"].item() == pytest.approx(sum(z for _, z in hand) / len(hand), rel=1e-5)
    model(x, mask, labels=x)  # the mask passed positionally
    assert handle.pop_metrics()["load_balance"] == metrics["load_balance"]


def test_remove_restores_the_model_and_a_second_install_is_refused():
    model = moe_model().train()
    x = ids()
    before = model(x, labels=x)
    handle = zoo.install_router_losses(model)
    with pytest.raises(PatchConflictError, match="already installed"):
        zoo.install_router_losses(model)
    assert model(x, labels=x).loss > before.loss
    handle.remove()
    after = model(x, labels=x)
    assert type(after) is type(before) and after.aux_loss is None
    torch.testing.assert_close(after.loss, before.loss, rtol=0, atol=0)
    torch.testing.assert_close(after.logits, before.logits, rtol=0, atol=0)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not any(key.startswith("_zoo") for key in model.__dict__ if key != "_zoo_handles")
    with zoo.install_router_losses(model):  # installs again after removal; the `with` block removes it
        pass
    assert not model._forward_pre_hooks


def test_wrong_weights_and_dense_models_are_refused():
    with pytest.raises(InvalidOptionError, match="load_balance_weight must be a number >= 0"):
        zoo.install_router_losses(moe_model(), load_balance_weight=-0.1)
    with pytest.raises(UnsupportedArchitectureError, match="has no MoE layer"):
        zoo.install_router_losses(tiny_model("llama"))


def test_transformers_own_router_loss_is_not_counted_twice():
    model = moe_model()
    x = ids()
    plain = model(x, labels=x).loss  # eval, output_router_logits off: the LM loss
    model.config.output_router_logits = True
    model.config.router_aux_loss_coef = model.router_aux_loss_coef = 0.5  # the model reads its copy of it
    handle = zoo.install_router_losses(model, load_balance_weight=ALPHA, z_loss_weight=BETA)
    model.train()
    for kwargs in ({}, {"output_router_logits": True}):
        out = model(x, labels=x, **kwargs)
        torch.testing.assert_close(out.loss, plain + out.aux_loss)  # ours only, not 0.5 x transformers' on top
        metrics = handle.pop_metrics()
        expected = ALPHA * metrics["load_balance"] + BETA * metrics["z"]
        assert out.aux_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    handle.remove()
    own = model(x, labels=x)  # transformers' own loss is back once ours is removed
    torch.testing.assert_close(own.loss, plain + 0.5 * own.aux_loss)


def test_patches_and_router_losses_share_one_aux_loss():
    model = moe_model()
    zoo.patch(model, "moh", router="learned", shared_heads=2, routed_heads=2, top_k=1, gate="weighted")
    randomize_new_parameters(model)
    handle = zoo.install_router_losses(model, load_balance_weight=ALPHA, z_loss_weight=BETA)
    model.train()
    x = ids()
    out = model(x, labels=x)
    metrics = handle.pop_metrics()
    ours = ALPHA * metrics["load_balance"] + BETA * metrics["z"]
    assert out.aux_loss.item() > ours.item() * 1.01  # MoH's balance loss is in there too
    handle.remove()
    assert model(x, labels=x).aux_loss is not None  # MoH's hook stays

    # without router losses, transformers' own (weighted) balance loss is reported with MoH's: loss - aux = LM loss
    model.config.output_router_logits = True
    model.eval()
    lm_only = model(x, labels=x, output_router_logits=False).loss
    model.train()
    both = model(x, labels=x)
    torch.testing.assert_close(both.loss - both.aux_loss, lm_only)
    zoo.unpatch(model)
    assert not model._forward_hooks


def test_unpatch_keeps_the_router_losses():
    model = moe_model()
    handle = zoo.install_router_losses(model)
    zoo.patch(model, "moh", router="learned", shared_heads=2, routed_heads=2, top_k=1)
    zoo.unpatch(model)
    model.train()
    x = ids()
    assert model(x, labels=x).aux_loss is not None and handle.pop_metrics()
    handle.remove()
    assert not model._forward_hooks


@pytest.mark.parametrize("order", ["install_then_wrap", "wrap_then_install"])
def test_peft_lora_with_routers_in_modules_to_save(order: str):
    from peft import LoraConfig, get_peft_model

    model = moe_model()
    x = ids()
    reference = zoo.install_router_losses(model_copy := moe_model())
    model_copy.train()
    expected = model_copy(x, labels=x).aux_loss
    reference.remove()

    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["mlp.gate"], task_type="CAUSAL_LM"
    )
    if order == "install_then_wrap":
        handle = zoo.install_router_losses(model)
        peft_model = get_peft_model(model, config)
    else:
        peft_model = get_peft_model(model, config)
        handle = zoo.install_router_losses(peft_model)
    peft_model.train()
    out = peft_model(input_ids=x, labels=x)
    torch.testing.assert_close(out.aux_loss, expected)  # LoRA starts as the identity
    out.loss.backward()
    trained = [p for n, p in peft_model.named_parameters() if "mlp.gate.modules_to_save" in n]
    assert len(trained) == model.config.num_hidden_layers and all(p.grad.abs().sum() > 0 for p in trained)
    assert handle._capture.routed == []
    handle.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in peft_model.modules())


def test_gradient_checkpointing_gives_the_same_router_gradients_and_keeps_nothing():
    grads = []
    for checkpointing in (False, True):
        model = moe_model("qwen3_moe")
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        calls = []
        model.model.layers[0].mlp.gate.register_forward_hook(lambda *args: calls.append(1))
        handle = zoo.install_router_losses(model, load_balance_weight=1.0, z_loss_weight=0.1)
        model.train()
        x = ids()
        model(x, labels=x).loss.backward()  # with checkpointing, the backward pass calls the routers again
        assert len(calls) == 1 + checkpointing
        assert handle._capture.routed == [] and not handle._capture.active
        grads.append([layer.mlp.gate.weight.grad.clone() for layer in model.model.layers])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain)


# --- the recipe `moe:` section ------------------------------------------------------------------------------------


def write_recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


BASE = "train:\n  max_steps: 1\n  what: moe\n"


def test_a_moe_section_validates(tmp_path: Path):
    recipe = load_recipe(write_recipe(tmp_path, BASE + "moe:\n  load_balance_weight: 0.02\n  z_loss_weight: 0\n"))
    assert recipe.moe.load_balance_weight == 0.02 and recipe.moe.z_loss_weight == 0 and recipe.train.what == "moe"
    defaults = load_recipe(write_recipe(tmp_path, BASE + "moe: {}\n")).moe
    assert (defaults.load_balance_weight, defaults.z_loss_weight) == (0.01, 0.001)
    without = load_recipe(write_recipe(tmp_path, BASE))
    assert without.moe is None and "moe" not in yaml.safe_load(without.to_yaml())


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        (
            "moe:\n  load_balance_weight: -0.01\n",
            "recipe.yaml:5: moe.load_balance_weight: Input should be greater than or",
        ),
        ("moe:\n  z_loss_weight: lots\n", "recipe.yaml:5: moe.z_loss_weight: Input should be a valid number"),
        ("moe:\n  router_jitter: 0.1\n", "recipe.yaml:5: moe.router_jitter: unknown key (allowed here: load_balance_"),
        ("moe:\n  load_balance_weigth: 0.1\n", "did you mean 'load_balance_weight'?"),
        ("moe:\n", "recipe.yaml:4: moe: the section is empty (null); write `moe: {}`"),
    ],
)
def test_bad_moe_sections_name_the_line(tmp_path: Path, section: str, expected: str):
    with pytest.raises(RecipeError) as info:
        load_recipe(write_recipe(tmp_path, BASE + section))
    assert expected in str(info.value)


def test_an_override_can_turn_the_section_off(tmp_path: Path):
    assert load_recipe(write_recipe(tmp_path, BASE + "moe: {}\n"), ["moe=null"]).moe is None


def test_a_moe_section_on_a_dense_model_is_a_recipe_error(tmp_path: Path, tiny_model_dir: Path):
    path = write_recipe(
        tmp_path,
        yaml.safe_dump(
            {
                "model": {"path": str(tiny_model_dir)},
                "moe": {"load_balance_weight": 0.01},
                "train": {"max_steps": 1},
                "output_dir": str(tmp_path / "out"),
            }
        ),
    )
    with pytest.raises(
        RecipeError,
        match=r"recipe.yaml:\d+: moe: the model \(llama, after the patches\) has no MoE "
        r"layer.*`moe=null`",
    ):
        run_recipe(path)
    with pytest.raises(RecipeError, match=r"train.what: the model \(llama, after the patches\) has no MoE layer"):
        run_recipe(path, overrides=["moe=null", "train.what=moe"])


# --- end to end ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny_mixtral")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = tiny_model(
        "mixtral",
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def moe_recipe(tmp_path: Path, model_dir: Path, train: dict) -> Path:
    return write_recipe(
        tmp_path,
        yaml.safe_dump(
            {
                "model": {"path": str(model_dir)},
                "data": {"sources": [{"corpus": "python_stdlib_docs", "max_docs": 4}], "seq_len": 32},
                "train": {"batch_size": 2, "max_steps": 2, **train},
                "optim": {"lr": 1e-2, "schedule": "constant"},
                "moe": {"load_balance_weight": 0.05, "z_loss_weight": 0.01},
                "output_dir": str(tmp_path / "run"),
            }
        ),
    )


class _Logs(TrainerCallback):
    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def changed_parameters(before: Path, after: Path) -> set[str]:
    original = zoo.from_pretrained(before).state_dict()
    trained = zoo.from_pretrained(after).state_dict()
    return {name for name, tensor in original.items() if not torch.equal(trained[name], tensor)}


def test_a_recipe_trains_the_moe_blocks_with_router_losses(tmp_path: Path, tiny_moe_dir: Path):
    logs = _Logs()
    train = {"what": "moe", "gradient_checkpointing": True}
    result = run_recipe(moe_recipe(tmp_path, tiny_moe_dir, train), callbacks=[logs])
    assert [step for step, _ in result.aux_loss_history] == [1, 2]
    logged = [entry for entry in logs.logs if "aux_loss" in entry]
    assert len(logged) == 2 and all({"lm_loss", "moe_load_balance_loss", "moe_z_loss"} <= set(e) for e in logged)
    entry = logged[0]
    expected = 0.05 * entry["moe_load_balance_loss"] + 0.01 * entry["moe_z_loss"]
    assert entry["aux_loss"] == pytest.approx(expected, rel=1e-4)
    assert entry["lm_loss"] == pytest.approx(entry["loss"] - entry["aux_loss"])
    changed = changed_parameters(tiny_moe_dir, result.final_dir)
    assert changed and all(".mlp." in name for name in changed)  # `what: moe`: routers and experts only
    assert {"model.layers.0.mlp.gate.weight", "model.layers.1.mlp.experts.down_proj"} <= changed


def test_a_routers_recipe_trains_the_routers_alone(tmp_path: Path, tiny_moe_dir: Path):
    result = run_recipe(moe_recipe(tmp_path, tiny_moe_dir, {"what": "routers"}))
    changed = changed_parameters(tiny_moe_dir, result.final_dir)
    assert changed == {"model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"}


def test_a_lora_recipe_trains_routers_and_expert_adapters(tmp_path: Path, tiny_moe_dir: Path):
    lora = {
        "r": 2,
        "alpha": 4,
        "target_modules": ["q_proj"],
        "target_parameters": ["experts.gate_up_proj", "experts.down_proj"],
    }
    result = run_recipe(moe_recipe(tmp_path, tiny_moe_dir, {"what": "lora", "lora": lora}))
    assert len(result.aux_loss_history) == 2
    changed = changed_parameters(tiny_moe_dir, result.final_dir)
    assert {
        "model.layers.0.mlp.gate.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.experts.down_proj",
    } <= changed
    assert "model.layers.0.self_attn.k_proj.weight" not in changed and "lm_head.weight" not in changed
