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
