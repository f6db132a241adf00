"""Mixture-of-Head attention: the paper's equations on small tensors, the routers, GQA decode skipping."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_attn_zoo
from hf_attn_zoo.errors import InvalidOptionError
from hf_attn_zoo.families import HeadLayout
from hf_attn_zoo.kernels import head_sparse
from hf_attn_zoo.patches.moh import MoHConfig, MoHRouter, distill_router, moh_routers, rank_heads
from tests.matrix import clone, randomize_new_parameters

LAYOUT = HeadLayout(num_heads=6, num_kv_heads=3, head_dim=8)


def _router(**options) -> MoHRouter:
    config = MoHConfig(**{"shared_heads": 2, "routed_heads": 4, "top_k": 2, "gate": "weighted", **options})
    return MoHRouter(hidden_size=16, layout=LAYOUT, config=config)


def _gqa_model(**overrides) -> torch.nn.Module:
    options = dict(
        hidden_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=3,
        intermediate_size=128,
        vocab_size=128,
        pad_token_id=0,
    )
    config = LlamaConfig(**{**options, **overrides})
    return AutoModelForCausalLM.from_config(config).eval()


def test_zero_initialised_learned_router_gives_unit_gates():
    gates = _router()(torch.randn(2, 5, 16))
    # shared heads 1, the first top_k routed heads (ties) 1, the others 0: the dense scale is kept
    assert gates.shape == (2, 5, 6)
    torch.testing.assert_close(gates.sum(-1), torch.full((2, 5), 4.0))
    assert set(gates.unique().tolist()) == {0.0, 1.0}


def test_weighted_gates_follow_eq5():
    router = _router()
    assert router.proj.weight.shape == (4 + 2 + 2, 16)  # W_r, W_s, W_h stacked
    with torch.no_grad():
        router.proj.weight.normal_()
    x = torch.randn(3, 4, 16)
    gates = router(x)
    w_r, w_s, w_h = router.proj.weight.split([4, 2, 2])
    routed_logits = x @ w_r.T
    probs = routed_logits.softmax(-1)
    top = routed_logits.topk(2, -1).indices
    kept = torch.zeros_like(probs).scatter(-1, top, probs.gather(-1, top))
    alpha = (x @ w_h.T).softmax(-1) * 2
    expected_routed = kept / kept.sum(-1, keepdim=True) * 2 * alpha[..., 1:]
    expected_shared = (x @ w_s.T).softmax(-1) * 2 * alpha[..., :1]
    torch.testing.assert_close(gates[..., 2:], expected_routed)
    torch.testing.assert_close(gates[..., :2], expected_shared)
    assert ((gates[..., 2:] > 0).sum(-1) == 2).all()


def test_binary_gates_use_the_straight_through_estimator():
    router = _router(gate="binary")
    assert router.proj.weight.shape == (4, 16)  # binary gates: only W_r
    with torch.no_grad():
        router.proj.weight.normal_()
    x = torch.randn(2, 3, 16)
    gates = router(x)
    assert set(gates.detach().unique().tolist()) <= {0.0, 1.0}
    (gates * torch.randn_like(gates)).sum().backward()
    assert router.proj.weight.grad.abs().sum() > 0


def test_load_balance_loss_is_E_times_sum_f_P():
    router = _router().train()
    with torch.no_grad():
        router.proj.weight.normal_()
    x = torch.randn(4, 7, 16)
    router(x)
    logits = router.router_logits(x).reshape(-1, 4)
    probs = logits.softmax(-1)
    f = torch.zeros_like(probs).scatter(-1, logits.topk(2, -1).indices, 1.0).mean(0)
    expected = 4 * (f * probs.mean(0)).sum()
    torch.testing.assert_close(router.last_aux_loss, expected)
    router.eval()
    router(x)
    assert router.last_aux_loss is None


def test_aux_loss_is_added_to_the_model_loss_and_reaches_the_router():
    model = hf_attn_zoo.patch(_gqa_model(), "moh", router="learned", balance_loss_weight=0.5)
    randomize_new_parameters(model)
    model.train()
    ids = torch.randint(3, 128, (2, 9))
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss > 0
    task_loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, task_loss + out.aux_loss)
    out.aux_loss.backward()
    assert all(r.proj.weight.grad[: r.routed_rows].abs().sum() > 0 for r in moh_routers(model).values())


def test_qnorm_router_picks_the_largest_query_norms():
    router = _router(router="qnorm", gate="binary", shared_heads=0, routed_heads=6, top_k=3)
    query = torch.randn(1, 6, 4, 8)  # [B, H, T, D]
    gates = router(torch.randn(1, 4, 16), query)
    expected = torch.zeros(1, 4, 6).scatter(-1, query.norm(dim=-1).transpose(1, 2).topk(3, -1).indices, 1.0)
    assert torch.equal(gates, expected)


def test_onorm_router_picks_the_largest_head_outputs():
    router = _router(router="onorm", gate="binary", shared_heads=1, routed_heads=5, top_k=2)
    head_out = torch.randn(2, 3, 6, 8)  # [B, T, H, D]
    gates = router(torch.randn(2, 3, 16), None, head_out)
    routed_norms = head_out.norm(dim=-1)[..., 1:]
    expected = torch.zeros(2, 3, 5).scatter(-1, routed_norms.topk(2, -1).indices, 1.0)
    assert torch.equal(gates[..., 1:], expected)
    assert (gates[..., 0] == 1).all()


def test_group_granularity_switches_whole_kv_groups():
    router = _router(router="qnorm", gate="binary", granularity="group", shared_heads=2, routed_heads=4, top_k=2)
    gates = router(torch.randn(2, 5, 16), torch.randn(2, 6, 5, 8))
    pairs = gates.unflatten(-1, (3, 2))
    assert (pairs[..., 0] == pairs[..., 1]).all(), "both heads of a KV group share one gate"
    assert (pairs[..., 0, 0] == 1).all() and (gates.sum(-1) == 4).all()


def test_defaults_follow_the_paper_75_percent_of_heads():
    model = hf_attn_zoo.patch(_gqa_model(), "moh")
    options = hf_attn_zoo.applied_patches(model)[0]["options"]
    assert (options["shared_heads"], options["routed_heads"], options["top_k"]) == (3, 3, 2)  # 5/6 ~ 75%
    assert options["gate"] == "binary" and options["balance_loss_weight"] == 0.01


@pytest.mark.parametrize(
    "options,match",
    [
        ({"top_k": 5, "shared_heads": 2}, "top_k=5 active heads cannot exceed routed_heads=4"),
        ({"shared_heads": 4, "routed_heads": 4}, "exceeds the 6 heads"),
        ({"shared_heads": 0, "top_k": 0}, "top_k=0 is out of range: it must be >= 1"),
        ({"shared_heads": 5}, "no routed head would ever be active"),
        ({"balance_loss_weight": float("nan")}, "balance_loss_weight=nan must be a finite number"),
        ({"router": "qnorm", "gate": "weighted"}, "needs router='learned'"),
        ({"granularity": "group", "shared_heads": 1}, "multiples of the group size 2"),
        ({"router": "attention"}, "wrong type; expected one of 'learned'"),
        ({"top_k": 2.5}, "wrong type"),
        ({"topk": 2}, r"unknown option\(s\) \['topk'\]"),
    ],
)
def test_bad_options_raise_one_clear_error_and_leave_the_model_untouched(options, match):
    model = _gqa_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(3, 128, (1, 6))
    logits = model(ids).logits
    with pytest.raises(InvalidOptionError, match=match):
        hf_attn_zoo.patch(model, "moh", **options)
    assert hf_attn_zoo.applied_patches(model) == []
    assert model.config._attn_implementation == "sdpa"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model(ids).logits, logits)


def test_layer_selector_patches_only_those_layers():
    model = hf_attn_zoo.patch(_gqa_model(num_hidden_layers=4), "moh", layers="every_2nd")
    assert sorted(moh_routers(model)) == [f"model.layers.{i}.self_attn.head_router" for i in (1, 3)]


@pytest.mark.parametrize("granularity,top_k,shared", [("group", 2, 2), ("head", 3, 0)])
def test_decode_skip_computes_only_selected_heads_and_matches_masking(granularity, top_k, shared, monkeypatch):
    base = _gqa_model()
    options = dict(router="qnorm", granularity=granularity, shared_heads=shared, top_k=top_k)
    dense = hf_attn_zoo.patch(clone(base), "moh", decode_skip="never", **options)
    sparse = hf_attn_zoo.patch(clone(base), "moh", decode_skip="always", **options)
    calls = []
    original = head_sparse.head_sparse_decode_attention

    def spy(query, key, value, mask, active, scaling):
        calls.append(active.float().mean().item())
        return original(query, key, value, mask, active, scaling)

    monkeypatch.setattr("hf_attn_zoo.patches.moh.head_sparse_decode_attention", spy)
    ids = torch.randint(3, 128, (3, 9))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # a left-padded row
    out_dense = dense.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert not calls
    out_sparse = sparse.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out_sparse, out_dense)
    assert len(calls) == 5 * 2, "one head-sparse call per layer per decode step (not in prefill)"
    assert max(calls) < 1.0


def test_output_projection_skips_unselected_heads_in_single_token_decode():
    model = hf_attn_zoo.patch(
        _gqa_model(), "moh", router="qnorm", granularity="group", shared_heads=0, top_k=2, decode_skip="always"
    )
    o_proj = model.model.layers[0].self_attn.o_proj
    seen = []
    original = torch.Tensor.__matmul__

    def record(self, other):
        seen.append(tuple(other.shape))
        return original(self, other)

    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        torch.Tensor.__matmul__ = record
        try:
            model(ids[:, -1:], cache=out.cache, use_cache=True)
        finally:
            torch.Tensor.__matmul__ = original
    head_dim = 16
    # 2 of 3 KV groups (4 of 6 heads) -> the projections multiply at most 4 heads' columns
    assert seen and all(shape[0] <= 4 * head_dim for shape in seen)
    assert o_proj.__dict__.get("_zoo_head_runs") is None


def test_head_usage_statistics_and_plot(tmp_path):
    model = hf_attn_zoo.patch(_gqa_model(), "moh", router="qnorm", shared_heads=2, top_k=2)
    model(torch.randint(3, 128, (2, 10)))
    usage = hf_attn_zoo.analysis.head_usage(model)
    assert sorted(usage["layers"]) == [0, 1]
    layer = usage["layers"][0]
    assert layer["tokens"] == 20
    assert layer["fraction"][:2] == [1.0, 1.0]
    assert sum(layer["fraction"]) == pytest.approx(4.0)
    assert usage["mean_active_fraction"] == pytest.approx(4 / 6)
    path = hf_attn_zoo.analysis.plot_head_usage(usage, tmp_path / "usage.png")
    assert path.stat().st_size > 1000 and path.with_suffix(".json").exists()
    hf_attn_zoo.analysis.reset_head_usage(model)
    assert hf_attn_zoo.analysis.head_usage(model)["mean_active_fraction"] is None


def test_distill_router_fits_the_output_norm_ranking(capsys):
    model = hf_attn_zoo.patch(_gqa_model(), "moh", router="learned", shared_heads=0, top_k=3)
    batches = [{"input_ids": torch.randint(3, 128, (2, 16))} for _ in range(3)]
    before = distill_router(model, batches, steps=1, lr=1e-9)
    after = distill_router(model, batches, steps=150, lr=5e-2)
    assert after["topk_agreement"] > before["topk_agreement"]
    assert after["loss"] < before["loss"]
    assert after["tokens"] == 96
    progress = capsys.readouterr().err  # both stages show a progress bar
    assert "distill_router: output norms" in progress and "3/3" in progress
    assert "distill_router: fitting routers" in progress


def test_patching_twice_is_refused():
    model = hf_attn_zoo.patch(_gqa_model(), "moh", layers=[0])
    with pytest.raises(hf_attn_zoo.errors.PatchConflictError, match=r"layers \[0\] already carry a 'moh' patch"):
        hf_attn_zoo.patch(model, "moh", layers="all")
    hf_attn_zoo.patch(model, "moh", layers=[1])
    assert [r["layers"] for r in hf_attn_zoo.applied_patches(model)] == [[0], [1]]


def test_a_compiled_moh_model_does_not_recompile_per_call():
    # the head-usage counters are Python state; counting them under torch.compile recompiled every forward
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = _gqa_model().eval()
    hf_attn_zoo.patch(model, "moh", router="learned")
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        for _ in range(3):
            out = compiled(ids).logits
        torch.testing.assert_close(out, model(ids).logits)
    assert counters["stats"]["unique_graphs"] == 1


def _ranked(model, **options):
    hf_attn_zoo.patch(model, "moh", router="learned", gate="binary", head_order="calibrated", **options)
    return list(moh_routers(model).values())


def test_calibrated_order_before_ranking_is_the_index_order():
    ids = torch.randint(1, 128, (2, 10))
    by_index, calibrated = _gqa_model(num_key_value_heads=6), _gqa_model(num_key_value_heads=6)
    calibrated.load_state_dict(by_index.state_dict())
    hf_attn_zoo.patch(by_index, "moh", router="learned", gate="binary", shared_heads=2, routed_heads=4, top_k=2)
    routers = _ranked(calibrated, shared_heads=2, routed_heads=4, top_k=2)
    randomize_new_parameters(by_index)
    for a, b in zip(moh_routers(by_index).values(), routers):
        b.proj.weight.data.copy_(a.proj.weight)
    with torch.no_grad():
        torch.testing.assert_close(calibrated(ids).logits, by_index(ids).logits)


def test_rank_heads_shares_the_heads_with_the_largest_outputs_and_saves_the_order(tmp_path):
    model = _gqa_model(num_key_value_heads=6)  # MHA: every head has its own values
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight.view(6, 16, -1)[4] *= 50  # head 4's outputs dominate
    routers = _ranked(model, shared_heads=1, routed_heads=5, top_k=2)
    ids = torch.randint(1, 128, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    orders = rank_heads(model, [{"input_ids": ids}])
    assert all(order[0] == 4 and sorted(order) == list(range(6)) for order in orders.values())
    assert routers[0].head_order.tolist() == orders["model.layers.0.self_attn.head_router"]
    gates = routers[0](torch.randn(1, 3, 96))
    assert (gates[..., 4] == 1).all()  # the shared head is now head 4
    with torch.no_grad():
        after = model(ids).logits
    assert not torch.allclose(before, after)
    model.save_pretrained(tmp_path)
    reloaded = hf_attn_zoo.from_pretrained(tmp_path).eval()
    assert list(moh_routers(reloaded).values())[0].head_order.tolist() == orders["model.layers.0.self_attn.head_router"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, after)


def test_rank_heads_keeps_kv_groups_whole_in_group_mode():
    model = _gqa_model()  # 6 heads, 3 KV groups of 2
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight.view(3, 16, -1)[2] *= 50  # the last KV group dominates
    _ranked(model, granularity="group", shared_heads=2, routed_heads=4, top_k=2)
    orders = rank_heads(model, [{"input_ids": torch.randint(1, 128, (1, 8))}])
    assert all(order[:2] == [4, 5] and sorted(order) == list(range(6)) for order in orders.values())


def test_rank_heads_needs_calibrated_layers():
    model = _gqa_model()
    hf_attn_zoo.patch(model, "moh", router="learned")
    with pytest.raises(InvalidOptionError, match="head_order='calibrated'"):
        rank_heads(model, [{"input_ids": torch.randint(1, 128, (1, 8))}])
