"""The input families of the approximation error: shapes, determinism, and the structure each claims."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from attention_impls import get
from bench.families import CLUSTERS, ERROR_FIELDS, FAMILIES, LOCAL_WIDTH, LOW_RANK
from bench.measure.accuracy import approximation_errors
from bench.measure.inputs import family_inputs
from bench.results import iter_records

N = 1024


def _timed(q_len: int = N, kv_len: int = N, heads: int = 4, kv_heads: int = 4, dtype=torch.float32):
    torch.manual_seed(0)
    q = torch.randn(2, heads, q_len, 32, dtype=dtype)
    k, v = torch.randn(2, 2, kv_heads, kv_len, 32, dtype=dtype)
    return q, k, v


def _attention(q, k, *, shared_qk: bool = False) -> torch.Tensor:
    """(batch, heads, q_len, kv_len) exact self-attention weights in float64 (keys shared over query groups)."""
    q, k = q.double(), k.double()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    if shared_qk:
        k = q / q.norm(dim=-1, keepdim=True)
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize(("q_len", "kv_len", "kv_heads"), [(N, N, 4), (256, N, 2), (N, N, 1)])
def test_a_family_keeps_the_timed_shapes_and_is_seeded(family: str, q_len: int, kv_len: int, kv_heads: int) -> None:
    timed = _timed(q_len, kv_len, kv_heads=kv_heads)
    drawn = family_inputs(family, *timed, shared_qk=False, seed=5)
    for x, t in zip(drawn, timed, strict=True):
        assert x.shape == t.shape and x.dtype == t.dtype and x.device == t.device
        assert torch.isfinite(x).all()
    again = family_inputs(family, *timed, shared_qk=False, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(drawn, again, strict=True))
    if family not in ("random", "peaked"):  # the timed inputs' own values do not enter: the seed does
        other = family_inputs(family, *timed, shared_qk=False, seed=6)
        assert not torch.equal(drawn[0], other[0])


def _mass_near_diagonal(weights: torch.Tensor, within: float) -> float:
    n = weights.shape[-1]
    pos = torch.arange(n)
    near = (pos.view(-1, 1) - pos.view(1, -1)).abs() <= within
    return float((weights * near).sum(-1).mean())


@pytest.mark.parametrize("shared_qk", [False, True])
def test_local_inputs_attend_near_the_diagonal(shared_qk: bool) -> None:
    q, k, _ = family_inputs("local", *_timed(), shared_qk=shared_qk, seed=0)
    assert _mass_near_diagonal(_attention(q, k, shared_qk=shared_qk), LOCAL_WIDTH) > 0.95
    q, k, _ = _timed()
    assert _mass_near_diagonal(_attention(q, k), LOCAL_WIDTH) < 0.2  # random inputs do not


def test_low_rank_inputs_have_scores_of_that_rank() -> None:
    q, k, _ = family_inputs("low_rank", *_timed(kv_heads=2), shared_qk=False, seed=0)
    scores = q.double() @ k.double().repeat_interleave(2, dim=1).transpose(-2, -1)
    singular = torch.linalg.svdvals(scores)  # (batch, heads, N)
    assert (singular[..., LOW_RANK - 1] > 1e-2 * singular[..., 0]).all()
    assert (singular[..., LOW_RANK] < 1e-4 * singular[..., 0]).all()  # float32 rounding only


@pytest.mark.parametrize("shared_qk", [False, True])
def test_clustered_inputs_attend_within_one_cluster(shared_qk: bool) -> None:
    q, k, _ = family_inputs("clustered", *_timed(), shared_qk=shared_qk, seed=0)
    weights = _attention(q, k, shared_qk=shared_qk)
    # a query's top n / CLUSTERS keys (its cluster's size) hold nearly all its weight, spread among them
    top = weights.topk(N // CLUSTERS, dim=-1).values
    assert float(top.sum(-1).mean()) > 0.9
    effective_keys = torch.exp(-(weights * weights.clamp_min(1e-300).log()).sum(-1))
    assert float(effective_keys.median()) > N / CLUSTERS / 4


def test_each_mechanism_is_close_on_the_structure_it_bets_on() -> None:
    """Local attention is nearly exact on local inputs and LSH on clustered ones, not on random inputs."""
    q, k, v = _timed()
    local = get("local")
    errors = approximation_errors(local.build(seq_len=N, heads=4, head_dim=32), local, q, k, v, causal=False, seed=0)
    assert errors[ERROR_FIELDS["local"]] < 0.01 < 1 < errors[ERROR_FIELDS["random"]], errors
    torch.manual_seed(0)
    reformer = get("reformer")
    module = reformer.build(seq_len=N, heads=4, head_dim=32)
    errors = approximation_errors(module, reformer, q, k, v, causal=False, seed=0)
    assert errors[ERROR_FIELDS["clustered"]] < 0.1 < errors[ERROR_FIELDS["random"]], errors


def test_records_with_the_old_error_field_read_as_random(tmp_path: Path) -> None:
    path = tmp_path / "old.jsonl"
    record = {"schema_version": 1, "case": {}, "status": "ok", "rel_error": 0.5, "rel_error_peaked": 0.7}
    path.write_text(json.dumps(record) + "\n")
    [(_, read, problem)] = list(iter_records(path))
    assert problem is None
    assert read["rel_error_random"] == 0.5 and read["rel_error_peaked"] == 0.7 and "rel_error" not in read
