"""Canonical JSON: equal data always gives the same text, and so the same hash."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobcell.model.canonical import canonical_json, hash_value, sha256_hex

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                          allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)


def test_keys_are_sorted_and_there_is_no_whitespace() -> None:
    assert canonical_json({"b": 1, "a": [1, {"d": 2, "c": 3}]}) == '{"a":[1,{"c":3,"d":2}],"b":1}'


def test_non_ascii_is_kept_as_text() -> None:
    assert canonical_json({"k": "日本"}) == '{"k":"日本"}'


@pytest.mark.parametrize("value", [float("nan"), float("inf"), {"x": float("-inf")}])
def test_non_finite_numbers_are_rejected(value: Any) -> None:
    with pytest.raises(ValueError):
        canonical_json(value)


def test_hash_is_sha256_of_the_canonical_text() -> None:
    assert sha256_hex("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert hash_value({"a": 1}) == sha256_hex('{"a":1}')


@settings(max_examples=100, deadline=None)
@given(json_values)
def test_key_order_never_changes_the_text(value: Any) -> None:
    def reverse_keys(item: Any) -> Any:
        if isinstance(item, dict):
            return {k: reverse_keys(item[k]) for k in reversed(list(item))}
        if isinstance(item, list):
            return [reverse_keys(x) for x in item]
        return item

    assert canonical_json(reverse_keys(value)) == canonical_json(value)
    assert json.loads(canonical_json(value)) == value
