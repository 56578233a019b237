"""The approximation error the worker records: its exact reference and its peaked inputs."""

from __future__ import annotations

import math

import pytest
import torch

from attention_impls import get
from bench.families import ERROR_FIELDS, ERROR_ROWS, PEAKED_SCORE_STD
from bench.measure.accuracy import approximation_errors, compared_rows, exact_reference
from bench.measure.inputs import peaked_scale
from reference import reference_attention, rel_error


def _scores(q: torch.Tensor, k: torch.Tensor, *, shared_qk: bool) -> torch.Tensor:
    if shared_qk:
        k = q / q.norm(dim=-1, keepdim=True)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    off_diagonal = ~torch.eye(q.shape[2], dtype=torch.bool)  # with shared QK a query's own score is |q|/sqrt(d)
    return scores[..., off_diagonal]


@pytest.mark.parametrize("shared_qk", [False, True])
def test_peaked_inputs_have_the_stated_score_spread(shared_qk: bool) -> None:
    torch.manual_seed(0)
    q, k = torch.randn(2, 1, 2, 512, 64, dtype=torch.float64)
    scale = peaked_scale(64, shared_qk=shared_qk)
    spread = float(_scores(q * scale, k * scale, shared_qk=shared_qk).std())
    assert spread == pytest.approx(PEAKED_SCORE_STD, rel=0.05)
    random_spread = float(_scores(q, k, shared_qk=shared_qk).std())
    assert random_spread < PEAKED_SCORE_STD / 3


@pytest.mark.parametrize("causal", [False, True])
def test_exact_reference_matches_the_test_reference(causal: bool) -> None:
    torch.manual_seed(1)
    q, k, v = torch.randn(3, 1, 2, 300, 16, dtype=torch.float64)
    expected = reference_attention(q, k, v, causal=causal)
    assert rel_error(exact_reference(q, k, v, causal=causal, shared_qk=False), expected) < 1e-12


def test_an_exact_module_has_no_error_and_an_approximate_one_has_some() -> None:
    torch.manual_seed(2)
    q, k, v = torch.randn(3, 1, 2, 512, 64)
    exact = get("sdpa").build(seq_len=512, heads=2, head_dim=64)
    errors = approximation_errors(exact, get("sdpa"), q, k, v, causal=False, seed=0)
    assert set(errors) == set(ERROR_FIELDS.values())
    assert max(errors.values()) < 1e-5, errors
    local = get("local", {"window": 16})
    errors = approximation_errors(local.build(seq_len=512, heads=2, head_dim=64), local, q, k, v, causal=False, seed=0)
    assert errors["rel_error_random"] > 0.1 and errors["rel_error_peaked"] > 0.1, errors


def test_compared_rows_span_the_sequence() -> None:
    assert compared_rows(300).tolist() == list(range(300))
    rows = compared_rows(5 * ERROR_ROWS + 7)
    assert len(rows) == ERROR_ROWS and len(set(rows.tolist())) == ERROR_ROWS
    assert rows[0] == 0 and rows[-1] == 5 * ERROR_ROWS + 6


@pytest.mark.parametrize("shared_qk", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_the_reference_on_some_rows_is_those_rows_of_the_whole(causal: bool, shared_qk: bool) -> None:
    torch.manual_seed(3)
    q = torch.randn(1, 2, 200, 16, dtype=torch.float64)
    k, v = torch.randn(2, 1, 2, 260, 16, dtype=torch.float64)
    if shared_qk:
        k, v = k[:, :, :200], v[:, :, :200]
    rows = torch.tensor([0, 5, 99, 199])
    whole = exact_reference(q, k, v, causal=causal, shared_qk=shared_qk)
    some = exact_reference(q, k, v, causal=causal, shared_qk=shared_qk, rows=rows)
    assert torch.equal(some, whole[:, :, rows])
