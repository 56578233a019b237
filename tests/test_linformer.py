"""Linformer (attention_impls/linformer.py): projections, identity = full attention, rejections."""

from __future__ import annotations

import pytest
import torch

from attention_impls.base import UnsupportedCase
from attention_impls.linformer import LinformerAttention, LinformerConfig, make_projection
from reference import reference_attention, rel_error

HEADS = 2
HEAD_DIM = 16


def make_qkv(seq_len: int, *, dtype: torch.dtype = torch.float64, scale: float = 1.0, seed: int = 0):
    """q, k ~ N(0, 1), v ~ N(1, 1) (times scale)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (2, HEADS, seq_len, HEAD_DIM)
    q = torch.randn(shape, generator=gen, dtype=dtype) * scale
    k = torch.randn(shape, generator=gen, dtype=dtype) * scale
    v = (torch.randn(shape, generator=gen, dtype=dtype) + 1) * scale
    return q, k, v


def build(seq_len: int, *, dtype: torch.dtype = torch.float64, **params) -> LinformerAttention:
    module = LinformerAttention(LinformerConfig(**params), seq_len=seq_len, heads=HEADS, head_dim=HEAD_DIM)
    return module.to(dtype)


@pytest.mark.parametrize("seq_len", [1, 3, 127, 300])
def test_identity_projection_equals_full_attention(seq_len: int) -> None:
    q, k, v = make_qkv(seq_len)
    out = build(seq_len, k=seq_len, init="identity")(q, k, v)
    assert rel_error(out.detach(), reference_attention(q, k, v)) <= 1e-10


@pytest.mark.parametrize("seq_len", [1, 3, 100])
def test_shorter_than_k_is_exact_with_the_default_init(seq_len: int) -> None:
    """seq_len <= k: the projected length is seq_len and segment pooling is the identity."""
    q, k, v = make_qkv(seq_len)
    module = build(seq_len)
    assert module.proj_k.shape == (seq_len, seq_len)
    assert rel_error(module(q, k, v).detach(), reference_attention(q, k, v)) <= 1e-10


@pytest.mark.parametrize("seq_len", [1, 3, 127, 1000])
def test_default_is_a_usable_approximation(seq_len: int) -> None:
    q, k, v = make_qkv(seq_len)
    out = build(seq_len, k=64)(q, k, v)
    assert torch.isfinite(out).all()
    assert rel_error(out.detach(), reference_attention(q, k, v)) < 0.5


def test_query_blocks_agree_with_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """Long enough for several query blocks, with and without autograd, against the unblocked product (under
    autograd the projections are one product over every head instead of one per head: equal to rounding)."""
    import attention_impls.linformer as linformer

    q, k, v = make_qkv(1000)
    module = build(1000, k=64)
    whole = module(q, k, v).detach()
    monkeypatch.setattr(linformer, "_SCORES_BLOCK", 2 * HEADS * 64 * 300)  # 300 query rows per block
    with torch.no_grad():
        blocked = module(q, k, v)
    tracked = module(q.clone().requires_grad_(True), k, v)
    assert rel_error(blocked, whole) <= 1e-13
    assert rel_error(tracked.detach(), blocked) <= 1e-13
    tracked.sum().backward()


def test_mean_projection_averages_contiguous_segments() -> None:
    proj = make_projection("mean", k=4, seq_len=10)
    assert proj.shape == (4, 10)
    torch.testing.assert_close(proj.sum(dim=1), torch.ones(4, dtype=proj.dtype))
    assert ((proj > 0).sum(dim=0) == 1).all()  # each position in exactly one segment
    segment = (proj > 0).int().argmax(dim=0)
    assert segment.tolist() == sorted(segment.tolist())  # contiguous, in order
    assert set((proj > 0).sum(dim=1).tolist()) <= {2, 3}  # near-equal lengths


@pytest.mark.parametrize("share_kv", [False, True])
def test_parameters(share_kv: bool) -> None:
    module = build(500, k=32, share_kv=share_kv)
    names = {name for name, _ in module.named_parameters()}
    assert names == ({"proj_k"} if share_kv else {"proj_k", "proj_v"})
    assert module.proj_k.shape == (32, 500)


def test_share_kv_uses_one_projection_for_keys_and_values() -> None:
    torch.manual_seed(0)
    shared = build(50, k=8, share_kv=True, init="random")
    torch.manual_seed(0)
    separate = build(50, k=8, share_kv=False, init="random")
    with torch.no_grad():
        separate.proj_v.copy_(separate.proj_k)
    assert torch.equal(shared.proj_k, separate.proj_k)
    q, k, v = make_qkv(50)
    torch.testing.assert_close(shared(q, k, v), separate(q, k, v), rtol=0, atol=0)


def test_random_init_is_seeded() -> None:
    torch.manual_seed(3)
    first = build(64, k=16, init="random")
    torch.manual_seed(3)
    second = build(64, k=16, init="random")
    assert torch.equal(first.proj_k, second.proj_k) and torch.equal(first.proj_v, second.proj_v)
    assert not torch.equal(first.proj_k, first.proj_v)


def test_causal_is_rejected() -> None:
    q, k, v = make_qkv(10)
    with pytest.raises(UnsupportedCase, match="causal"):
        build(10)(q, k, v, causal=True)
    assert LinformerAttention.supports_causal is False
    reason = LinformerAttention.unsupported_reason(
        LinformerConfig(), seq_len=10, head_dim=HEAD_DIM, causal=True, device="cpu", dtype=torch.float32
    )
    assert reason is not None and "causal" in reason


def test_other_seq_len_is_a_clear_error() -> None:
    module = build(20)
    q, k, v = make_qkv(21)
    with pytest.raises(ValueError, match=r"built for seq_len=20 but got seq_len=21"):
        module(q, k, v)


def test_identity_needs_k_at_least_seq_len() -> None:
    with pytest.raises(ValueError, match="identity"):
        build(300, k=256, init="identity")
    reason = LinformerAttention.unsupported_reason(
        LinformerConfig(init="identity"),
        seq_len=300,
        head_dim=HEAD_DIM,
        causal=False,
        device="cpu",
        dtype=torch.float32,
    )
    assert reason is not None and "identity" in reason
    with pytest.raises(ValueError, match="init"):
        build(10, init="orthogonal")


@pytest.mark.parametrize("init", ["mean", "random"])
def test_gradients_finite(init: str) -> None:
    torch.manual_seed(0)
    module = build(130, k=32, init=init)
    q, k, v = (x.requires_grad_(True) for x in make_qkv(130))
    out = module(q, k, v)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    for name, x in (("q", q), ("k", k), ("v", v), ("proj_k", module.proj_k), ("proj_v", module.proj_v)):
        assert torch.isfinite(x.grad).all(), f"non-finite gradient for {name}"
        assert x.grad.abs().sum() > 0, f"zero gradient for {name}"


def test_finite_for_large_float32_inputs_and_dtype_follows_input() -> None:
    module = build(200, dtype=torch.float32, k=64)
    for scale in (30.0, 1e3):
        q, k, v = (x.requires_grad_(True) for x in make_qkv(200, dtype=torch.float32, scale=scale))
        out = module(q, k, v)
        assert out.dtype == torch.float32 and out.shape == q.shape
        assert torch.isfinite(out).all(), f"non-finite output at magnitude {scale}"
        out.sum().backward()
        assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    q64 = make_qkv(200)[0]
    assert module(q64, q64, q64).dtype == torch.float64  # projections follow the input's dtype


def test_flops_and_memory_scale_linearly() -> None:
    config = LinformerConfig()
    flops = [
        LinformerAttention.flops(config, batch=1, heads=8, seq_len=n, head_dim=64, causal=False) for n in (4096, 8192)
    ]
    memory = [
        LinformerAttention.memory_bytes(config, batch=1, heads=8, seq_len=n, head_dim=64, itemsize=4, causal=False)
        for n in (4096, 8192)
    ]
    assert flops[1] == pytest.approx(2 * flops[0])
    assert memory[0] < memory[1] <= 2 * memory[0]  # the output, plus a query block of constant size
