"""Approximation error: an implementation's output against exact attention in float64, per input family.

``rel_error = ||out - exact|| / ||exact||`` over the query rows compared: every row up to ERROR_ROWS
queries, else ERROR_ROWS rows evenly spaced (the reference then costs O(ERROR_ROWS n d), not O(n^2 d)).
The reference is computed on the CPU a block of queries at a time, so its memory is a chunk times the
sequence length. The input families are in bench.measure.inputs.
"""

from __future__ import annotations

import math

import torch

from bench.families import ERROR_FIELDS, ERROR_ROWS
from bench.measure.inputs import family_inputs, unit_rows

ERROR_QUERY_CHUNK = 512  # query rows per step of the float64 reference (memory chunk x n)


def compared_rows(q_len: int) -> torch.Tensor:
    """The query rows an error compares: all of them up to ERROR_ROWS, else ERROR_ROWS evenly spaced."""
    if q_len <= ERROR_ROWS:
        return torch.arange(q_len)
    return torch.linspace(0, q_len - 1, ERROR_ROWS, dtype=torch.float64).round().long()


def exact_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    shared_qk: bool,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact attention in float64 on the CPU, computed a block of queries at a time (memory chunk x n).

    q (batch, heads, q_len, d), k and v (batch, kv_heads, kv_len, d): query head h reads key/value head
    h // (heads // kv_heads); causal, query i sees key j when j <= i + kv_len - q_len. ``rows``: only these
    query rows (batch, heads, len(rows), d); shared query-key still takes its keys from every query.
    """
    q, k, v = (t.detach().to("cpu", torch.float64) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (batch, heads, kv_len, d)
    if shared_qk:
        k = unit_rows(q)
    q_len, kv_len = q.shape[2], k.shape[2]
    rows = torch.arange(q_len) if rows is None else rows
    q = q[:, :, rows]
    scale = 1.0 / math.sqrt(q.shape[-1])
    key_pos = torch.arange(kv_len)
    out = q.new_empty(*q.shape[:3], v.shape[-1])  # (batch, heads, len(rows), head_dim)
    for start in range(0, len(rows), ERROR_QUERY_CHUNK):
        stop = min(len(rows), start + ERROR_QUERY_CHUNK)
        scores = torch.matmul(q[:, :, start:stop], k.transpose(-2, -1)) * scale  # (batch, heads, chunk, kv_len)
        query_pos = rows[start:stop].unsqueeze(1) + (kv_len - q_len)  # each query's own key position
        allowed = key_pos.unsqueeze(0) <= query_pos if causal else torch.ones(stop - start, kv_len, dtype=torch.bool)
        if shared_qk:
            others = allowed & (key_pos.unsqueeze(0) != query_pos)
            allowed = torch.where(others.any(dim=-1, keepdim=True), others, allowed)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, :, start:stop] = torch.matmul(torch.softmax(scores, dim=-1), v)  # (batch, heads, chunk, head_dim)
    return out


def approximation_errors(module, spec, q, k, v, *, causal: bool, seed: int) -> dict[str, float]:
    """rel_error_<family> = ||out - exact|| / ||exact|| over the compared rows, for every input family."""
    errors = {}
    rows = compared_rows(q.shape[2])
    with torch.no_grad():
        for family, field in ERROR_FIELDS.items():
            fq, fk, fv = family_inputs(family, q, k, v, shared_qk=spec.shared_qk, seed=seed)
            out = module(fq, fk, fv, causal=causal)[:, :, rows.to(q.device)].to("cpu", torch.float64)
            exact = exact_reference(fq, fk, fv, causal=causal, shared_qk=spec.shared_qk, rows=rows)
            errors[field] = float((out - exact).norm() / exact.norm())
    return errors
