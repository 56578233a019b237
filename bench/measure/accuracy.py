"""Approximation error: an implementation's output against exact attention in float64, on random and peaked inputs.

``rel_error = ||out - exact|| / ||exact||``; the reference is computed on the CPU a block of queries at a
time, so its memory is a chunk times the sequence length.
"""

from __future__ import annotations

import math

import torch

ERROR_QUERY_CHUNK = 512  # query rows per step of the float64 reference (memory chunk x n)
PEAKED_SCORE_STD = 4.0  # peaked inputs: q and k scaled so that the attention scores have this standard deviation


def exact_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, shared_qk: bool
) -> torch.Tensor:
    """Exact attention in float64 on the CPU, computed a block of queries at a time (memory chunk x n).

    q (batch, heads, q_len, d), k and v (batch, kv_heads, kv_len, d): query head h reads key/value head
    h // (heads // kv_heads); causal, query i sees key j when j <= i + kv_len - q_len.
    """
    q, k, v = (t.detach().to("cpu", torch.float64) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (batch, heads, kv_len, d)
    if shared_qk:
        k = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    q_len, kv_len = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    key_pos = torch.arange(kv_len)
    out = q.new_empty(*q.shape[:3], v.shape[-1])  # (batch, heads, q_len, head_dim)
    for start in range(0, q_len, ERROR_QUERY_CHUNK):
        stop = min(q_len, start + ERROR_QUERY_CHUNK)
        scores = torch.matmul(q[:, :, start:stop], k.transpose(-2, -1)) * scale  # (batch, heads, chunk, kv_len)
        query_pos = torch.arange(start, stop).unsqueeze(1) + (kv_len - q_len)  # each query's own key position
        allowed = key_pos.unsqueeze(0) <= query_pos if causal else torch.ones(stop - start, kv_len, dtype=torch.bool)
        if shared_qk:
            others = allowed & (key_pos.unsqueeze(0) != query_pos)
            allowed = torch.where(others.any(dim=-1, keepdim=True), others, allowed)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, :, start:stop] = torch.matmul(torch.softmax(scores, dim=-1), v)  # (batch, heads, chunk, head_dim)
    return out


def peaked_scale(head_dim: int, *, shared_qk: bool) -> float:
    """The factor on standard-normal q and k that gives scores q.k/sqrt(d) a spread of PEAKED_SCORE_STD.

    Separate keys: q.k/sqrt(d) with q, k ~ N(0, s^2) has standard deviation s^2. Shared query-key (the keys
    are the queries normalized to unit length): q_i.q_j/|q_j|/sqrt(d) has standard deviation s/sqrt(d), so
    random inputs give nearly uniform attention there and need a larger factor to peak.
    """
    if shared_qk:
        return PEAKED_SCORE_STD * math.sqrt(head_dim)
    return math.sqrt(PEAKED_SCORE_STD)


def approximation_errors(module, spec, q, k, v, *, causal: bool) -> dict[str, float]:
    """rel_error = ||out - exact|| / ||exact|| on the timed (random) inputs and on peaked ones."""
    errors = {}
    peaked = peaked_scale(q.shape[-1], shared_qk=spec.shared_qk)
    with torch.no_grad():
        for label, scale in (("rel_error", 1.0), ("rel_error_peaked", peaked)):
            qs, ks = q * scale, k * scale
            out = module(qs, ks, v, causal=causal).to("cpu", torch.float64)
            exact = exact_reference(qs, ks, v, causal=causal, shared_qk=spec.shared_qk)
            errors[label] = float((out - exact).norm() / exact.norm())
    return errors
