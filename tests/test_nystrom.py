"""Nyströmformer (attention_impls/nystrom.py): landmarks, the iterative pseudo-inverse, exactness with as many
landmarks as positions, grouped heads, and the public package's NystromAttention on the same inputs."""

from __future__ import annotations

import pytest
import torch

from attention_impls.nystrom import NystromAttention, NystromConfig, iterative_pinv, segment_means
from reference import reference_attention, rel_error

HEAD_DIM = 16


def make_qkv(*, heads=2, kv_heads=2, seq_len=60, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, seq_len, HEAD_DIM, generator=gen, dtype=dtype)
    k = torch.randn(2, kv_heads, seq_len, HEAD_DIM, generator=gen, dtype=dtype)
    v = torch.randn(2, kv_heads, seq_len, HEAD_DIM, generator=gen, dtype=dtype) + 1.0
    return q, k, v


def build(seq_len: int, *, heads=2, kv_heads=2, **params) -> NystromAttention:
    config = NystromConfig(**params)
    return NystromAttention(config, seq_len=seq_len, heads=heads, head_dim=HEAD_DIM, kv_heads=kv_heads)


@pytest.mark.parametrize(("n", "landmarks"), [(12, 4), (13, 4), (7, 7), (100, 8)])
def test_segment_means(n: int, landmarks: int) -> None:
    """Segment s holds the positions p with floor(p l / n) = s: contiguous, lengths differing by at most one."""
    x = torch.randn(3, n, 5, dtype=torch.float64)
    means = segment_means(x, landmarks)
    segment = [p * landmarks // n for p in range(n)]
    for s in range(landmarks):
        members = [p for p in range(n) if segment[p] == s]
        assert members == list(range(members[0], members[-1] + 1))
        assert torch.allclose(means[:, s], x[:, members].mean(dim=1))
    sizes = torch.bincount(torch.tensor(segment))
    assert sizes.max() - sizes.min() <= 1


def test_iterative_pinv_converges_to_the_pseudo_inverse() -> None:
    """On softmax matrices (the A it inverts): the error falls with the steps, to rounding."""
    a = torch.softmax(torch.randn(4, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), -1)
    exact = torch.linalg.pinv(a)
    errors = [rel_error(iterative_pinv(a, steps), exact) for steps in (2, 6, 12, 30)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-10


@pytest.mark.parametrize("seq_len", [1, 5, 40])
def test_as_many_landmarks_as_positions_is_exact(seq_len: int) -> None:
    """l = n: the landmarks are the positions, F = A = B = the attention matrix and Z its inverse."""
    q, k, v = make_qkv(seq_len=seq_len)
    out = build(seq_len, landmarks=64, pinv_iterations=40)(q, k, v)
    assert rel_error(out, reference_attention(q, k, v)) <= 1e-9


def test_default_approximates_attention_on_random_inputs() -> None:
    q, k, v = make_qkv(seq_len=500)
    assert rel_error(build(500)(q, k, v), reference_attention(q, k, v)) < 0.2


def test_grouped_heads_read_their_key_value_head() -> None:
    q, k, v = make_qkv(heads=4, kv_heads=2, seq_len=90)
    grouped = build(90, heads=4, kv_heads=2, landmarks=16)(q, k, v)
    repeated = build(90, heads=4, landmarks=16)(q, *(x.repeat_interleave(2, dim=1) for x in (k, v)))
    assert rel_error(grouped, repeated) <= 1e-12


def test_float16_matches_float32() -> None:
    q, k, v = make_qkv(seq_len=256, dtype=torch.float32)
    expected = build(256)(q, k, v)
    out = build(256)(*(x.half() for x in (q, k, v)))
    assert out.dtype == torch.float16
    assert rel_error(out, expected) < 1e-2


def test_same_function_as_nystrom_attention() -> None:
    """nystrom-attention's NystromAttention without its convolution, its projections set to give our q, k, v and
    to hand the heads' output on unchanged: the same attention (one head: its iteration's start takes the largest
    sums over the whole batch, ours over each matrix)."""
    package = pytest.importorskip("nystrom_attention")
    seq_len, landmarks = 128, 16
    peer = package.NystromAttention(
        dim=HEAD_DIM, dim_head=HEAD_DIM, heads=1, num_landmarks=landmarks, pinv_iterations=6, residual=False
    ).double()
    x = torch.randn(1, seq_len, HEAD_DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    weights = torch.randn(3 * HEAD_DIM, HEAD_DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        peer.to_qkv.weight.copy_(weights)
        peer.to_out[0].weight.copy_(torch.eye(HEAD_DIM, dtype=torch.float64))
        peer.to_out[0].bias.zero_()
    q, k, v = (t.unsqueeze(1) for t in (x @ weights.T).chunk(3, dim=-1))  # (1, 1, seq_len, head_dim)
    ours = build(seq_len, heads=1, kv_heads=1, landmarks=landmarks)(q, k, v)
    assert rel_error(ours[:, 0], peer(x)) <= 1e-10
