"""GSM8K helpers, as the offline `zoo_gsm8k` task builds and scores it: a held-out slice of the test split, the
prompt, and the flexible-extract answer check. `hf_attn_zoo.decoding.pick_beta` uses them as its defaults."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence

from ..assets.benchmarks import benchmark_path
from ..errors import InvalidOptionError

__all__ = ["gsm8k_correct", "gsm8k_heldout", "gsm8k_prompt"]


def gsm8k_heldout(n: int = 50, num_fewshot: int = 5) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """GSM8K problems for tuning beta, disjoint from what `zoo_gsm8k` scores with `limit`.

    The offline pack has only GSM8K's test split (1,319), and `zoo_gsm8k` scores its first `limit` problems (with
    5 shots drawn from the rest of test). This returns the **last** `n` problems and, before them, `num_fewshot`
    shot examples, all from the tail of the test split: disjoint from any `limit <= 1319 - n - num_fewshot` run.
    A full-test evaluation overlaps them; report it with that caveat, or exclude them.

    Returns:
        `(examples, fewshot)`: lists of `{"question", "answer"}` dicts (answers end in `#### <number>`).
    """
    with open(benchmark_path("gsm8k/test"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    rows = [{"question": r["question"], "answer": r["answer"]} for r in rows]
    if n < 1 or num_fewshot < 0 or n + num_fewshot > len(rows):
        raise InvalidOptionError(f"gsm8k_heldout: need 1 <= n and n + num_fewshot <= {len(rows)}")
    return rows[len(rows) - n :], rows[len(rows) - n - num_fewshot : len(rows) - n]


_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def _normalise_number(text: str) -> str:
    text = re.sub(r"(?s).*#### ", "", text.strip())
    return re.sub(r"\.$", "", text.replace(",", "").replace("$", "")).strip().lower()


def gsm8k_correct(example: Mapping[str, str], completion: str) -> float:
    """1.0 when the completion's answer equals the gold one, as `zoo_gsm8k`'s flexible-extract filter scores it
    (last number in the completion; commas, `$` and a final period ignored)."""
    matches = _NUMBER.findall(completion)
    if not matches:
        return 0.0
    predicted = next(m for m in matches[-1] if m)
    return float(_normalise_number(predicted) == _normalise_number(example["answer"]))


def gsm8k_prompt(example: Mapping[str, str], fewshot: Sequence[Mapping[str, str]] = ()) -> str:
    """`zoo_gsm8k`'s prompt: `Question: ...\\nAnswer: ...` shots separated by blank lines, then the question."""
    shots = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in fewshot)
    return f"{shots}Question: {example['question']}\nAnswer:"
