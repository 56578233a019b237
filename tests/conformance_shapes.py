"""The conformance checks beyond self-attention: grouped key/value heads, cross lengths, decoding.

Each takes an implementation name (or an ImplSpec). An implementation that declares the capability
(``supports_grouped_heads``, ``supports_cross``, ``supports_decode``) must compute it right; one that does
not must be refused by the registry with a reason that names it (the case is then recorded as skipped).
Plain functions, so that ``test_conformance_catches.py`` can show each fails on a broken implementation.
"""

from __future__ import annotations

import torch

from attention_impls import ImplSpec, get
from conformance import APPROX_TOLERANCE, EXACT_TOLERANCE, HEAD_DIM, run
from reference import reference_attention, rel_error

BATCH = 2
HEADS = 4
# (kv_heads) for grouped-query and multi-query attention with HEADS query heads
GROUPED_KV_HEADS = (2, 1)
# (q_len, kv_len): fewer queries than keys (lengths not multiples of any block), one query, more queries
CROSS_LENGTHS = ((37, 100), (1, 50), (130, 300), (60, 25))
# decoding: a context of this many tokens, the cache filled with the first ``p`` of them for each p
DECODE_LEN = 41
DECODE_PREFILLS = (0, 23)
# a step's output against the causal forward's row (float64; approximate implementations too: the same sums)
DECODE_TOLERANCE = 1e-10


def _spec(impl: str | ImplSpec) -> ImplSpec:
    return get(impl) if isinstance(impl, str) else impl


def _tensor(gen: torch.Generator, *shape: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64) + shift


def _inputs(*, heads: int, kv_heads: int, q_len: int, kv_len: int, seed: int = 0):
    """q, k ~ N(0, 1) and v ~ N(1, 1) in float64: q (BATCH, heads, q_len, d), k and v (BATCH, kv_heads, kv_len, d)."""
    gen = torch.Generator().manual_seed(seed)
    q = _tensor(gen, BATCH, heads, q_len, HEAD_DIM)
    k = _tensor(gen, BATCH, kv_heads, kv_len, HEAD_DIM)
    v = _tensor(gen, BATCH, kv_heads, kv_len, HEAD_DIM, shift=1.0)
    return q, k, v


def _reason(spec: ImplSpec, *, causal: bool, heads: int, kv_heads: int, q_len: int, kv_len: int, decode=False):
    return spec.unsupported_reason(
        seq_len=kv_len,
        head_dim=HEAD_DIM,
        causal=causal,
        dtype=torch.float64,
        heads=heads,
        q_len=q_len,
        kv_heads=kv_heads,
        decode=decode,
    )


def _check_refused(spec: ImplSpec, what: str, **shape) -> None:
    reason = _reason(spec, **shape)
    assert reason, f"{spec.name} does not claim {what} but the registry accepts such a case"
    assert "\n" not in reason, f"{spec.name}: the reason is not one line: {reason!r}"


def _check_close(spec: ImplSpec, out: torch.Tensor, expected: torch.Tensor, *, what: str) -> None:
    assert out.shape == expected.shape, f"{spec.name}: {what}: shape {tuple(out.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(out).all(), f"{spec.name}: {what}: non-finite output"
    error = rel_error(out, expected)
    assert error <= EXACT_TOLERANCE, f"{spec.name}: {what}: rel error {error:.3g} > {EXACT_TOLERANCE}"


def _check_exact(spec: ImplSpec, out: torch.Tensor, q, k, v, *, causal: bool, what: str) -> None:
    """Exact implementations equal exact attention; approximate ones are finite and below APPROX_TOLERANCE."""
    exact = reference_attention(q, k, v, causal=causal)
    if spec.exact:
        _check_close(spec, out, exact, what=what)
        return
    assert torch.isfinite(out).all(), f"{spec.name}: {what}: non-finite output"
    error = rel_error(out, exact)
    assert error < APPROX_TOLERANCE, f"{spec.name}: {what}: rel error {error:.3g} >= {APPROX_TOLERANCE}"


def check_grouped_heads(impl: str | ImplSpec, *, causal: bool, seq_len: int = 67) -> None:
    """Grouped heads give what the same implementation gives on k and v repeated to every query head (query head
    h reads key/value head h // group), and exact attention for an exact implementation."""
    spec = _spec(impl)
    if causal and not spec.supports_causal:
        return
    for kv_heads in GROUPED_KV_HEADS:
        shape = {"causal": causal, "heads": HEADS, "kv_heads": kv_heads, "q_len": seq_len, "kv_len": seq_len}
        if not spec.supports_grouped_heads:
            _check_refused(spec, "grouped key/value heads", **shape)
            continue
        assert _reason(spec, **shape) is None, (
            f"{spec.name} claims grouped heads but refuses them: {_reason(spec, **shape)}"
        )
        q, k, v = _inputs(heads=HEADS, kv_heads=kv_heads, q_len=seq_len, kv_len=seq_len)
        out = run(spec, q, k, v, causal=causal)
        group = HEADS // kv_heads
        repeated = run(spec, q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), causal=causal)
        what = f"kv_heads={kv_heads} causal={causal}"
        _check_close(spec, out, repeated, what=f"{what}, against k and v repeated per query head")
        _check_exact(spec, out, q, k, v, causal=causal, what=what)


def check_cross_lengths(impl: str | ImplSpec, *, causal: bool) -> None:
    """Queries of another length than the keys. With fewer queries, query i is the one at key position
    i + kv_len - q_len: its output is that row of the same implementation's self-attention (causal or not); an
    exact implementation also equals exact attention (causal: key j visible when j <= i + kv_len - q_len)."""
    spec = _spec(impl)
    if causal and not spec.supports_causal:
        return
    for q_len, kv_len in CROSS_LENGTHS:
        shape = {"causal": causal, "heads": HEADS, "kv_heads": HEADS, "q_len": q_len, "kv_len": kv_len}
        reason = _reason(spec, **shape)
        if not spec.supports_cross:
            _check_refused(spec, "cross lengths", **shape)
            continue
        if reason is not None:  # refused for these lengths (causal with more queries, a shape_problem)
            assert q_len > kv_len, f"{spec.name} claims cross lengths but refuses q_len={q_len} < {kv_len}: {reason}"
            continue
        q, k, v = _inputs(heads=HEADS, kv_heads=HEADS, q_len=q_len, kv_len=kv_len)
        out = run(spec, q, k, v, causal=causal)
        what = f"q_len={q_len} kv_len={kv_len} causal={causal}"
        _check_exact(spec, out, q, k, v, causal=causal, what=what)
        if q_len <= kv_len:
            offset = kv_len - q_len
            earlier = _inputs(heads=HEADS, kv_heads=HEADS, q_len=offset, kv_len=1, seed=1)[0]  # queries before
            own = run(spec, torch.cat([earlier, q], dim=2), k, v, causal=causal)[:, :, offset:]
            _check_close(spec, out, own, what=f"{what}, against the last rows of its self-attention")


def check_decode(impl: str | ImplSpec) -> None:
    """Token by token from a cache: each step's output is the causal forward's row of that token, the cache
    after every step; a step called twice on the same cache gives the same output; the cache's estimate holds."""
    spec = _spec(impl)
    shape = {"causal": True, "heads": HEADS, "kv_heads": HEADS, "q_len": DECODE_LEN, "kv_len": DECODE_LEN}
    if not spec.supports_decode:
        _check_refused(spec, "decoding", decode=True, **shape)
        return
    assert spec.supports_causal, f"{spec.name} claims decoding without causal support"
    for kv_heads in (HEADS, *(GROUPED_KV_HEADS if spec.supports_grouped_heads else ())):
        shape["kv_heads"] = kv_heads
        reason = _reason(spec, decode=True, **shape)
        assert reason is None, f"{spec.name} claims decoding but refuses it: {reason}"
        q, k, v = _inputs(heads=HEADS, kv_heads=kv_heads, q_len=DECODE_LEN, kv_len=DECODE_LEN)
        torch.manual_seed(0)
        module = spec.build(seq_len=DECODE_LEN, heads=HEADS, head_dim=HEAD_DIM, kv_heads=kv_heads, dtype=q.dtype)
        with torch.no_grad():
            forward = module(q, k, v, causal=True)  # (BATCH, HEADS, DECODE_LEN, HEAD_DIM)
            for filled in DECODE_PREFILLS:
                cache = module.prefill(k[:, :, :filled], v[:, :, :filled], capacity=DECODE_LEN)
                for t in range(filled, DECODE_LEN):
                    token = (q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1])
                    again, _ = module.decode_step(*token, cache)
                    out, cache = module.decode_step(*token, cache)
                    what = f"kv_heads={kv_heads}, cache of {filled} filled, token {t}"
                    assert torch.equal(out, again), f"{spec.name}: {what}: a step repeated on one cache changed"
                    error = (out - forward[:, :, t : t + 1]).abs().max().item()
                    assert error <= DECODE_TOLERANCE, (
                        f"{spec.name}: {what}: the step differs from the causal forward's row by {error:.3g}"
                    )
        estimate = spec.cache_bytes(
            batch=BATCH, heads=HEADS, kv_heads=kv_heads, seq_len=DECODE_LEN, head_dim=HEAD_DIM, itemsize=8
        )
        assert estimate is not None, f"{spec.name}: decoding without a cache_bytes estimate"
        assert 0.5 <= cache.nbytes() / estimate <= 2.0, (
            f"{spec.name}: the cache holds {cache.nbytes()} bytes, its estimate says {estimate:.0f}"
        )
