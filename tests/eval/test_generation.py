"""`generate_until` through the lm-eval model class: a batch of 4 (left padding, one attention mask, the stop
sequences of each gen-kwargs group) gives the same strings as one request at a time, unpatched and patched."""

from __future__ import annotations

import pytest
from lm_eval.api.instance import Instance

from hf_attn_zoo.assets.corpora import held_out_texts
from hf_attn_zoo.eval_harness import evaluate
from hf_attn_zoo.eval_harness.lm_model import ZooLM


PATCHES = {
    "none": None,
    # a window shorter than most prompts: the bounded cache evicts, and each row's sinks follow its padding
    "sliding_window": {"method": "sliding_window", "window": 8, "sinks": 2},
    "moh": {"method": "moh", "router": "onorm", "top_k": 2},
}
# two gen-kwargs groups, so a batch never mixes them; stop strings the tiny model's text contains
GREEDY = {"until": ["\n", "lo"], "max_gen_toks": 24, "do_sample": False}
SHORT = {"until": ["ue"], "max_gen_toks": 12, "do_sample": False, "temperature": 0.0}


def _requests(gen_kwargs: list[dict]) -> list[Instance]:
    # 8 contexts of 40..300 characters: a batch of 4 pads each row to the longest on the left
    contexts = [text[: 40 + 37 * i] for i, text in enumerate(held_out_texts("python_stdlib_docs", 8))]
    return [
        Instance("generate_until", {}, (context, dict(gen_kwargs[i % len(gen_kwargs)])), i)
        for i, context in enumerate(contexts)
    ]


@pytest.mark.parametrize("patch", list(PATCHES))
def test_batch_of_4_generates_as_batch_of_1(tiny_model_dir, patch):
    spec = PATCHES[patch]
    outputs = {}
    for batch_size in (1, 4):
        lm = ZooLM(
            pretrained=str(tiny_model_dir),
            device="cpu",
            batch_size=batch_size,
            patch_options=spec,
            efficiency=False,
        )
        outputs[batch_size] = lm.generate_until(_requests([GREEDY, SHORT]), disable_tqdm=True)
    assert outputs[4] == outputs[1]
    # the stop strings cut the text: without them, every row continues past where it stopped
    unstopped = lm.generate_until(_requests([{**GREEDY, "until": []}]), disable_tqdm=True)
    stopped = outputs[1][::2]
    assert all(full.startswith(out) for full, out in zip(unstopped[::2], stopped))
    assert any(len(full) > len(out) for full, out in zip(unstopped[::2], stopped))
    assert not any(stop in out for out in stopped for stop in GREEDY["until"])


def test_a_generation_task_at_batch_4_as_at_batch_1(tiny_model_dir):
    """zoo_passkey_1k end to end (few-hundred-token prompts, `until` and `max_gen_toks` from the task's YAML) on a
    sliding-window model whose window is far shorter than the prompts."""
    responses = {}
    for batch_size in (1, 4):
        results = evaluate(
            tiny_model_dir,
            ["zoo_passkey_1k"],
            limit=4,
            batch_size=batch_size,
            device="cpu",
            log_samples=True,
            patches=[{"method": "sliding_window", "window": 64, "sinks": 4}],
            model_args={"efficiency": False},
            metadata={"zoo_passkey_docs": 4},
        )
        samples = sorted(results["samples"]["zoo_passkey_1k"], key=lambda s: s["doc_id"])
        responses[batch_size] = [s["resps"] for s in samples]
    assert len(responses[1]) == 4
    assert responses[4] == responses[1]
