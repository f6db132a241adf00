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
    ],
)
def test_bad_selectors(selector, match):
    with pytest.raises(InvalidOptionError, match=match):
        resolve_layers(selector, 6)
