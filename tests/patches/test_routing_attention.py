"""Routing attention (Routing Transformer, arXiv:2003.05997) as a patch (its kernels: tests/kernels): online k-means,
k-means initialisation, commitment loss, decoding, save/reload, options and the recipe."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import hf_attn_zoo
from hf_attn_zoo.errors import InvalidOptionError
from hf_attn_zoo.families import family_specs
from hf_attn_zoo.families.spec import HeadLayout
from hf_attn_zoo.patches.routing_attention import (
    RoutingAttentionConfig,
    RoutingCentroids,
    init_routing_centroids,
    routing_centroids,
)
from hf_attn_zoo.registry import get_patch
from tests.matrix import ATOL_FP32, clone, tiny_model

GRID_OPTIONS = {"num_clusters": 2, "window": 3, "sinks": 1}


def test_neutral_patch_equals_the_dense_model():
    base = tiny_model("llama")
    neutral = get_patch("routing_attention").neutral_config(family_specs()["llama"], base.config)
    model = hf_attn_zoo.patch(clone(base), "routing_attention", **neutral.to_dict())
    ids = torch.randint(3, 128, (2, 12))
    torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=ATOL_FP32, rtol=0)


def _centroids(clusters=3, decay=0.9, data="keys"):
    layout = HeadLayout(num_heads=4, num_kv_heads=2, head_dim=8)
    config = RoutingAttentionConfig(num_clusters=clusters, routing_heads=2, ema_decay=decay, centroid_data=data)
    return RoutingCentroids(layout, config, seed=3)


@pytest.mark.parametrize("data", ["keys", "queries_and_keys"])
def test_ema_moves_centroids_toward_the_assigned_means_only_in_training(data):
    module = _centroids(data=data)
    g = torch.Generator().manual_seed(0)
    query, key = torch.randn(1, 4, 16, 8, generator=g), torch.randn(1, 2, 16, 8, generator=g)
    before = module.means.clone()
    module.eval()
    module(query, key, None)
    assert torch.equal(module.means, before)

    module.train()
    q_clusters, k_clusters = module(query, key, None)
    # routing heads are the last two (heads 2, 3), both of KV head 1: only its centroids are updated
    assert torch.equal(module.means[0], before[0])
    q = F.normalize(query[0, 2:], dim=-1).reshape(-1, 8)
    k = F.normalize(key[0, 1], dim=-1)
    vectors, assign = k, k_clusters[0, 1]
    if data == "queries_and_keys":  # the paper combines query and key assignments
        vectors, assign = torch.cat([q, k]), torch.cat([q_clusters[0, 2:].reshape(-1), k_clusters[0, 1]])
    for c in range(3):
        old = before[1, c]
        if not (assign == c).any():
            assert torch.equal(module.means[1, c], old)
            continue
        mean = F.normalize(vectors[assign == c].mean(0), dim=0)
        expected = F.normalize(0.9 * old + 0.1 * mean, dim=0)
        torch.testing.assert_close(module.means[1, c], expected)
        assert module.means[1, c] @ mean > old @ mean


def test_patched_model_updates_centroids_only_in_training_mode():
    _, model = _patched()
    before = {n: m.means.clone() for n, m in routing_centroids(model).items()}
    ids = torch.randint(3, 128, (2, 10))
    for _ in range(3):
        model(ids)
    assert all(torch.equal(m.means, before[n]) for n, m in routing_centroids(model).items())
    model.train()
    model(ids)
    assert all(not torch.equal(m.means, before[n]) for n, m in routing_centroids(model).items())


@pytest.mark.parametrize("data", ["keys", "queries_and_keys"])
def test_ema_ignores_padding(data):
    module = _centroids(decay=0.5, data=data).train()
    query, key = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    real = torch.tensor([[False, False, False, True, True, True]])
    module(query, key, real)
    reference = _centroids(decay=0.5, data=data).train()
    reference(query[:, :, 3:], key[:, :, 3:], None)
    torch.testing.assert_close(module.means, reference.means)


def _patched(family="llama", **options):
    base = tiny_model(family)
    return base, hf_attn_zoo.patch(clone(base), "routing_attention", **{**GRID_OPTIONS, **options})


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    # "real-ish" text: a few repeated motifs, so q/k vectors have structure for the clustering to find
    motifs = torch.randint(3, 128, (4, 8), generator=g)
    rows = [motifs[torch.randint(0, 4, (4,), generator=g)].flatten() for _ in range(2 * n)]
    return [{"input_ids": torch.stack(rows[2 * i : 2 * i + 2])} for i in range(n)]


@pytest.mark.parametrize("data", ["keys", "queries_and_keys"])
def test_kmeans_init_reduces_the_within_cluster_distance_and_is_deterministic(data):
    base, first = _patched(num_clusters=4, centroid_data=data)
    second = hf_attn_zoo.patch(
        clone(base), "routing_attention", **{**GRID_OPTIONS, "num_clusters": 4, "centroid_data": data}
    )
    seeded = {n: m.means.clone() for n, m in routing_centroids(first).items()}
    fit = init_routing_centroids(first, _batches(), iterations=10)
    assert fit["distance_after"] < fit["distance_before"]
    assert fit["layers"] == 2 and fit["vectors"] > 0
    init_routing_centroids(second, _batches(), iterations=10)
    for (name, a), b in zip(routing_centroids(first).items(), routing_centroids(second).values()):
        assert torch.equal(a.means, b.means)
        assert not torch.equal(a.means, seeded[name])
        torch.testing.assert_close(a.means.norm(dim=-1), torch.ones(a.means.shape[:2]))
    assert not first.training


def test_commitment_loss_trains_the_q_and_k_projections():
    _, model = _patched()
    model.train()
    ids = torch.randint(3, 128, (2, 10))
    out = model(input_ids=ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss > 0
    out.aux_loss.backward()
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    # the loss reads only q and k: the last layer's values get no gradient from it
    assert model.model.layers[-1].self_attn.v_proj.weight.grad is None
    model.eval()
    assert getattr(model(input_ids=ids, labels=ids), "aux_loss", None) is None


def test_cached_decoding_with_left_padding_equals_the_full_forward():
    _, model = _patched("qwen2", backend="masked")
    ids = torch.randint(3, 128, (2, 14))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = DynamicCache(config=model.config)
        steps = [
            model(ids[:, :6], attention_mask=mask[:, :6], past_key_values=cache, use_cache=True).logits,
            model(ids[:, 6:10], attention_mask=mask[:, :10], past_key_values=cache, use_cache=True).logits,
        ]
        steps += [
            model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache, use_cache=True).logits
            for t in range(10, 14)
        ]
        alone = model(ids[:1, 4:]).logits
    torch.testing.assert_close(torch.cat(steps, dim=1)[:, 4:], full[:, 4:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full[:1, 4:], alone, atol=1e-5, rtol=1e-5)


def test_sorted_backend_gives_the_masked_logits():
    base, masked = _patched("qwen3", backend="masked")
    sorted_ = hf_attn_zoo.patch(clone(base), "routing_attention", **{**GRID_OPTIONS, "backend": "sorted"})
    ids = torch.randint(3, 128, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    torch.testing.assert_close(
        sorted_(ids, attention_mask=mask).logits, masked(ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5
    )


def test_save_and_reload_keep_the_centroids_in_the_checkpoint(tmp_path):
    from safetensors.torch import load_file

    _, model = _patched()
    init_routing_centroids(model, _batches(), iterations=5)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    for name, module in routing_centroids(model).items():
        assert torch.equal(saved[f"{name}.means"], module.means)


def test_from_pretrained_restores_fitted_centroids_bit_exactly(tmp_path):
    _, model = _patched()
    init_routing_centroids(model, _batches(), iterations=5)
    model.save_pretrained(tmp_path)
    reloaded = hf_attn_zoo.from_pretrained(tmp_path).eval()
    for a, b in zip(routing_centroids(model).values(), routing_centroids(reloaded).values()):
        assert torch.equal(a.means, b.means)
    ids = torch.randint(3, 128, (2, 10))
    assert torch.equal(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    "options,needle",
    [
        ({"num_clusters": 0}, "num_clusters=0"),
        ({"window": 0}, "window=0"),
        ({"window": 257}, "window=257"),
        ({"sinks": -1}, "sinks=-1"),
        ({"routing_heads": 5}, "routing_heads=5"),
        ({"routing_heads": -1}, "routing_heads=-1"),
        ({"ema_decay": 1.0}, "ema_decay=1.0"),
        ({"ema_decay": -0.1}, "ema_decay=-0.1"),
        ({"commitment_weight": -1e-4}, "commitment_weight=-0.0001"),
    ],
)
def test_bad_options_raise_one_clear_error_and_leave_the_model_untouched(options, needle):
    model = tiny_model("llama")
    keys = set(model.state_dict())
    with pytest.raises(InvalidOptionError, match=needle.replace(".", r"\.")):
        hf_attn_zoo.patch(model, "routing_attention", **options)
    assert set(model.state_dict()) == keys
    assert hf_attn_zoo.applied_patches(model) == []
    assert model.config._attn_implementation != "zoo"


def test_recipe_validates_and_its_init_hook_resolves():
    from hf_attn_zoo.tuning.init_hooks import get_init_hook
    from hf_attn_zoo.tuning.recipe import load_recipe

    recipe = load_recipe("routing_attention/smollm2_quick")
    (spec,) = recipe.patches
    assert spec.method == "routing_attention" and spec.options["window"] < recipe.data.seq_len
    (step,) = recipe.init
    assert get_init_hook(step.name).__name__ == "routing_kmeans_init"
