"""The upcycling study's stages on tiny models: build (cached), mixture tuning (dense baseline without router
losses), evaluation report."""

from __future__ import annotations

import json

import hf_attn_zoo
from hf_attn_zoo.upcycling import pipeline


def test_study_stages_on_tiny_models(dense_models, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "DOMAINS", {"docs": "python_stdlib_docs"})
    seed = str(dense_models["seed"])
    specialists = {"code": dense_models["code"], "prose": dense_models["prose"]}
    built = pipeline.build_moes(specialists, tmp_path, modes=["sparse", "bam"], seed=seed)
    assert hf_attn_zoo.applied_patches(hf_attn_zoo.from_pretrained(built["bam"]))[0]["method"] == "bam"
    stamp = (built["sparse"] / "model.safetensors").stat().st_mtime_ns
    assert pipeline.build_moes(specialists, tmp_path, modes=["sparse"], seed=seed)["sparse"] == built["sparse"]
    assert (built["sparse"] / "model.safetensors").stat().st_mtime_ns == stamp  # cached, not rebuilt

    overrides = [
        "train.max_steps=2",
        "train.batch_size=1",
        "train.save_steps=2",
        "train.logging_steps=1",
        "data.seq_len=32",
        "data.sources=[{corpus: python_stdlib_docs, max_docs: 4}]",
    ]
    tuned = pipeline.tune_on_mixture({"dense": seed, "bam": built["bam"]}, tmp_path, overrides=overrides)
    recipes = {name: (path.parent / "recipe.yaml").read_text() for name, path in tuned.items()}
    assert "moe:" not in recipes["dense"] and "load_balance_weight" in recipes["bam"]
    history = json.loads((tuned["bam"].parent / "result.json").read_text())["aux_loss_history"]
    assert history, "the MoE's router losses were not logged"

    paths = pipeline.evaluate_models({"seed": seed, "bam": tuned["bam"]}, tmp_path / "report", tasks=(), ppl_blocks=2)
    table = paths["md"].read_text()
    assert "held-out ppl: python_stdlib_docs" in table
    rows = json.loads(paths["json"].read_text())
    values = [r for r in rows["rows"] if r["task"] == "ppl_docs"][0]["values"]
    assert set(values) == {"seed", "bam"} and all(v > 1 for v in values.values())
    assert paths["png"].is_file()
