"""End-to-end tuning runs on a tiny random Llama (CPU, a few steps each)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

import hf_attn_zoo as zoo
from hf_attn_zoo.errors import RecipeError
from hf_attn_zoo.tuning import register_init_hook, run_recipe
from hf_attn_zoo.tuning.init_hooks import INIT_HOOKS

LOSS_ATOL = 1e-5
# tiny Llama: 4 heads -> 2 shared + top-1 of 2 routed (3 of 4 active), learned router with weighted gates
MOH = {"method": "moh", "router": "learned", "shared_heads": 2, "routed_heads": 2, "top_k": 1, "gate": "weighted"}


def tiny_recipe(tmp_path: Path, model_dir: Path, name: str = "run", **sections) -> Path:
    recipe = {
        "model": {"path": str(model_dir)},
        "patches": [MOH],
        "data": {"sources": [{"corpus": "python_stdlib_docs", "max_docs": 6}], "seq_len": 32},
        "train": {"what": "all", "batch_size": 4, "max_steps": 3},
        "optim": {"lr": 3e-3, "warmup_steps": 0, "schedule": "constant"},
        "output_dir": str(tmp_path / name),
    }
    for section, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(section), dict):
            recipe[section] = {**recipe[section], **value}
        else:
            recipe[section] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def base_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def test_three_steps_lower_the_loss_and_save_a_reloadable_model(tmp_path: Path, tiny_model_dir: Path):
    calls = []

    @register_init_hook("test_record")
    def record(model, train_dataset, scale: float = 1.0):
        calls.append((type(model).__name__, len(train_dataset), scale, bool(zoo.new_parameters(model))))

    try:
        path = tiny_recipe(
            tmp_path,
            tiny_model_dir,
            init=[{"name": "test_record", "options": {"scale": 2.0}}],
            data={"held_out_fraction": 0.2},
        )
        result = run_recipe(path)
    finally:
        INIT_HOOKS.pop("test_record")
    assert calls and calls[0][0] == "LlamaForCausalLM" and calls[0][2:] == (2.0, True)
    assert [step for step, _ in result.loss_history] == [1, 2, 3]
    assert result.loss_history[-1][1] < result.loss_history[0][1]
    assert len(result.aux_loss_history) == 3 and result.eval_loss is not None
    assert result.train_tokens == 3 * 4 * 32 and result.train_tokens_per_second > 0
    assert (result.output_dir / "result.json").is_file() and (result.output_dir / "recipe.yaml").is_file()

    reloaded = zoo.from_pretrained(result.final_dir)
    assert [r["method"] for r in zoo.applied_patches(reloaded)] == ["moh"]
    routers = zoo.new_parameters(reloaded)
    assert routers and any(p.abs().sum() > 0 for p in routers.values())
    reloaded.eval()
    ids = torch.randint(0, reloaded.config.vocab_size, (1, 16))
    again = zoo.from_pretrained(result.final_dir).eval()
    torch.testing.assert_close(reloaded(ids).logits, again(ids).logits)


def test_what_new_trains_only_the_patch_parameters(tmp_path: Path, tiny_model_dir: Path):
    result = run_recipe(tiny_recipe(tmp_path, tiny_model_dir, train={"what": "new"}))
    trained = zoo.from_pretrained(result.final_dir)
    new = zoo.new_parameters(trained)
    assert new and all(p.abs().sum() > 0 for p in new.values())
    original = base_weights(tiny_model_dir)
    for name, parameter in trained.named_parameters():
        if name not in new:
            torch.testing.assert_close(parameter.data, original[name], rtol=0, atol=0, msg=name)


def test_what_new_without_new_parameters_is_a_recipe_error(tmp_path: Path, tiny_model_dir: Path):
    path = tiny_recipe(
        tmp_path, tiny_model_dir, patches=[{**MOH, "router": "qnorm", "gate": "binary"}], train={"what": "new"}
    )
    with pytest.raises(RecipeError, match="train.what: the patches created no parameters"):
        run_recipe(path)


class _Inspect(TrainerCallback):
    """Records which parameters are trainable when training starts."""

    def __init__(self):
        self.trainable: list[str] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.trainable = [n for n, p in model.named_parameters() if p.requires_grad]


def test_lora_trains_adapters_and_the_new_modules_then_merges(tmp_path: Path, tiny_model_dir: Path):
    inspect = _Inspect()
    path = tiny_recipe(
        tmp_path,
        tiny_model_dir,
        train={"what": "lora", "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
    )
    result = run_recipe(path, callbacks=[inspect])
    assert any("lora_A" in n for n in inspect.trainable)
    assert any("head_router.modules_to_save" in n for n in inspect.trainable)
    assert not any(n.endswith("mlp.up_proj.weight") or "embed_tokens" in n for n in inspect.trainable)
    assert not (result.final_dir / "adapter_config.json").exists()

    merged = zoo.from_pretrained(result.final_dir)
    original = base_weights(tiny_model_dir)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], original[q])
    up = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(merged.state_dict()[up], original[up], rtol=0, atol=0)
    # the trained modules_to_save copies are what the merged model keeps (routers start at zero)
    assert any(p.abs().sum() > 0 for p in zoo.new_parameters(merged).values())


def test_lora_keeps_the_aux_loss(tmp_path: Path, tiny_model_dir: Path):
    path = tiny_recipe(tmp_path, tiny_model_dir, train={"what": "lora", "max_steps": 1})
    assert run_recipe(path).aux_loss_history


class _Crash(TrainerCallback):
    """Simulates a killed run: raises right after optimizer step `at`."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt(f"simulated kill at step {self.at}")


@pytest.mark.parametrize("what", ["all", "lora"])
def test_an_interrupted_run_resumes_from_its_last_checkpoint(tmp_path: Path, tiny_model_dir: Path, what: str):
    schedule = {"lr": 3e-3, "warmup_steps": 1, "schedule": "cosine", "min_lr": 1e-4}
    crashed = tiny_recipe(
        tmp_path, tiny_model_dir, "crashed", train={"max_steps": 4, "save_steps": 2, "what": what}, optim=schedule
    )
    with pytest.raises(KeyboardInterrupt):
        run_recipe(crashed, callbacks=[_Crash(at=3)])
    output = tmp_path / "crashed"
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (output / "final").exists()

    resumed = run_recipe(crashed)
    assert resumed.resumed_from == str(output / "checkpoint-2")
    assert resumed.global_step == 4 and resumed.train_tokens == 2 * 4 * 32
    assert [step for step, _ in resumed.loss_history] == [1, 2, 3, 4]

    straight = run_recipe(
        tiny_recipe(tmp_path, tiny_model_dir, "straight", train={"max_steps": 4, "what": what}, optim=schedule)
    )
    for (_, a), (_, b) in zip(resumed.loss_history, straight.loss_history):
        assert abs(a - b) < LOSS_ATOL


def test_token_budget_and_global_batch_size(tmp_path: Path, tiny_model_dir: Path):
    # 2 blocks per device x grad_accum 2 (from the global batch of 4) = 4 x 32 tokens per step -> 2 steps
    path = tiny_recipe(
        tmp_path,
        tiny_model_dir,
        patches=[],
        train={"max_steps": None, "token_budget": 2 * 4 * 32, "batch_size": 2, "global_batch_size": 4},
    )
    result = run_recipe(path)
    assert result.global_step == 2 and result.train_tokens == 2 * 4 * 32


def test_a_corpus_packing_is_reused_by_the_next_run_of_the_process(tmp_path: Path, tiny_model_dir: Path):
    from transformers import AutoTokenizer

    from hf_attn_zoo.tuning import load_recipe
    from hf_attn_zoo.tuning.train import build_datasets

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    first, _ = build_datasets(load_recipe(tiny_recipe(tmp_path, tiny_model_dir)), tokenizer)
    # another run of the same data (a study's next variant): the same packed blocks, not packed again
    assert build_datasets(load_recipe(tiny_recipe(tmp_path, tiny_model_dir, "next")), tokenizer)[0] is first
    shorter, _ = build_datasets(
        load_recipe(tiny_recipe(tmp_path, tiny_model_dir, "short", data={"seq_len": 16})), tokenizer
    )
    assert shorter is not first and shorter[0]["input_ids"].shape == (16,)


def test_files_sources_are_packed_and_split_by_document(tmp_path: Path, tiny_model_dir: Path):
    from transformers import AutoTokenizer

    from hf_attn_zoo.tuning import load_recipe
    from hf_attn_zoo.tuning.train import build_datasets

    (tmp_path / "a.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    rows = [f'{{"body": "document number {i}: ' + "the quick brown fox " * 10 + '"}' for i in range(10)]
    (tmp_path / "rows.jsonl").write_text("\n".join(rows) + "\n")
    path = tiny_recipe(
        tmp_path,
        tiny_model_dir,
        data={
            "sources": [{"files": ["a.txt"]}, {"files": ["rows.jsonl"], "format": "jsonl", "text_field": "body"}],
            "held_out_fraction": 0.2,
            "seq_len": 16,
        },
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    train, held_out = build_datasets(load_recipe(path), tokenizer)
    assert train.column_names == ["input_ids", "labels"] and held_out is not None
    assert all(len(row) == 16 for row in train["input_ids"]) and torch.equal(train[0]["input_ids"], train[0]["labels"])
    again, _ = build_datasets(load_recipe(path), tokenizer)
    assert torch.equal(train[:]["input_ids"], again[:]["input_ids"])
    train_text = tokenizer.decode(train[:]["input_ids"].flatten())
    held_text = tokenizer.decode(held_out[:]["input_ids"].flatten())
    for i in range(10):
        marker = f"document number {i}:"
        assert (marker in train_text) != (marker in held_text), marker

    (tmp_path / "rows.jsonl").write_text(rows[0] + "\n{not json\n")
    with pytest.raises(RecipeError, match=r"rows.jsonl:2: invalid JSON line"):
        build_datasets(load_recipe(path), tokenizer)
