"""Causal linear attention by chunks, the forward and its written-out backward (``_Causal``): quadratic within
a chunk, the sums S and z carried across chunks and blocks. ``linear``'s docstring describes the algorithm;
``linear_core`` holds the feature maps and the sums; this module registers nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from attention_impls.base import pad_seq
from attention_impls.linear_core import (
    _FEATURE_GRADS,
    _STATE_DTYPES,
    FeatureMap,
    _divide,
    _identity,
    _key_state,
    _key_state_grads,
    _normalizer,
    _output_grads,
    _phi,
    _positions,
    _row_sums,
    _State,
    _zero_state,
)


def _chunk_rows(x: torch.Tensor, *, kv_heads: int, chunk: int) -> torch.Tensor:
    """(batch, heads, padded, e) -> (batch, kv_heads, n_chunks, group * chunk, e): each chunk's rows of the
    group's heads side by side (a view when group is 1)."""
    batch, heads, padded, dim = x.shape
    group, n_chunks = heads // kv_heads, padded // chunk
    x = x.view(batch, kv_heads, group, n_chunks, chunk, dim)  # (batch, kv_heads, group, n_chunks, chunk, e)
    return x.transpose(2, 3).reshape(batch, kv_heads, n_chunks, group * chunk, dim)


def _unchunk_rows(x: torch.Tensor, *, heads: int, chunk: int) -> torch.Tensor:
    """The inverse of :func:`_chunk_rows`: (batch, kv_heads, n_chunks, group * chunk, e) -> (batch, heads, padded, e)."""
    batch, kv_heads, n_chunks, _, dim = x.shape
    x = x.view(batch, kv_heads, n_chunks, heads // kv_heads, chunk, dim)  # (batch, kv_heads, n_chunks, group, ...)
    return x.transpose(2, 3).reshape(batch, heads, n_chunks * chunk, dim)  # (batch, heads, padded, e)


def _sums_before(x: torch.Tensor, *, after: bool = False) -> torch.Tensor:
    """For each chunk, the sum of x over the chunks before it (after it with ``after``): x (b, kv_heads,
    n_chunks, ...).

    One product with a strictly triangular matrix of ones over the flattened states, in place of aten's cumsum
    along a middle dimension (and flips): the causal training step at 8192 tokens 129.6 ms against 134.0.
    """
    n_chunks = x.shape[2]
    ones = torch.ones(n_chunks, n_chunks, dtype=x.dtype, device=x.device)
    triangle = ones.triu(1) if after else ones.tril(-1)  # (n_chunks, n_chunks)
    return torch.matmul(triangle, x.flatten(3)).view_as(x)  # (b, kv_heads, n_chunks, ...)


def _add_product(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x += a @ b for x (..., r, e), a (..., r, m), b (..., m, e) with the same leading dimensions: the product
    adds itself into a contiguous x (no pass over x of its own) when the dtypes agree."""
    if x.is_contiguous() and a.dtype == b.dtype == x.dtype:
        x.flatten(0, -3).baddbmm_(a.flatten(0, -3), b.flatten(0, -3))
        return x
    return x.add_(a @ b)


def _mask_later_keys_(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Zero, in place, the entries of (..., group * chunk, chunk) where key j is after row i's query
    (j > i mod chunk)."""
    if group == 1:
        return scores.tril_()
    chunk = scores.shape[-1]
    return scores.masked_fill_(~torch.tril(scores.new_ones(chunk, chunk, dtype=torch.bool)).repeat(group, 1), 0)


def _chunks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, phi: FeatureMap, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block cut into chunks: q (batch, heads, length, d), k, v (batch, kv_heads, length, d) aligned position
    by position -> phi(Q_c) (batch, kv_heads, n_chunks, group * chunk, d), phi(K_c) and V_c (batch, kv_heads,
    n_chunks, chunk, d), and A_c = tril(phi(Q_c) phi(K_c)^T) (batch, kv_heads, n_chunks, group * chunk, chunk),
    in the inputs' dtype.

    Padding (only in the last block) goes after every real position: causally invisible, and phi(k) is padded
    with zeros, so it adds nothing to any sum."""
    kv_heads = k.shape[1]
    q_c = _chunk_rows(pad_seq(phi(q), chunk), kv_heads=kv_heads, chunk=chunk)  # (b, kvh, nc, g * chunk, d)
    k_c = pad_seq(phi(k), chunk).unflatten(2, (-1, chunk))  # (batch, kv_heads, n_chunks, chunk, head_dim)
    # contiguous: a slice of v across heads would be copied by each product that takes it
    v_c = pad_seq(v, chunk).contiguous().unflatten(2, (-1, chunk))  # (batch, kv_heads, n_chunks, chunk, head_dim)
    # within a chunk: key j visible to row i of the group's rows when j <= i mod chunk
    scores = _mask_later_keys_(torch.matmul(q_c, k_c.transpose(-2, -1)), q.shape[1] // kv_heads)
    return q_c, k_c, v_c, scores


class _Sums(NamedTuple):
    """What a block's output needs besides its chunks, and what the backward keeps of the forward: the sums S
    and z over every position before each chunk, (batch, kv_heads, n_chunks, d, d) and (..., n_chunks, d), and the
    normalizer before its floor, phi(Q_c) z_c + A_c 1 (batch, kv_heads, n_chunks, group * chunk), in the sums'
    dtype."""

    prefix: _State
    raw: torch.Tensor


def _block_sums(
    q_c: torch.Tensor, k_c: torch.Tensor, v_c: torch.Tensor, scores: torch.Tensor, state: _State, acc: torch.dtype
) -> tuple[_Sums, _State]:
    """The block's prefix sums and normalizers from its chunks (``_chunks``) and the state entering it; and the
    state leaving it."""
    k_acc = k_c.to(acc)  # (batch, kv_heads, n_chunks, chunk, head_dim)
    chunk_kv = torch.matmul(k_acc.transpose(-2, -1), v_c.to(acc))  # (batch, kv_heads, n_chunks, d, d)
    chunk_z = k_acc.sum(dim=-2)  # (batch, kv_heads, n_chunks, head_dim)
    # across chunks: exclusive prefix sums of the chunk sums, starting from the carried state
    prefix = _State(
        _sums_before(chunk_kv).add_(state.kv.unsqueeze(2)),  # (batch, kv_heads, n_chunks, head_dim, head_dim)
        _sums_before(chunk_z).add_(state.z.unsqueeze(2)),  # (batch, kv_heads, n_chunks, head_dim)
    )
    raw = _normalizer(q_c.to(acc), prefix.z).add_(scores.sum(dim=-1))  # (batch, kv_heads, n_chunks, g * chunk)
    leaving = _State(prefix.kv[:, :, -1] + chunk_kv[:, :, -1], prefix.z[:, :, -1] + chunk_z[:, :, -1])
    return _Sums(prefix, raw), leaving


def _causal(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    phi: FeatureMap,
    chunk: int,
    block: int,
    eps: float,
    state: _State | None = None,
    keep: bool = False,
) -> tuple[torch.Tensor, list[_Sums]]:
    """Causal linear attention by chunks: quadratic within a chunk, carried sums S and z across chunks.

    q (batch, heads, length, d) and k, v (batch, kv_heads, length, d) are aligned position by position;
    ``state`` holds the keys before them (cross lengths), None: nothing. Returns the output and, with ``keep``,
    each block's ``_Sums`` (block by block, ``block`` positions each; else none).
    """
    heads, seq_len = q.shape[1], q.shape[2]
    group = heads // k.shape[1]
    acc = _STATE_DTYPES.get(q.dtype, q.dtype)  # the sums' dtype: float32 for half inputs
    state = _zero_state(k, v, acc) if state is None else state
    out = v.new_empty(*q.shape[:3], v.shape[-1])  # (batch, heads, seq_len, head_dim)
    kept = []  # each block's sums
    for start in range(0, seq_len, block):
        stop = min(start + block, seq_len)
        q_c, k_c, v_c, scores = _chunks(*(_positions(x, start, stop) for x in (q, k, v)), phi=phi, chunk=chunk)
        sums, state = _block_sums(q_c, k_c, v_c, scores, state, acc)
        if keep:
            kept.append(sums)
        # phi(Q_c) S_c + A_c V_c over max(raw, eps): (batch, kv_heads, n_chunks, group * chunk, head_dim)
        num = _add_product(torch.matmul(q_c.to(acc), sums.prefix.kv), scores, v_c)
        if group == 1 and (stop - start) % chunk == 0:  # the output's positions are the chunks' rows: a view
            _divide(num, sums.raw, eps=eps, out=out[:, :, start:stop].unflatten(2, (-1, chunk)))
        else:
            num = _divide(num, sums.raw, eps=eps)
            out[:, :, start:stop] = _unchunk_rows(num, heads=heads, chunk=chunk)[:, :, : stop - start]
    return out, kept


class _Causal(torch.autograd.Function):
    """Causal linear attention under autograd: the forward is the blocked one of ``_causal``, and the backward,
    written out, walks the blocks from the last. It keeps the inputs, the output and each block's ``_Sums`` (the
    prefix sums before every chunk: n / chunk x d x d numbers per key/value head, as many as k's at chunk = d),
    and recomputes each block's feature maps and quadratic form (``_chunks``). Per chunk c of a block, with
    (P_c, p_c) the sums S and z before the chunk and A_c = tril(phi(Q_c) phi(K_c)^T):

        num_c = phi(Q_c) P_c + A_c V_c,  raw_c = phi(Q_c) p_c + A_c 1;  dN_c and d_raw_c as for the non-causal form
        dA_c = tril(dN_c V_c^T + d_raw_c 1^T)
        dphi(Q_c) = dN_c P_c^T + d_raw_c p_c^T + dA_c phi(K_c)
        dC_c = G + sum over the block's later chunks c' of phi(Q_c')^T dN_c', and dc_c likewise with d_raw
        (G, g: the gradients of the sums the block hands on, from the blocks after it)
        dphi(K_c) = dA_c^T phi(Q_c) + V_c dC_c^T + dc_c,  dV_c = A_c^T dN_c + phi(K_c) dC_c

    and the sums entering the block get G + sum_c phi(Q_c)^T dN_c, g + sum_c phi(Q_c)^T d_raw_c. The keys before
    the queries (cross lengths) get theirs from the state's gradient at the start, as the non-causal keys do.
    """

    @staticmethod
    def forward(ctx, q, k, v, name: str, chunk: int, block: int, eps: float):
        phi = _phi(name)
        out, kept = _causal_with_earlier_keys(q, k, v, phi=phi, chunk=chunk, block=block, eps=eps, keep=True)
        ctx.save_for_backward(q, k, v, out, *(t for sums in kept for t in (*sums.prefix, sums.raw)))
        ctx.name, ctx.chunk, ctx.block, ctx.eps = name, chunk, block, eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out):
        q, k, v, out, *saved = ctx.saved_tensors
        kept = [_Sums(_State(*saved[i : i + 2]), saved[i + 2]) for i in range(0, len(saved), 3)]
        phi, grad, chunk, block, eps = _phi(ctx.name), _FEATURE_GRADS[ctx.name], ctx.chunk, ctx.block, ctx.eps
        heads, q_len, kv_heads = q.shape[1], q.shape[2], k.shape[1]
        before = k.shape[2] - q_len
        acc = kept[0].raw.dtype
        group = heads // kv_heads
        d_q, d_k, d_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        g_state = _State(*(torch.zeros_like(sums[:, :, 0]) for sums in kept[0].prefix))  # G, g: as S and z
        starts = list(range(0, q_len, block))
        for start, (prefix, raw) in zip(reversed(starts), reversed(kept), strict=True):
            stop = min(start + block, q_len)
            length = stop - start
            # recomputed in acc: the feature maps of half inputs too (their gradients are taken in acc)
            parts = (x.to(acc) for x in (q[:, :, start:stop], k[:, :, before + start : before + stop]))
            phi_q, phi_k = (phi(x) for x in parts)  # (batch, heads or kv_heads, length, head_dim)
            tail_v = v[:, :, before + start : before + stop].to(acc)
            q_c, k_c, v_c, scores = _chunks(phi_q, phi_k, tail_v, phi=_identity, chunk=chunk)
            d_out_c, out_c = (
                _chunk_rows(pad_seq(x[:, :, start:stop], chunk), kv_heads=kv_heads, chunk=chunk) for x in (d_out, out)
            )
            d_num, d_raw = _output_grads(d_out_c, out_c, raw, eps=eps)  # (b, kvh, nc, g*c, d), (b, kvh, nc, g*c)
            d_prefix = _State(q_c.transpose(-2, -1) @ d_num, _row_sums(q_c, d_raw))  # per chunk
            d_chunk = _State(  # dC_c, dc_c: (batch, kv_heads, n_chunks, head_dim, head_dim), (..., n_chunks, d)
                _sums_before(d_prefix.kv, after=True).add_(g_state.kv.unsqueeze(2)),
                _sums_before(d_prefix.z, after=True).add_(g_state.z.unsqueeze(2)),
            )
            g_state = _State(g_state.kv + d_prefix.kv.sum(dim=2), g_state.z + d_prefix.z.sum(dim=2))
            d_scores = _mask_later_keys_((d_num @ v_c.transpose(-2, -1)).add_(d_raw.unsqueeze(-1)), group)
            d_phi_q = (d_num @ prefix.kv.transpose(-2, -1)).addcmul_(d_raw.unsqueeze(-1), prefix.z.unsqueeze(-2))
            d_phi_q = _add_product(d_phi_q, d_scores, k_c)  # (batch, kv_heads, n_chunks, group * chunk, d)
            d_phi_k = (v_c @ d_chunk.kv.transpose(-2, -1)).add_(d_chunk.z.unsqueeze(-2))
            d_phi_k = _add_product(d_phi_k, d_scores.transpose(-2, -1), q_c)  # (b, kvh, nc, chunk, d)
            d_v_c = _add_product(k_c @ d_chunk.kv, scores.transpose(-2, -1), d_num)  # (b, kvh, nc, chunk, d)
            d_phi_q = _unchunk_rows(d_phi_q, heads=heads, chunk=chunk)[:, :, :length]  # (b, h, length, d)
            grad(phi_q, d_phi_q, out=d_q[:, :, start:stop])  # written in place: no copy of the block
            grad(phi_k, d_phi_k.flatten(2, 3)[:, :, :length], out=d_k[:, :, before + start : before + stop])
            d_v[:, :, before + start : before + stop] = d_v_c.flatten(2, 3)[:, :, :length]
        if before:
            k_0, v_0, d_k_0, d_v_0 = (x[:, :, :before] for x in (k, v, d_k, d_v))  # the keys before the queries
            _key_state_grads(k_0, v_0, g_state, name=ctx.name, block=block, d_k=d_k_0, d_v=d_v_0)
        return d_q, d_k, d_v, None, None, None, None


def _causal_with_earlier_keys(q, k, v, *, phi: FeatureMap, chunk: int, block: int, eps: float, keep: bool = False):
    """Causal linear attention with kv_len >= q_len: the keys before the first query's own position (every query
    sees them, the lower-right alignment) summed into the starting state first. Returns ``_causal``'s output and
    its blocks' sums."""
    before = k.shape[2] - q.shape[2]
    acc = _STATE_DTYPES.get(q.dtype, q.dtype)
    state = _key_state(k[:, :, :before], v[:, :, :before], phi=phi, block=block, acc=acc) if before else None
    tail_k, tail_v = k[:, :, before:], v[:, :, before:]  # (batch, kv_heads, q_len, head_dim), aligned with q
    return _causal(q, tail_k, tail_v, phi=phi, chunk=chunk, block=block, eps=eps, state=state, keep=keep)
