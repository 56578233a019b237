"""Exact attention written independently of attention_impls, in float64, for the tests."""

from __future__ import annotations

import math

import torch


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, shared_qk: bool = False
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v in float64; q (batch, heads, q_len, d), k and v (batch, kv_heads, kv_len, d).

    Grouped heads: k and v are repeated so that query head h reads key/value head h // (heads // kv_heads).
    Causal: query i sees key j when j <= i + kv_len - q_len (the last query on the last key).
    With ``shared_qk`` (the Reformer's shared query-key attention) the keys are
    the queries normalized to unit length, and a position attends to itself only
    when no other position is allowed.
    """
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (batch, heads, kv_len, d)
    if shared_qk:
        k = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    q_len, kv_len = q.shape[2], k.shape[2]
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
    i = torch.arange(q_len).unsqueeze(1) + (kv_len - q_len)  # each query's own key position
    j = torch.arange(kv_len).unsqueeze(0)
    allowed = (j <= i) if causal else torch.ones(q_len, kv_len, dtype=torch.bool)
    if shared_qk:
        others = allowed & (i != j)
        allowed = torch.where(others.any(dim=-1, keepdim=True), others, allowed)
    scores = scores.masked_fill(~allowed, float("-inf"))
    scores = scores - scores.max(dim=-1, keepdim=True).values
    weights = scores.exp()
    probs = weights / weights.sum(dim=-1, keepdim=True)
    return torch.einsum("bhij,bhjd->bhid", probs, v)


def masked_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), restricted to the (seq_len, seq_len) bool ``allowed``) v in float64."""
    q, k, v = q.double(), k.double(), v.double()
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores - scores.amax(dim=-1, keepdim=True), dim=-1)
    return torch.einsum("bhij,bhjd->bhid", probs, v)


def rel_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    """||out - exact|| / ||exact|| (Frobenius), in float64."""
    out, exact = out.detach().double(), exact.detach().double()
    return float((out - exact).norm() / exact.norm())


def directional_derivatives_match(fn, inputs, *, directions: int = 4, eps: float = 1e-6, rtol: float = 1e-5) -> bool:
    """Whether autograd's gradients of ``fn`` (one backward, of a random weighting of its output) agree with central
    finite differences along random directions, in float64: <grad, u> = (f(x + eps u) - f(x - eps u)) . w / 2 eps.

    Like ``torch.autograd.gradcheck(fast_mode=True)``, but each backward follows a forward of its own, so it also
    checks implementations whose backward runs once (``attention_impls.chunked``).
    """
    gen = torch.Generator().manual_seed(0)
    leaves = [x.detach().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    weights = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    grads = torch.autograd.grad((out * weights).sum(), leaves)
    with torch.no_grad():
        for _ in range(directions):
            steps = [torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in leaves]
            plus = fn(*(x + eps * u for x, u in zip(leaves, steps, strict=True)))
            minus = fn(*(x - eps * u for x, u in zip(leaves, steps, strict=True)))
            numeric = float(((plus - minus) * weights).sum()) / (2 * eps)
            analytic = sum(float((g * u).sum()) for g, u in zip(grads, steps, strict=True))
            if abs(numeric - analytic) > rtol * max(1.0, abs(numeric)):
                return False
    return True
