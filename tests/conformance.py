"""The checks of the conformance suite, one plain function each.

Each takes an implementation name (or an ImplSpec) and raises AssertionError
(or the implementation's own error) when the implementation breaks the
contract (docs/ARCHITECTURE.md, the contract section).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attention_impls import ImplSpec, UnsupportedCase, get
from reference import reference_attention, rel_error

BATCH = 2
HEADS = 2
HEAD_DIM = 16
EXACT_TOLERANCE = 1e-10  # float64 relative error for exact implementations
APPROX_TOLERANCE = 1.0  # approximate ones: finite and below this


def suite_params(names: list[str]) -> list:
    """The implementations as pytest parameters, each one that can not run the suite's float64 CPU cases marked
    skipped with its reason (FlexAttention's compiled kernel: tests/test_flex.py checks it, and runs this suite
    on its uncompiled kernel)."""
    params = []
    for name in names:
        reason = get(name).unsupported_reason(seq_len=8, head_dim=HEAD_DIM, causal=False, dtype=torch.float64)
        params.append(pytest.param(name, marks=pytest.mark.skip(reason=f"{name}: {reason}")) if reason else name)
    return params


def _spec(impl: str | ImplSpec) -> ImplSpec:
    return get(impl) if isinstance(impl, str) else impl


def make_qkv(
    seq_len: int, *, dtype: torch.dtype = torch.float64, scale: float = 1.0, seed: int = 0, requires_grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k ~ N(0, 1) and v ~ N(1, 1): values share a mean direction, as a trained model's do."""
    gen = torch.Generator().manual_seed(seed)
    shape = (BATCH, HEADS, seq_len, HEAD_DIM)
    q = torch.randn(shape, generator=gen, dtype=dtype) * scale
    k = torch.randn(shape, generator=gen, dtype=dtype) * scale
    v = (torch.randn(shape, generator=gen, dtype=dtype) + 1.0) * scale
    return q.requires_grad_(requires_grad), k.requires_grad_(requires_grad), v.requires_grad_(requires_grad)


def build(spec: ImplSpec, seq_len: int, *, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return spec.build(seq_len=seq_len, heads=HEADS, head_dim=HEAD_DIM, dtype=dtype)


def run(spec: ImplSpec, q, k, v, *, causal: bool, seed: int = 0) -> torch.Tensor:
    """Build for the inputs' shapes (q's heads and length, k's heads and length) and call, both after seeding
    torch's RNG with ``seed``."""
    torch.manual_seed(seed)
    module = spec.build(
        seq_len=k.shape[2], heads=q.shape[1], head_dim=q.shape[3], q_len=q.shape[2], kv_heads=k.shape[1], dtype=q.dtype
    )
    torch.manual_seed(seed)
    return module(q, k, v, causal=causal)


def skip_reason(spec: ImplSpec, *, causal: bool) -> str | None:
    """Why this implementation can not run the causal variant (it must then reject it clearly)."""
    if causal and not spec.supports_causal:
        return f"{spec.name} does not claim causal support"
    return None


def check_rejects_causal(spec: ImplSpec) -> None:
    """An implementation without causal support refuses causal=True with a clear reason."""
    q, k, v = make_qkv(5)
    module = build(spec, 5)
    try:
        module(q, k, v, causal=True)
    except UnsupportedCase as exc:
        assert "causal" in str(exc), f"{spec.name}: rejection message does not mention causal: {exc}"
        return
    raise AssertionError(f"{spec.name} claims no causal support but accepted causal=True")


def check_shape_dtype_device(impl: str | ImplSpec, *, causal: bool) -> None:
    spec = _spec(impl)
    if skip_reason(spec, causal=causal):
        check_rejects_causal(spec)
        return
    for dtype in (torch.float32, torch.float64):
        q, k, v = make_qkv(37, dtype=dtype)
        out = run(spec, q, k, v, causal=causal)
        assert out.shape == q.shape, f"{spec.name}: shape {tuple(out.shape)} != input {tuple(q.shape)}"
        assert out.dtype == q.dtype, f"{spec.name}: dtype {out.dtype} != input {q.dtype}"
        assert out.device == q.device, f"{spec.name}: device {out.device} != input {q.device}"


def check_finite_large_inputs(impl: str | ImplSpec) -> None:
    spec = _spec(impl)
    for causal in (False, True):
        if skip_reason(spec, causal=causal):
            continue
        for scale in (1.0, 30.0, 1e3):
            q, k, v = make_qkv(200, dtype=torch.float32, scale=scale)
            out = run(spec, q, k, v, causal=causal)
            assert torch.isfinite(out).all(), (
                f"{spec.name}: non-finite output at input magnitude {scale} causal={causal}"
            )


def check_against_reference(impl: str | ImplSpec, *, seq_len: int, causal: bool) -> float | None:
    """Exact: rel error <= 1e-10 in float64. Approximate: finite and < 1; returns the error."""
    spec = _spec(impl)
    if skip_reason(spec, causal=causal):
        check_rejects_causal(spec)
        return None
    q, k, v = make_qkv(seq_len)
    out = run(spec, q, k, v, causal=causal)
    exact = reference_attention(q, k, v, causal=causal, shared_qk=spec.shared_qk)
    assert torch.isfinite(out).all(), f"{spec.name}: non-finite output"
    error = rel_error(out, exact)
    if spec.exact:
        assert error <= EXACT_TOLERANCE, f"{spec.name}: rel error {error:.3g} > {EXACT_TOLERANCE} (n={seq_len})"
    else:
        assert error < APPROX_TOLERANCE, f"{spec.name}: rel error {error:.3g} >= {APPROX_TOLERANCE} (n={seq_len})"
    return error


def check_causal(impl: str | ImplSpec, *, seq_len: int) -> None:
    """Changing q, k, v after position t leaves the outputs up to t unchanged."""
    spec = _spec(impl)
    if skip_reason(spec, causal=True):
        check_rejects_causal(spec)
        return
    q, k, v = make_qkv(seq_len)
    base = run(spec, q, k, v, causal=True)
    gen = torch.Generator().manual_seed(123)
    for t in sorted({0, seq_len // 3, seq_len // 2, seq_len - 2}):
        if t < 0 or t >= seq_len - 1:
            continue
        changed = [x.clone() for x in (q, k, v)]
        for x in changed:
            x[:, :, t + 1 :] = torch.randn(x[:, :, t + 1 :].shape, generator=gen, dtype=x.dtype) * 3.0
        out = run(spec, *changed, causal=True)
        leak = (out[:, :, : t + 1] - base[:, :, : t + 1]).abs().max().item()
        assert leak <= 1e-12, f"{spec.name}: outputs up to t={t} changed by {leak:.3g} when the future changed"


def check_gradients(impl: str | ImplSpec, *, seq_len: int, causal: bool) -> None:
    spec = _spec(impl)
    if skip_reason(spec, causal=causal):
        check_rejects_causal(spec)
        return
    q, k, v = (x.requires_grad_(True) for x in make_qkv(seq_len))
    out = run(spec, q, k, v, causal=causal)
    assert out.requires_grad, f"{spec.name}: output is detached from q, k, v"
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    check_input_gradients(spec, q, k, v)


def check_input_gradients(spec: ImplSpec, q, k, v, *, context: str = "") -> None:
    """After a backward pass: q, k and v each got a finite, non-zero gradient (k not, for shared query-key)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if spec.shared_qk and name == "k":
            continue  # shared query-key attention ignores k by definition
        assert x.grad is not None, f"{spec.name}: no gradient for {name}"
        assert torch.isfinite(x.grad).all(), f"{spec.name}: non-finite gradient for {name}{context}"
        assert x.grad.abs().sum() > 0, f"{spec.name}: gradient for {name} is all zeros"


def check_deterministic(impl: str | ImplSpec, *, seq_len: int) -> None:
    spec = _spec(impl)
    causal = spec.supports_causal
    q, k, v = make_qkv(seq_len, dtype=torch.float32)
    first = run(spec, q, k, v, causal=causal, seed=7)
    second = run(spec, q, k, v, causal=causal, seed=7)
    assert torch.equal(first, second), f"{spec.name}: the same seed gave different outputs"


def check_metadata(impl: str | ImplSpec) -> None:
    spec = _spec(impl)
    for field in ("family", "paper", "time_complexity", "memory_complexity"):
        assert getattr(spec, field), f"{spec.name}: metadata {field!r} is empty"
    assert spec.paper.startswith("http"), f"{spec.name}: paper should be a link, got {spec.paper!r}"
    assert dataclasses.is_dataclass(spec.config), f"{spec.name}: config is not a dataclass"
    flops = spec.flops(batch=1, heads=2, seq_len=512, head_dim=16)
    assert flops > 0, f"{spec.name}: flops() must be positive, got {flops}"
    memory = spec.memory_bytes(batch=1, heads=2, seq_len=512, head_dim=16, itemsize=4)
    assert memory > 0, f"{spec.name}: memory_bytes() must be positive, got {memory}"
