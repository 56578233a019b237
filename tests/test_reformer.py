"""LSH attention (attention_impls/reformer.py): exact limits, a dense oracle of its candidate sets, no leakage."""

from __future__ import annotations

import math

import pytest
import torch

import conformance
from attention_impls import get
from attention_impls.lsh import MAX_SINGLE_ROTATION, auto_n_buckets, bucket_factors
from attention_impls.reformer import ReformerAttention
from reference import directional_derivatives_match, reference_attention, rel_error

HEADS = 2
HEAD_DIM = 16


def make_qv(seq_len: int, *, seed: int = 0, batch: int = 2, dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, HEADS, seq_len, HEAD_DIM, generator=gen, dtype=dtype)
    v = torch.randn(batch, HEADS, seq_len, HEAD_DIM, generator=gen, dtype=dtype) + 1.0
    return q, v


def build(seq_len: int, *, seed: int = 0, dtype: torch.dtype = torch.float64, **params) -> ReformerAttention:
    torch.manual_seed(seed)
    return get("reformer", params).build(seq_len=seq_len, heads=HEADS, head_dim=HEAD_DIM, dtype=dtype)


# --- exact limits -----------------------------------------------------------------------------------
@pytest.mark.parametrize("seq_len", [1, 3, 127, 200])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("n_hashes", [1, 3])
def test_one_bucket_is_exact_shared_qk_attention(seq_len: int, causal: bool, n_hashes: int) -> None:
    """One bucket, one chunk holding everything: every query sees every allowed key, self only as a fallback."""
    q, v = make_qv(seq_len)
    module = build(seq_len, bucket_size=256, n_buckets=1, n_hashes=n_hashes)
    out = module(q, torch.randn_like(q), v, causal=causal)  # k is ignored
    exact = reference_attention(q, q, v, causal=causal, shared_qk=True)
    assert rel_error(out, exact) <= 1e-10


def test_keys_are_ignored() -> None:
    q, v = make_qv(50)
    module = build(50, bucket_size=8)
    assert torch.equal(module(q, q, v), module(q, torch.randn_like(q), v))


def test_self_is_the_fallback_only() -> None:
    """Position 0 under a causal mask has nobody else: its output is exactly its value, in float32 too."""
    q, v = make_qv(100, dtype=torch.float32)
    out = build(100, dtype=torch.float32, bucket_size=8)(q, q, v, causal=True)
    assert torch.equal(out[:, :, 0], v[:, :, 0])


# --- the candidate sets, checked against a dense oracle ------------------------------------------------
def dense_oracle(module: ReformerAttention, q: torch.Tensor, v: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """Softmax attention over the multiset union of the rounds' candidates, built densely from the hashes.

    Non-causal (the paper's layout): sort positions by (bucket, position), cut into chunks of c; a query sees
    its chunk and the one before it (cyclically, if there are at least two chunks). Causal (bucket-aligned):
    a query sees the positions <= itself of its own bucket whose rank in the bucket is in its chunk or the
    chunk before it. Self is excluded unless no round offers anything else.
    """
    batch, heads, seq_len, head_dim = q.shape
    chunk = module.config.bucket_size
    buckets = module.hash_buckets(q, module.n_buckets_for(seq_len, causal=causal))  # (batch, heads, rounds, seq_len)
    counts = torch.zeros(batch, heads, seq_len, seq_len, dtype=q.dtype)
    positions = torch.arange(seq_len)
    for b in range(batch):
        for h in range(heads):
            for r in range(buckets.shape[2]):
                bucket = buckets[b, h, r]
                if causal:
                    same = bucket[:, None] == bucket[None, :]
                    rank = (same & (positions[None, :] < positions[:, None])).sum(dim=1)  # earlier, same bucket
                    block = rank // chunk
                    near = (block[None, :] == block[:, None]) | (block[None, :] == block[:, None] - 1)
                    member = same & near & (positions[None, :] <= positions[:, None])
                else:
                    order = sorted(range(seq_len), key=lambda i, bucket=bucket: (int(bucket[i]), i))
                    sorted_index = torch.empty(seq_len, dtype=torch.long)
                    sorted_index[torch.tensor(order)] = positions
                    block = sorted_index // chunk
                    n_chunks = math.ceil(seq_len / chunk)
                    member = block[None, :] == block[:, None]
                    if n_chunks > 1:
                        member |= block[None, :] == (block[:, None] - 1) % n_chunks
                counts[b, h] += member.to(q.dtype)
    eye = torch.eye(seq_len, dtype=torch.bool)
    others = counts.masked_fill(eye, 0.0)
    alone = others.sum(dim=-1, keepdim=True) == 0
    counts = torch.where(alone, eye.to(q.dtype).expand_as(counts), others)
    keys = q / q.norm(dim=-1, keepdim=True)
    scores = q @ keys.transpose(-2, -1) / math.sqrt(head_dim)
    scores = scores.masked_fill(counts == 0, float("-inf"))
    weights = counts * torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    return (weights / weights.sum(dim=-1, keepdim=True)) @ v


@pytest.mark.parametrize(
    "seq_len, params",
    [
        (37, {"bucket_size": 8, "n_hashes": 3}),
        (200, {"bucket_size": 16, "n_hashes": 2, "n_buckets": 8}),
        (130, {"bucket_size": 4, "n_hashes": 2, "n_buckets": 2 * MAX_SINGLE_ROTATION}),  # factorized hash
        (20, {"bucket_size": 16, "n_hashes": 2, "n_buckets": 4}),  # two chunks, the second one padded
    ],
)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_matches_dense_oracle(seq_len: int, params: dict, causal: bool) -> None:
    q, v = make_qv(seq_len, seed=3)
    module = build(seq_len, **params)
    out = module(q, q, v, causal=causal)
    assert rel_error(out, dense_oracle(module, q, v, causal=causal)) <= 1e-10


# --- hashing ------------------------------------------------------------------------------------------
def test_bucket_factors() -> None:
    assert bucket_factors(1) == ()
    assert bucket_factors(2) == (2,)
    assert bucket_factors(MAX_SINGLE_ROTATION) == (MAX_SINGLE_ROTATION,)
    assert bucket_factors(512) == (16, 32)
    assert bucket_factors(2 * 67) == (2 * 67,)  # no even factorization: one piece
    for n_buckets in (128, 256, 1024, 4096):
        factors = bucket_factors(n_buckets)
        assert math.prod(factors) == n_buckets and all(f % 2 == 0 for f in factors)
    assert auto_n_buckets(64, 64) == 1 and auto_n_buckets(65, 64) == 2 and auto_n_buckets(32768, 64) == 512
    assert auto_n_buckets(128, 64, causal=True) == 1 and auto_n_buckets(32768, 64, causal=True) == 256


def test_hash_is_angular_lsh() -> None:
    """argmax([xR, -xR]) per factor, mixed radix; invariant to scaling a vector."""
    q, _ = make_qv(300)
    module = build(300, bucket_size=8, n_hashes=2, n_buckets=16)
    buckets = module.hash_buckets(q, 16)  # (batch, heads, rounds, seq_len)
    assert buckets.shape == (2, HEADS, 2, 300) and buckets.min() >= 0 and buckets.max() < 16
    rot = module.rotations(16, device=q.device, dtype=q.dtype).view(HEAD_DIM, 2, 8)  # (d, rounds, 8)
    projected = torch.einsum("bhnd,drk->bhrnk", q, rot)
    assert torch.equal(buckets, torch.cat([projected, -projected], dim=-1).argmax(dim=-1))
    assert torch.equal(buckets, module.hash_buckets(3.5 * q, 16))
    factorized = module.hash_buckets(q, 256)
    assert factorized.min() >= 0 and factorized.max() < 256 and factorized.unique().numel() > 64


# --- approximation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_more_rounds_approximate_better(causal: bool) -> None:
    seq_len = 512
    errors = {}
    for n_hashes in (1, 2, 4):
        per_seed = []
        for seed in range(8):
            q, v = make_qv(seq_len, seed=seed, batch=1)
            module = build(seq_len, seed=seed, bucket_size=32, n_hashes=n_hashes)
            exact = reference_attention(q, q, v, causal=causal, shared_qk=True)
            per_seed.append(rel_error(module(q, q, v, causal=causal), exact))
        errors[n_hashes] = sum(per_seed) / len(per_seed)
    assert errors[1] > errors[2] > errors[4], errors
    assert errors[4] < 0.5, errors


# --- causality, gradients, determinism ----------------------------------------------------------------
@pytest.mark.parametrize("params", [{"bucket_size": 8, "n_hashes": 3}, {"bucket_size": 16, "n_buckets": 4}, {}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_causal_outputs_ignore_the_future_exactly(params: dict, dtype: torch.dtype) -> None:
    """Changing q and v after t (and so the future's hashes) leaves outputs up to t bit for bit unchanged."""
    seq_len = 300
    q, v = make_qv(seq_len, dtype=dtype)
    module = build(seq_len, dtype=dtype, **params)
    base = module(q, q, v, causal=True)
    gen = torch.Generator().manual_seed(5)
    for t in (0, 17, 150, 298):
        q2, v2 = q.clone(), v.clone()
        q2[:, :, t + 1 :] = torch.randn(q2[:, :, t + 1 :].shape, generator=gen, dtype=dtype) * 3
        v2[:, :, t + 1 :] = torch.randn(v2[:, :, t + 1 :].shape, generator=gen, dtype=dtype) * 3
        assert torch.equal(module(q2, q2, v2, causal=True)[:, :, : t + 1], base[:, :, : t + 1]), t


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gradients_finite_and_match_finite_differences(causal: bool) -> None:
    q, v = make_qv(40, batch=1)
    q.requires_grad_(True)
    v.requires_grad_(True)
    module = build(40, bucket_size=4, n_hashes=2)
    weights = torch.randn(1, HEADS, 40, HEAD_DIM, dtype=torch.float64)
    (module(q, q, v, causal=causal) * weights).sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(v.grad).all()
    assert q.grad.abs().sum() > 0 and v.grad.abs().sum() > 0
    # the hashes are piecewise constant: away from a bucket boundary the function is smooth
    assert directional_derivatives_match(lambda a, b: module(a, a, b, causal=causal), (q, v))


def test_same_seed_same_output_and_no_rng_use_in_forward() -> None:
    q, v = make_qv(257, dtype=torch.float32)
    first = build(257, seed=11, dtype=torch.float32)(q, q, v)
    module = build(257, seed=11, dtype=torch.float32)
    state = torch.get_rng_state()
    second = module(q, q, v)
    assert torch.equal(first, second)
    assert torch.equal(state, torch.get_rng_state()), "forward must not draw from torch's RNG"
    assert not torch.equal(first, build(257, seed=12, dtype=torch.float32)(q, q, v))


def test_large_inputs_stay_finite_and_batch_rows_are_independent() -> None:
    q, v = make_qv(200, dtype=torch.float32)
    module = build(200, dtype=torch.float32)
    for causal in (False, True):
        out = module(q * 1e3, q * 1e3, v * 1e3, causal=causal)
        assert torch.isfinite(out).all()
        alone = module(q[1:] * 1e3, q[1:] * 1e3, v[1:] * 1e3, causal=causal)
        torch.testing.assert_close(out[1:], alone)


def test_non_contiguous_inputs() -> None:
    q, v = make_qv(70)
    module = build(70, bucket_size=8)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    assert torch.equal(module(q_t, q_t, v), module(q, q, v))


# --- the conformance suite, until reformer joins the built-in list -------------------------------------
def test_conformance() -> None:
    for causal in (False, True):
        conformance.check_shape_dtype_device("reformer", causal=causal)
        conformance.check_gradients("reformer", seq_len=130, causal=causal)
        for seq_len in (1, 3, 127, 1000):
            assert conformance.check_against_reference("reformer", seq_len=seq_len, causal=causal) < 0.5
    conformance.check_finite_large_inputs("reformer")
    for seq_len in (3, 127, 300):
        conformance.check_causal("reformer", seq_len=seq_len)
    conformance.check_deterministic("reformer", seq_len=257)
    conformance.check_metadata("reformer")


# --- cost model and memory ----------------------------------------------------------------------------
def test_flops_and_memory_grow_linearly() -> None:
    spec = get("reformer")
    for causal in (False, True):
        small = spec.flops(batch=1, heads=8, seq_len=8192, head_dim=64, causal=causal)
        large = spec.flops(batch=1, heads=8, seq_len=65536, head_dim=64, causal=causal)
        assert 7.5 < large / small < 9.0
        mem_small = spec.memory_bytes(batch=1, heads=8, seq_len=8192, head_dim=64, itemsize=4, causal=causal)
        mem_large = spec.memory_bytes(batch=1, heads=8, seq_len=65536, head_dim=64, itemsize=4, causal=causal)
        assert 7.5 < mem_large / mem_small < 9.0
    # 4 rounds x (Q K^T + P V) over windows of 2 chunks, plus hashing
    attention = 4 * 4.0 * 8192 * 128 * 64
    assert attention < spec.flops(batch=1, heads=1, seq_len=8192, head_dim=64, causal=False) < 1.1 * attention


def test_no_dense_score_matrix() -> None:
    """Peak memory at n = 8192 stays far below one n x n matrix, and within the memory_bytes estimate."""
    from bench.measure.memory import measure_peak

    seq_len = 8192
    q = torch.randn(1, 1, seq_len, HEAD_DIM)
    module = get("reformer").build(seq_len=seq_len, heads=1, head_dim=HEAD_DIM)
    for causal in (False, True):
        with torch.no_grad():
            peak = measure_peak(lambda causal=causal: module(q, q, q, causal=causal), device="cpu").peak_bytes
        assert peak < seq_len * seq_len * 4 / 8
        estimate = get("reformer").memory_bytes(
            batch=1, heads=1, seq_len=seq_len, head_dim=HEAD_DIM, itemsize=4, causal=causal
        )
        assert peak <= estimate


def test_config_errors_are_clear() -> None:
    spec = get("reformer")
    for params, fragment in (
        ({"bucket_size": 0}, "bucket_size"),
        ({"n_hashes": 0}, "n_hashes"),
        ({"n_buckets": 3}, "n_buckets"),
    ):
        with pytest.raises(ValueError, match=fragment):
            spec.with_params(**params)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_no_grad_path_equals_recorded_path(causal: bool) -> None:
    """Under no_grad the blocks are written in place; the values are those of the recorded computation."""
    q, v = make_qv(150, dtype=torch.float32)
    module = build(150, dtype=torch.float32, bucket_size=16)
    with torch.no_grad():
        fast = module(q, q, v, causal=causal)
    recorded = module(q.requires_grad_(True), q, v, causal=causal)
    assert recorded.requires_grad and torch.equal(fast, recorded.detach())
