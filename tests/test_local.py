"""Sliding-window attention equals exact attention under the band mask |i - j| <= window (j <= i when causal)."""

from __future__ import annotations

import pytest
import torch

from attention_impls import get
from attention_impls.local import LocalAttention, LocalConfig, auto_block_size
from conformance import make_qkv
from reference import masked_reference, reference_attention, rel_error

TOL = 1e-10
LENGTHS = (1, 3, 127, 200, 1000)


def band_mask(seq_len: int, window: int, *, causal: bool) -> torch.Tensor:
    """(seq_len, seq_len) bool, built here independently of attention_impls.local."""
    i = torch.arange(seq_len).unsqueeze(1)
    j = torch.arange(seq_len).unsqueeze(0)
    allowed = (i - j).abs() <= window
    return allowed & (j <= i) if causal else allowed


def run(config: LocalConfig, q, k, v, *, causal: bool) -> torch.Tensor:
    module = LocalAttention(config, seq_len=q.shape[2], heads=q.shape[1], head_dim=q.shape[3])
    return module(q, k, v, causal=causal)


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_len", LENGTHS)
@pytest.mark.parametrize("window", [0, 1, 5, 64, 128])
def test_equals_band_masked_attention(window, seq_len, causal, kernel):
    q, k, v = make_qkv(seq_len)
    out = run(LocalConfig(window=window, kernel=kernel), q, k, v, causal=causal)
    exact = masked_reference(q, k, v, band_mask(seq_len, window, causal=causal))
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_error(out, exact) <= TOL


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("window", "block_size"), [(10, 1), (10, 7), (10, 10), (10, 33), (37, 16), (3, 256)])
def test_block_sizes_not_dividing_window_or_length(window, block_size, causal):
    for seq_len in (5, 131, 301):
        q, k, v = make_qkv(seq_len, seed=seq_len)
        out = run(LocalConfig(window=window, block_size=block_size), q, k, v, causal=causal)
        exact = masked_reference(q, k, v, band_mask(seq_len, window, causal=causal))
        assert rel_error(out, exact) <= TOL, f"seq_len={seq_len}"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_len", [1, 3, 127, 300])
def test_window_covering_the_sequence_is_full_attention(seq_len, causal):
    q, k, v = make_qkv(seq_len)
    for window in (seq_len - 1, seq_len, 10 * seq_len + 3):
        out = run(LocalConfig(window=window), q, k, v, causal=causal)
        assert rel_error(out, reference_attention(q, k, v, causal=causal)) <= TOL


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_the_band_reference(causal, kernel):
    seq_len, window = 203, 20
    q, k, v = make_qkv(seq_len, requires_grad=True)
    weights = torch.linspace(-1, 1, q.numel(), dtype=q.dtype).view_as(q)
    out = run(LocalConfig(window=window, block_size=16, kernel=kernel), q, k, v, causal=causal)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    exact = masked_reference(q, k, v, band_mask(seq_len, window, causal=causal))
    exact_grads = torch.autograd.grad((exact * weights).sum(), (q, k, v))
    for name, grad, exact_grad in zip("qkv", grads, exact_grads, strict=True):
        assert torch.isfinite(grad).all(), f"non-finite gradient for {name}"
        assert rel_error(grad, exact_grad) <= 1e-9, f"gradient for {name}"


@pytest.mark.parametrize("causal", [False, True])
def test_float32_large_inputs_and_gradients_finite(causal):
    q, k, v = make_qkv(200, dtype=torch.float32, scale=1e3, requires_grad=True)
    out = run(LocalConfig(window=16), q, k, v, causal=causal)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.sum().backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()


def test_causal_ignores_the_future():
    seq_len = 150
    q, k, v = make_qkv(seq_len)
    config = LocalConfig(window=20, block_size=8)
    base = run(config, q, k, v, causal=True)
    for t in (0, 40, 97, seq_len - 2):
        changed = [x.clone() for x in (q, k, v)]
        for x in changed:
            x[:, :, t + 1 :] = torch.randn_like(x[:, :, t + 1 :]) * 3
        out = run(config, *changed, causal=True)
        assert torch.equal(out[:, :, : t + 1], base[:, :, : t + 1]), f"t={t}"


def test_deterministic_and_layout_cached():
    q, k, v = make_qkv(300, dtype=torch.float32)
    module = LocalAttention(LocalConfig(), seq_len=300, heads=2, head_dim=16)
    first = module(q, k, v)
    assert torch.equal(first, module(q, k, v))
    assert len(module._masks) == 1


def test_registry_metadata_flops_and_memory():
    spec = get("local")
    assert spec.family == "local" and not spec.exact and spec.supports_causal
    assert spec.paper.startswith("https://arxiv.org/")
    assert auto_block_size(128) == 64 and spec.params()["window"] == 128
    # 4096 positions in 64 blocks of 64, each against 64 + 2 * 128 keys
    flops = spec.flops(batch=1, heads=8, seq_len=4096, head_dim=64)
    assert flops == 4.0 * 8 * 4096 * (64 + 2 * 128) * 64
    assert spec.flops(batch=1, heads=8, seq_len=4096, head_dim=64, causal=True) == 4.0 * 8 * 4096 * (64 + 128) * 64
    small = spec.memory_bytes(batch=1, heads=8, seq_len=4096, head_dim=64, itemsize=4)
    large = spec.memory_bytes(batch=1, heads=8, seq_len=8 * 4096, head_dim=64, itemsize=4)
    assert small > 0 and large < 8.5 * small  # linear in n, no n^2 term
    assert spec.with_params(window="32").config.window == 32


def test_bad_config_is_rejected_clearly():
    assert "kernel" in LocalAttention.unsupported_reason(
        LocalConfig(kernel="triton"), seq_len=8, head_dim=16, causal=False, device="cpu", dtype=torch.float32
    )
    with pytest.raises(ValueError, match="window"):
        LocalAttention(LocalConfig(window=-1), seq_len=8, heads=1, head_dim=4)


@pytest.mark.parametrize("seq_len", [128, 130])
@pytest.mark.parametrize("causal", [False, True])
def test_non_contiguous_inputs(causal, seq_len):
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in make_qkv(seq_len))  # (b, h, n, d) views
    assert not q.is_contiguous()
    out = run(LocalConfig(window=9, block_size=8), q, k, v, causal=causal)
    assert rel_error(out, masked_reference(q, k, v, band_mask(seq_len, 9, causal=causal))) <= TOL
