"""Architecture knowledge is family data: no model-type string outside `families/`, and the generic adapter reads
the layout of decoders that have no family file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from transformers import AutoConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from hf_attn_zoo.errors import UnsupportedArchitectureError
from hf_attn_zoo.families import family_specs, resolve_family, supported_model_types

PACKAGE = Path(__file__).resolve().parents[2] / "hf_attn_zoo"
# where a model type is not architecture knowledge about a patched model, but a name another format defines
NOT_FAMILY_KNOWLEDGE = {
    "upcycling/mergekit.py": "mergekit-moe's own `architecture` key",
}


def _small_config(model_type: str, **overrides):
    """A small config of `model_type` (transformers' own defaults are billions of parameters)."""
    small = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=64,
        vocab_size=128,
        pad_token_id=0,
    )
    return AutoConfig.for_model(model_type, **{**small, **overrides})


def _string_constants(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
    }
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    }


def test_no_model_type_literal_outside_the_family_data():
    model_types = set(CONFIG_MAPPING_NAMES) | {t for spec in family_specs().values() for t in spec.model_types}
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("families/") or relative in NOT_FAMILY_KNOWLEDGE:
            continue
        literals = _string_constants(path) & model_types
        if literals:
            found[relative] = sorted(literals)
    assert not found, f"model types written in code (put what they encode in the family spec): {found}"


@pytest.mark.parametrize(
    "model_type,expected",
    [
        ("olmo", {"block": "pre_norm", "mlp": "dense"}),
        ("apertus", {"block": "other", "qk_norm_scope": "head", "mlp": "dense"}),
        ("cohere", {"block": "parallel", "mlp": "dense"}),
        ("phimoe", {"block": "pre_norm", "mlp": "moe"}),
    ],
)
def test_a_decoder_without_a_family_file_is_read_from_its_modules(model_type, expected):
    config = _small_config(model_type)
    assert model_type not in supported_model_types()
    spec = resolve_family(config)
    assert spec.name == model_type and spec.layers == "model.layers" and spec.attention.q == "q_proj"
    assert spec.block == expected["block"] and spec.mlp.kind == expected["mlp"]
    assert spec.attention.qk_norm_scope == expected.get("qk_norm_scope")
    if spec.mlp.kind == "moe":  # the router rule is not guessed: without a family file, routing tools refuse
        assert spec.mlp.routing is None


def test_an_unrecognised_layout_names_what_it_found():
    config = _small_config("phi3")
    with pytest.raises(
        UnsupportedArchitectureError,
        match="model_type 'phi3' is not recognised.*no attention module with separate q_proj/k_proj/"
        "v_proj/o_proj.*self_attn \\(Phi3Attention\\)",
    ):
        resolve_family(config)


def test_a_moe_family_without_a_routing_rule_is_refused_by_the_routing_tools():
    import hf_attn_zoo

    config = _small_config("phimoe", num_local_experts=4, num_experts_per_tok=2)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(
        UnsupportedArchitectureError,
        match="mote cannot patch a phimoe model: its router has no routing rule.*declare `mlp.routing`",
    ):
        hf_attn_zoo.patch(model, "mote", off={"all": [0]})


def test_upcycling_targets_are_family_data():
    from hf_attn_zoo.upcycling import seed_families
    from hf_attn_zoo.upcycling.targets import moe_config

    assert seed_families() == ["llama", "mistral", "qwen2", "qwen3"]
    for name in seed_families():
        spec = family_specs()[name]
        for target in (spec.upcycle.every_layer, spec.upcycle.some_layers):
            assert family_specs()[target].upcycle_target is not None, (name, target)
    seed = family_specs()["qwen2"].tiny_config()
    config = moe_config(seed, num_experts=4, top_k=2, moe_layers=[1])
    assert config.model_type == "qwen2_moe" and config.mlp_only_layers == [0] and config.qkv_bias
    assert config.num_experts == 4 and config.moe_intermediate_size == seed.intermediate_size


def test_an_attention_that_bypasses_the_attention_interface_refuses_attention_function_patches():
    import hf_attn_zoo

    config = AutoConfig.for_model("kimi_linear")
    spec = resolve_family(config)
    assert spec.attention.interface is False  # its first layer runs linear attention of its own
    reason = hf_attn_zoo.registry.get_patch("sliding_window").refusal(spec, config)
    assert "computes attention itself instead of through transformers' attention interface" in reason
    assert hf_attn_zoo.registry.get_patch("mote").refusal(spec, config) != reason  # not an attention-function patch


def test_a_config_of_another_vocabulary_is_refused_with_one_error():
    from transformers import PretrainedConfig

    config = PretrainedConfig(n_heads=4, n_layers=2)  # not the common shape's num_attention_heads / num_hidden_layers
    with pytest.raises(UnsupportedArchitectureError, match="is not recognised.*names no num_attention_heads"):
        resolve_family(config)


def test_which_layers_rotate_is_family_data():
    def rotating(family):
        spec = family_specs()[family]
        config = spec.tiny_config()
        return [spec.uses_rope(config, i) for i in range(config.num_hidden_layers)]

    assert rotating("llama") == [True, True]
    assert rotating("smollm3") == [True, False]  # no_rope_layers: [1, 0]
    assert rotating("exaone4") == [True, False]  # RoPE on the sliding layer only


def test_streaming_refuses_a_family_whose_layers_do_not_all_rotate_alike():
    import hf_attn_zoo
    from hf_attn_zoo.errors import InvalidOptionError
    from tests.matrix import tiny_model

    for family in ("smollm3", "helium"):
        model = tiny_model(family)
        with pytest.raises(InvalidOptionError, match=f"stream=True re-rotates .*; {family} has"):
            hf_attn_zoo.patch(model, "sliding_window", window=4, sinks=1, stream=True)
        assert hf_attn_zoo.applied_patches(model) == []


def test_the_modules_say_the_q_k_norm_scope():
    from hf_attn_zoo.families.discover import discover_layout

    for model_type, scope in (("olmo2", "projection"), ("qwen3", "head")):
        config = _small_config(model_type, num_key_value_heads=4)
        assert discover_layout(config)["attention"]["qk_norm_scope"] == scope


@pytest.mark.parametrize("family,pairing", [("llama", "half"), ("helium", "interleaved"), ("glm4", "interleaved")])
def test_the_rope_pairing_is_read_from_the_family_code(family, pairing):
    assert family_specs()[family].attention.rope == pairing
