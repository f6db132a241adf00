import pytest

from hf_attn_zoo.errors import InvalidOptionError
from hf_attn_zoo.layers import resolve_layers


@pytest.mark.parametrize(
    "selector,expected",
    [
        ("all", [0, 1, 2, 3, 4, 5]),
        ("first_half", [0, 1, 2]),
        ("second_half", [3, 4, 5]),
        ("every_2nd", [1, 3, 5]),
        ("every_3rd", [2, 5]),
        (4, [4]),
        ([5, -6], [0, 5]),
        ("every_7th", []),
        ("except_every_2nd", [0, 2, 4]),
        ("except_every_3rd", [0, 1, 3, 4]),
        ("except_first_half", [3, 4, 5]),
        ("except_every_7th", [0, 1, 2, 3, 4, 5]),
    ],
)
def test_selectors(selector, expected):
    assert resolve_layers(selector, 6) == expected


@pytest.mark.parametrize(
    "selector,match",
    [
        ("some", "not a layer selector"),
        ([7], "has 6 layers"),
        ([1, 1], "twice"),
        (["1"], "must be integers"),
        (True, "not a layer selector"),
        ("every_0th", "not a layer selector"),
        ("except_all", "'except_' takes one of"),
        ("except_except_every_2nd", "'except_' takes one of"),
        ("except_some", "not a layer selector"),
    ],
)
def test_bad_selectors(selector, match):
    with pytest.raises(InvalidOptionError, match=match):
        resolve_layers(selector, 6)


@pytest.mark.parametrize("selector", ["every_2nd", "every_3rd", "first_half", "second_half", "every_5th"])
@pytest.mark.parametrize("num_layers", [1, 2, 6, 7, 30])
def test_except_is_the_complement(selector, num_layers):
    kept = resolve_layers(selector, num_layers)
    others = resolve_layers(f"except_{selector}", num_layers)
    assert sorted(kept + others) == list(range(num_layers))
