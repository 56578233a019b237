"""The conformance suite beyond self-attention, on every registered implementation, built-in or plugin:
grouped key/value heads, cross lengths (with and without the causal alignment) and decoding are right where
an implementation claims them and refused with a reason where it does not."""

from __future__ import annotations

import conformance_shapes
import pytest

import conformance
from attention_impls import list_impls

IMPLS = conformance.suite_params(list_impls())


@pytest.mark.parametrize("name", IMPLS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_grouped_heads(name: str, causal: bool) -> None:
    conformance_shapes.check_grouped_heads(name, causal=causal)


@pytest.mark.parametrize("name", IMPLS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_cross_lengths(name: str, causal: bool) -> None:
    conformance_shapes.check_cross_lengths(name, causal=causal)


@pytest.mark.parametrize("name", IMPLS)
def test_decode_steps_equal_the_causal_forward(name: str) -> None:
    conformance_shapes.check_decode(name)
