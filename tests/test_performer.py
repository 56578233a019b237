"""Performer (attention_impls/performer.py): the random features, the estimator they define, its gradients,
decoding's rescaled sums, and the public package's FastAttention on the same features."""

from __future__ import annotations

import pytest
import torch

from attention_impls.base import causal_keep
from attention_impls.performer import PerformerAttention, PerformerConfig, orthogonal_features
from reference import reference_attention, rel_error

HEAD_DIM = 16


def make_qkv(*, heads=2, kv_heads=2, q_len=50, kv_len=50, scale=1.0, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, q_len, HEAD_DIM, generator=gen, dtype=dtype) * scale
    k = torch.randn(2, kv_heads, kv_len, HEAD_DIM, generator=gen, dtype=dtype) * scale
    v = torch.randn(2, kv_heads, kv_len, HEAD_DIM, generator=gen, dtype=dtype) + 1.0
    return q, k, v


def build(*, heads=2, kv_heads=2, q_len=50, kv_len=50, dtype=torch.float64, seed=0, **params) -> PerformerAttention:
    torch.manual_seed(seed)
    config = PerformerConfig(**params)
    module = PerformerAttention(config, seq_len=kv_len, heads=heads, head_dim=HEAD_DIM, q_len=q_len, kv_heads=kv_heads)
    return module.to(dtype)


def favor(q, k, v, projection, *, causal: bool) -> torch.Tensor:
    """The estimator written out whole, without shifts: phi(x) = exp(w . x' - |x'|^2 / 2), x' = x / d^(1/4);
    out = (phi(Q) phi(K)^T, causally masked) V over its row sums. Grouped heads read their key/value head."""
    scale = q.shape[-1] ** -0.25

    def phi(x):
        x = x * scale
        return torch.exp(x @ projection.T - x.square().sum(dim=-1, keepdim=True) / 2)

    group = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(group, dim=1) for x in (k, v))
    weights = phi(q) @ phi(k).transpose(-2, -1)  # (batch, heads, q_len, kv_len)
    if causal:
        weights = weights * causal_keep(q.shape[2], k.shape[2], q.device)
    return (weights @ v) / weights.sum(dim=-1, keepdim=True)


def test_features_are_orthogonal_in_blocks_with_gaussian_norms() -> None:
    rows = orthogonal_features(40, HEAD_DIM, generator=torch.Generator().manual_seed(0))
    assert rows.shape == (40, HEAD_DIM)
    for start in range(0, 40, HEAD_DIM):
        block = rows[start : start + HEAD_DIM]
        gram = block @ block.T
        off_diagonal = gram - torch.diag(gram.diagonal())
        assert off_diagonal.abs().max() < 1e-10 * gram.diagonal().max()
    many = orthogonal_features(4096, HEAD_DIM, generator=torch.Generator().manual_seed(1))
    # the norm of a N(0, I_16) vector: mean square 16
    assert many.square().sum(dim=1).mean().item() == pytest.approx(HEAD_DIM, rel=0.05)


def test_features_estimate_the_softmax_kernel() -> None:
    """Averaged over many features, phi(q') . phi(k') is exp(q . k / sqrt(d)) (small inputs: low variance)."""
    q, k, _ = make_qkv(q_len=8, kv_len=8, scale=0.3)
    projection = orthogonal_features(1 << 16, HEAD_DIM, generator=torch.Generator().manual_seed(0))
    scale = HEAD_DIM**-0.25
    phi_q, phi_k = (
        torch.exp((x * scale) @ projection.T - (x * scale).square().sum(-1, keepdim=True) / 2) for x in (q, k)
    )
    estimate = phi_q @ phi_k.transpose(-2, -1) / projection.shape[0]
    assert rel_error(estimate, torch.exp(q @ k.transpose(-2, -1) / HEAD_DIM**0.5)) < 0.01


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("heads", "kv_heads", "q_len", "kv_len"), [(2, 2, 50, 50), (4, 2, 50, 50), (2, 2, 20, 70)])
def test_equals_the_estimator_written_out(causal: bool, heads: int, kv_heads: int, q_len: int, kv_len: int) -> None:
    """The shifts and the blocked linear attention change nothing: the module is the unshifted estimator (to
    rounding), across chunks (chunk 8), grouped heads and cross lengths."""
    shape = {"heads": heads, "kv_heads": kv_heads, "q_len": q_len, "kv_len": kv_len}
    q, k, v = make_qkv(**shape)
    module = build(**shape, features=64, chunk_size=8)
    out = module(q, k, v, causal=causal)
    assert rel_error(out, favor(q, k, v, module.projection, causal=causal)) <= 1e-10


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_equal_the_estimators(causal: bool) -> None:
    q, k, v = (x.requires_grad_(True) for x in make_qkv(heads=4, kv_heads=2))
    module = build(heads=4, kv_heads=2, features=48, chunk_size=8)
    direction = torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(5))
    ours = torch.autograd.grad((module(q, k, v, causal=causal) * direction).sum(), (q, k, v))
    written = torch.autograd.grad((favor(q, k, v, module.projection, causal=causal) * direction).sum(), (q, k, v))
    for mine, theirs in zip(ours, written, strict=True):
        assert rel_error(mine, theirs) <= 1e-9


def test_more_features_approximate_softmax_attention_better() -> None:
    """On small inputs the error falls with the number of features (mean over draws of the features)."""
    q, k, v = make_qkv(q_len=100, kv_len=100, scale=0.3)
    exact = reference_attention(q, k, v)

    def mean_error(features: int) -> float:
        errors = [rel_error(build(features=features, seed=seed)(q, k, v), exact) for seed in range(8)]
        return sum(errors) / len(errors)

    few, many = mean_error(8), mean_error(512)
    assert many < few / 3, (few, many)


def test_large_inputs_stay_finite_in_float32() -> None:
    """Exponents beyond float32's range without the shifts (|x'|^2 / 2 ~ 50 and more): the float32 result is
    the float64 one (the shifts cancel); non-causal even where the causal keys' one shift is stretched."""
    module = build(features=64, chunk_size=8)
    for scale, modes in ((5.0, (False, True)), (9.0, (False,))):
        q, k, v = make_qkv(scale=scale)
        for causal in modes:
            expected = module.double()(q, k, v, causal=causal)
            out = module.float()(*(x.float() for x in (q, k, v)), causal=causal)
            assert torch.isfinite(out).all()
            assert rel_error(out, expected) < 1e-5, (scale, causal)


def test_decoding_rescales_its_sums_when_a_key_outgrows_them() -> None:
    """A key whose exponent exceeds every earlier one (a large key after small ones): the sums are rescaled to
    the new shift; each step still equals the causal forward's row."""
    q, k, v = make_qkv(q_len=12, kv_len=12)
    k[:, :, 8] *= 6.0  # its features would be ~e^20 times the earlier keys' largest
    module = build(q_len=12, kv_len=12, features=32)
    expected = module(q, k, v, causal=True)
    cache = module.prefill(k[:, :, :4], v[:, :, :4], capacity=12)
    for t in range(4, 12):
        out, cache = module.decode_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], cache)
        assert rel_error(out, expected[:, :, t : t + 1]) <= 1e-10, t
    assert cache.tensors["shift"].max() > 0


@pytest.mark.parametrize("causal", [False, True])
def test_same_function_as_performer_pytorch(causal: bool) -> None:
    """performer-pytorch's FastAttention with our random features computes the same attention, up to the 1e-4
    it adds to every feature (our features have none: the output does not depend on the shifts)."""
    performer_pytorch = pytest.importorskip("performer_pytorch")
    q, k, v = make_qkv(q_len=64, kv_len=64, scale=0.5)
    module = build(q_len=64, kv_len=64, features=64, chunk_size=16)
    peer = performer_pytorch.FastAttention(dim_heads=HEAD_DIM, nb_features=64, causal=causal).double()
    peer.projection_matrix.copy_(module.projection)
    assert rel_error(module(q, k, v, causal=causal), peer(q, k, v)) < 1e-3
