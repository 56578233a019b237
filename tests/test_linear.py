"""Linear attention (attention_impls/linear.py) against its own quadratic form."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attention_impls.linear as linear_module
from attention_impls.linear import FEATURE_MAPS, LinearAttention, LinearConfig

HEADS = 2
HEAD_DIM = 8


def quadratic_form(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, feature_map: str, eps: float
) -> torch.Tensor:
    """phi(Q) phi(K)^T (lower-triangular when causal), rows normalized by their sums, times V."""
    phi = {
        "elu": lambda x: torch.nn.functional.elu(x) + 1,
        "relu": torch.relu,
        "softmax": lambda x: torch.softmax(x, dim=-1),
    }[feature_map]
    weights = phi(q) @ phi(k).transpose(-2, -1)  # (batch, heads, seq_len, seq_len)
    if causal:
        weights = torch.tril(weights)
    return (weights @ v) / weights.sum(dim=-1, keepdim=True).clamp_min(eps)


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> int:
    """Vectorized steps of about 300 positions at these shapes, so short tests cross several blocks."""
    elements = 2 * HEADS * HEAD_DIM * 300
    monkeypatch.setattr(linear_module, "_BLOCK_ELEMENTS", elements)
    monkeypatch.setattr(linear_module, "_CAUSAL_BLOCK_ELEMENTS", elements)
    return 300


def make_qkv(seq_len: int, *, dtype: torch.dtype = torch.float64, scale: float = 1.0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shape = (2, HEADS, seq_len, HEAD_DIM)
    return tuple(torch.randn(shape, generator=gen, dtype=dtype) * scale for _ in range(3))


def build(seq_len: int, **params) -> LinearAttention:
    return LinearAttention(LinearConfig(**params), seq_len=seq_len, heads=HEADS, head_dim=HEAD_DIM)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def test_feature_maps_match_the_test_copy() -> None:
    assert set(FEATURE_MAPS) == {"elu", "relu", "softmax"}


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize(("seq_len", "chunk_size"), [(1, 64), (3, 2), (127, 64), (127, 10), (1000, 64), (1000, 48)])
def test_equals_quadratic_form(seq_len: int, chunk_size: int, causal: bool) -> None:
    q, k, v = make_qkv(seq_len)
    out = build(seq_len, chunk_size=chunk_size)(q, k, v, causal=causal)
    ref = quadratic_form(q, k, v, causal=causal, feature_map="elu", eps=LinearConfig.eps)
    assert out.shape == q.shape
    assert rel_err(out, ref) <= 1e-10


@pytest.mark.parametrize("feature_map", ["relu", "softmax"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_other_feature_maps_equal_quadratic_form(feature_map: str, causal: bool) -> None:
    q, k, v = make_qkv(127)
    out = build(127, feature_map=feature_map, chunk_size=16)(q, k, v, causal=causal)
    ref = quadratic_form(q, k, v, causal=causal, feature_map=feature_map, eps=LinearConfig.eps)
    assert rel_err(out, ref) <= 1e-10


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("chunk_size", [100, 64, 7])
def test_spans_several_blocks(causal: bool, chunk_size: int, small_blocks: int) -> None:
    """Several vectorized blocks; the length a multiple of neither block nor chunk."""
    q, k, v = make_qkv(2500)
    out = build(2500, chunk_size=chunk_size)(q, k, v, causal=causal)
    ref = quadratic_form(q, k, v, causal=causal, feature_map="elu", eps=LinearConfig.eps)
    assert rel_err(out, ref) <= 1e-10


def test_same_result_with_and_without_autograd(small_blocks: int) -> None:
    """Without autograd each block is written straight into the output; with it, non-causal runs the same blocks
    inside one autograd function and causal runs one block (a slice's backward would fill a whole-input
    gradient per block): the same result but for the order of the sums."""
    q, k, v = make_qkv(1500)
    module = build(1500)
    for causal in (False, True):
        with torch.no_grad():
            plain = module(q, k, v, causal=causal)
        tracked = module(q.clone().requires_grad_(True), k, v, causal=causal)
        assert tracked.requires_grad
        torch.testing.assert_close(plain, tracked.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("blocks", ["one", "several"])
def test_causal_ignores_the_future(blocks: str, request: pytest.FixtureRequest) -> None:
    if blocks == "several":
        request.getfixturevalue("small_blocks")
    q, k, v = make_qkv(300)
    module = build(300, chunk_size=64)
    base = module(q, k, v, causal=True)
    for t in (0, 63, 100, 298):
        changed = [x.clone() for x in (q, k, v)]
        for x in changed:
            x[:, :, t + 1 :] = torch.randn_like(x[:, :, t + 1 :]) * 3
        out = module(*changed, causal=True)
        assert torch.equal(out[:, :, : t + 1], base[:, :, : t + 1]), f"future leaked into t <= {t}"


@pytest.mark.parametrize("feature_map", sorted(FEATURE_MAPS))
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gradients_finite(feature_map: str, causal: bool) -> None:
    q, k, v = (x.requires_grad_(True) for x in make_qkv(130))
    out = build(130, feature_map=feature_map, chunk_size=32)(q, k, v, causal=causal)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    for name, x in (("q", q), ("k", k), ("v", v)):
        assert torch.isfinite(x.grad).all(), f"non-finite gradient for {name}"
        assert x.grad.abs().sum() > 0, f"zero gradient for {name}"


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gradients_match_quadratic_form(causal: bool, small_blocks: int) -> None:
    inputs = make_qkv(700)
    grads = []
    for fn in (
        lambda q, k, v: build(700, chunk_size=16)(q, k, v, causal=causal),
        lambda q, k, v: quadratic_form(q, k, v, causal=causal, feature_map="elu", eps=LinearConfig.eps),
    ):
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        fn(*leaves).pow(2).sum().backward()
        grads.append([x.grad for x in leaves])
    for ours, ref in zip(*grads, strict=True):
        assert rel_err(ours, ref) <= 1e-10


@pytest.mark.parametrize("feature_map", sorted(FEATURE_MAPS))
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_finite_for_large_float32_inputs(feature_map: str, causal: bool) -> None:
    for scale in (30.0, 1e3):
        q, k, v = make_qkv(200, dtype=torch.float32, scale=scale)
        q, k, v = (x.requires_grad_(True) for x in (q, k, v))
        out = build(200, feature_map=feature_map)(q, k, v, causal=causal)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all(), f"non-finite output at magnitude {scale}"
        out.sum().backward()
        assert all(torch.isfinite(x.grad).all() for x in (q, k, v)), f"non-finite gradient at magnitude {scale}"


def test_all_zero_features_give_zeros_not_nan() -> None:
    q, k, v = make_qkv(10)
    out = build(10, feature_map="relu")(-q.abs(), k, v, causal=True)  # relu(q) = 0: the normalizer vanishes
    assert torch.equal(out, torch.zeros_like(out))


def test_bad_config_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="feature_map"):
        build(10, feature_map="cosine")
    with pytest.raises(ValueError, match="chunk_size"):
        build(10, chunk_size=0)
    reason = LinearAttention.unsupported_reason(
        LinearConfig(feature_map="cosine"), seq_len=10, head_dim=8, causal=False, device="cpu", dtype=torch.float32
    )
    assert reason is not None and "feature_map" in reason


def test_flops_and_memory_scale_linearly() -> None:
    config = LinearConfig()
    for causal in (False, True):
        flops = [
            LinearAttention.flops(config, batch=1, heads=8, seq_len=n, head_dim=64, causal=causal) for n in (4096, 8192)
        ]
        memory = [
            LinearAttention.memory_bytes(config, batch=1, heads=8, seq_len=n, head_dim=64, itemsize=4, causal=causal)
            for n in (4096, 8192)
        ]
        assert flops[1] == pytest.approx(2 * flops[0])
        assert memory[0] < memory[1] <= 2 * memory[0]  # linear plus, when causal, a per-block constant
    assert dataclasses.asdict(config) == {"feature_map": "elu", "chunk_size": 64, "eps": 1e-6}


def test_elu_feature_map_equals_elu_plus_one_with_its_gradient() -> None:
    x = torch.tensor([-40.0, -3.0, -1e-3, 0.0, 1e-3, 2.0, 50.0], dtype=torch.float64, requires_grad=True)
    phi = FEATURE_MAPS["elu"]
    expected = torch.nn.functional.elu(x) + 1
    (grad,) = torch.autograd.grad(phi(x).sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    # the exponential is computed as exp2(x log2 e): equal to the last few units in the last place
    torch.testing.assert_close(grad, expected_grad, rtol=1e-14, atol=0)
    assert grad[3] == 1.0  # 1 at 0, as elu's
    with torch.no_grad():  # the in-place path
        # exp(x) is more accurate than expm1(x) + 1 for very negative x, hence the absolute tolerance
        assert torch.allclose(phi(x), expected, rtol=1e-14, atol=1e-15)


def _grouped_cross_reference(q, k, v, *, causal: bool, feature_map: str, eps: float) -> torch.Tensor:
    """The quadratic form with grouped heads (head h reads key/value head h // group) and q_len <= kv_len (the
    last query on the last key)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    q_len, kv_len = q.shape[2], k.shape[2]
    phi = {"elu": lambda x: torch.nn.functional.elu(x) + 1, "relu": torch.relu, "softmax": lambda x: x.softmax(-1)}
    weights = phi[feature_map](q) @ phi[feature_map](k).transpose(-2, -1)  # (batch, heads, q_len, kv_len)
    if causal:
        keep = torch.arange(kv_len).unsqueeze(0) <= torch.arange(q_len).unsqueeze(1) + (kv_len - q_len)
        weights = weights * keep
    return (weights @ v) / weights.sum(dim=-1, keepdim=True).clamp_min(eps)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("feature_map", ["elu", "relu", "softmax"])
@pytest.mark.parametrize(("heads", "kv_heads", "q_len", "kv_len"), [(2, 2, 700, 700), (4, 2, 300, 700)])
def test_written_out_backward_matches_the_quadratic_form(
    causal: bool, feature_map: str, heads: int, kv_heads: int, q_len: int, kv_len: int, small_blocks: int
) -> None:
    """The training step's hand-written backward, over several blocks and chunks, for every feature map, with
    self-attention and with grouped heads and earlier keys (causal: summed into the starting state)."""
    gen = torch.Generator().manual_seed(1)
    inputs = [
        torch.randn(2, heads, q_len, HEAD_DIM, dtype=torch.float64, generator=gen),
        *(torch.randn(2, kv_heads, kv_len, HEAD_DIM, dtype=torch.float64, generator=gen) for _ in range(2)),
    ]
    weights = torch.randn(2, heads, q_len, HEAD_DIM, dtype=torch.float64, generator=gen)
    module = LinearAttention(
        LinearConfig(feature_map=feature_map, chunk_size=48),
        seq_len=kv_len,
        heads=heads,
        head_dim=HEAD_DIM,
        q_len=q_len,
        kv_heads=kv_heads,
    )
    grads = []
    for fn in (
        lambda q, k, v: module(q, k, v, causal=causal),
        lambda q, k, v: _grouped_cross_reference(q, k, v, causal=causal, feature_map=feature_map, eps=1e-6),
    ):
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        grads.append(torch.autograd.grad((fn(*leaves) * weights).sum(), leaves))
    for ours, ref in zip(*grads, strict=True):
        assert rel_err(ours, ref) < 1e-10
