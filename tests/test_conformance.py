"""The conformance suite: every registered implementation, built-in or plugin, checked the same way.

Nobody writes a test for a new implementation: registering it is enough to be
checked here. Each check is a plain function in ``tests/conformance.py`` so that
``test_conformance_catches.py`` can show it fails on broken implementations.
"""

from __future__ import annotations

import pytest

import conformance
from attention_impls import list_impls

IMPLS = conformance.suite_params(list_impls())
# lengths that are not multiples of any block, window or chunk size
LENGTHS = (1, 3, 127, 1000)


@pytest.mark.parametrize("name", IMPLS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_shape_dtype_device(name: str, causal: bool) -> None:
    conformance.check_shape_dtype_device(name, causal=causal)


@pytest.mark.parametrize("name", IMPLS)
def test_finite_for_large_inputs(name: str) -> None:
    conformance.check_finite_large_inputs(name)


@pytest.mark.parametrize("name", IMPLS)
@pytest.mark.parametrize("seq_len", LENGTHS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_agrees_with_exact_float64(name: str, seq_len: int, causal: bool, record_property) -> None:
    error = conformance.check_against_reference(name, seq_len=seq_len, causal=causal)
    if error is not None:
        record_property("rel_error", error)  # reported in the junit xml and by -rA


@pytest.mark.parametrize("name", IMPLS)
@pytest.mark.parametrize("seq_len", (3, 127, 300))
def test_causal_does_not_see_the_future(name: str, seq_len: int) -> None:
    conformance.check_causal(name, seq_len=seq_len)


@pytest.mark.parametrize("name", IMPLS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gradients_finite(name: str, causal: bool) -> None:
    conformance.check_gradients(name, seq_len=130, causal=causal)


@pytest.mark.parametrize("name", IMPLS)
def test_same_seed_same_output(name: str) -> None:
    conformance.check_deterministic(name, seq_len=257)


@pytest.mark.parametrize("name", IMPLS)
def test_metadata_complete(name: str) -> None:
    conformance.check_metadata(name)
