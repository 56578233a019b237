"""Linear attention: a kernel feature map in place of the softmax.

Paper: Katharopoulos et al. 2020, "Transformers are RNNs: Fast Autoregressive
Transformers with Linear Attention", https://arxiv.org/abs/2006.16236

With a positive feature map phi (elu(x) + 1 in the paper) the attention of
query i is

    out_i = phi(q_i)^T S / (phi(q_i)^T z),   S = sum_j phi(k_j) v_j^T,   z = sum_j phi(k_j)

Non-causal, S (head_dim x head_dim) and z are sums over all positions:
O(n d^2) time. Causal, the sums run over j <= i only. Keeping every prefix
S_i would take O(n d^2) memory, so the sequence is cut into chunks of
``chunk_size`` positions: within a chunk the quadratic form (phi(Q_c)
phi(K_c)^T masked lower-triangular) V_c is used, and the chunks before it
enter through the carried state S and z: time O(n (d^2 + c d)) with
c = chunk_size.

Both paths walk the sequence a block at a time (``_BLOCK_ELEMENTS`` entries
of q on the CPU, more on accelerators; a whole number of chunks; vectorized
over the chunks of a block, a Python loop over blocks), applying the feature
map to one block at a time and writing each block's result straight into the
output. The only allocation that grows with n is the output itself: memory
O(n d), and no large temporaries (which on CPU cost page faults as much as
arithmetic).

Under autograd both forms are one autograd function each, whose backward is written out and walks the same
blocks, recomputing the feature maps (``_NonCausal``, ``_Causal``): it keeps the inputs, the output and the
states entering the blocks, not every block's intermediates.

For float16 and bfloat16 inputs the sums over positions (S and z, the chunk
states and their prefix sums, and each query's product with them) are kept in
float32: a float16 sum overflows near 56K positions of order-one terms, and a
bfloat16 one stops growing once each term is below its 8-bit precision. The
feature map and the quadratic form within a chunk stay in the input dtype, and
the result is written back in it.

The normalizer z is carried as an extra column of the values (v | 1), so one
matrix product gives numerator and denominator together. The denominator is
floored at ``eps`` (clamp, not add: outputs are exact where it is not tiny), so
a query whose features all vanish (relu, or elu + 1 of very negative inputs)
yields zeros, not NaN.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from attention_impls import blocks
from attention_impls.base import (
    AttentionModule,
    check_qkv,
    choice_error,
    group_queries,
    int_error,
    needs_grad,
    pad_seq,
    ungroup_queries,
)
from attention_impls.decoding import DecodeCache
from attention_impls.registry import register

__all__ = ["FEATURE_MAPS", "LinearAttention", "LinearConfig", "feature_map", "linear_attention"]

# elements (batch x heads x positions x head_dim) of q handled by one vectorized step on the CPU, rounded to
# whole chunks: bounds the temporaries (b=1, h=8, d=64: 1024 positions, causal 512; measured best on CPU: the
# non-causal forward at 8192 tokens took 16.8 ms with 2^19, 18.2 with 2^20, 16.7 with 2^18, 21.1 with 2^17; the
# causal training step at 8192 and 16384 tokens 117 and 272 ms with 2^18, 131 and 283 with 2^19, 130 and 288
# with 2^17, its forward 30.8 and 73.5 ms with 2^18, 32.2 and 72.1 with 2^19)
_BLOCK_ELEMENTS = 1 << 19
_CAUSAL_BLOCK_ELEMENTS = 1 << 18
# the same on accelerators, where a step is a dozen kernel launches whatever its size (the CPU's values would
# make it launch-bound): on CUDA, 128K positions at b=1, h=8, d=64 in one step (64K causal), whose temporaries
# (about 3 tensors of this size, 7 causal; float32 copies for half inputs) stay near 1 GiB; MPS, sharing the
# machine's memory, four times less (see blocks.ACCELERATOR_CHUNK_ELEMENTS)
_ACCELERATOR_BLOCK_ELEMENTS = {"cuda": 1 << 26, "mps": 1 << 24}
_ACCELERATOR_CAUSAL_BLOCK_ELEMENTS = {"cuda": 1 << 25, "mps": 1 << 23}
# the dtype of the sums over positions, per input dtype (others keep their own)
_STATE_DTYPES = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def _elu_plus_one_grad(y: torch.Tensor, grad: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient of elu(x) + 1's input from its output y: min(y, 1) * grad (y = x + 1 > 1 where x > 0 and
    y = exp(x) <= 1 elsewhere); written into ``out`` when given."""
    slope = y.clamp(max=1.0)
    return slope.mul_(grad) if out is None else torch.mul(slope, grad, out=out)


_LOG2_E = math.log2(math.e)


def _elu_plus_one_values(x: torch.Tensor) -> torch.Tensor:
    """elu(x) + 1 = exp(min(x, 0)) + relu(x), the exponential as exp2(x log2 e): aten's exp2 CPU kernel takes
    half the time of its exp (0.20 against 0.43 ms on a 2^19-element block), the extra product included."""
    return x.clamp(max=0).mul_(_LOG2_E).exp2_().add_(F.relu(x))


class _EluPlusOne(torch.autograd.Function):
    """elu(x) + 1 = exp(min(x, 0)) + relu(x): aten's elu CPU kernel is four times slower than exp (13% of
    linear attention's forward at n=8192). The forward is the same arithmetic with or without autograd;
    the backward needs only the output (which the next product keeps anyway): ``_elu_plus_one_grad``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = _elu_plus_one_values(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return _elu_plus_one_grad(y, grad)


def _elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    if needs_grad(x):
        return _EluPlusOne.apply(x)
    return _elu_plus_one_values(x)  # the same arithmetic, without building a graph


def _relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x)


def _softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=-1)  # max-subtracted: bounded in (0, 1] for any magnitude


FeatureMap = Callable[[torch.Tensor], torch.Tensor]

FEATURE_MAPS: dict[str, FeatureMap] = {
    "elu": _elu_plus_one,  # elu(x) + 1, the paper's choice: positive, ~linear for x > 0
    "relu": _relu,  # max(x, 0): zero features possible, the eps floor keeps the output finite
    "softmax": _softmax,  # softmax over head_dim (as in Shen et al. 2018 for queries): positive, bounded
}


@dataclasses.dataclass(frozen=True)
class LinearConfig:
    """Hyperparameters of linear attention."""

    feature_map: str = "elu"  # phi: "elu" (elu(x) + 1, the paper's), "relu" or "softmax" (over head_dim)
    chunk_size: int = 64  # causal path: positions per chunk of the quadratic intra-chunk form
    eps: float = 1e-6  # floor of the normalizer phi(q)^T z


# each feature map's derivative from its output y and the gradient g of y: the gradient of its input
_FEATURE_GRADS: dict[str, Callable[..., torch.Tensor]] = {  # (y, g, out=None): into out when given
    "elu": _elu_plus_one_grad,
    "relu": lambda y, g, out=None: torch.mul(g, y > 0, out=out),
    "softmax": lambda y, g, out=None: torch.mul(g - (g * y).sum(dim=-1, keepdim=True), y, out=out),
}


def _blockwise(length: int, block: int, compute) -> tuple[torch.Tensor, ...]:
    """``compute(start, stop)``'s tensors (batch, heads, stop - start, e) for each block of positions, put together
    along the positions: written into one tensor each, or, for a single block, the block's own."""
    if block >= length:
        return compute(0, length)
    totals = None
    for start in range(0, length, block):
        parts = compute(start, min(length, start + block))
        if totals is None:
            totals = [part.new_empty(*part.shape[:2], length, part.shape[3]) for part in parts]
        for total, part in zip(totals, parts, strict=True):
            total[:, :, start : start + part.shape[2]] = part
    return tuple(totals)


def _key_state_grads(
    k: torch.Tensor, v: torch.Tensor, d_state: torch.Tensor, *, name: str, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of k and v (batch, kv_heads, n, d) from the gradient of (S | z) = sum_j phi(k_j) (v_j | 1)^T:
    dphi(K) = V dS^T + dz, dV = phi(K) dS, a block of positions at a time."""
    phi, grad, dim_v = FEATURE_MAPS[name], _FEATURE_GRADS[name], v.shape[-1]
    d_s, d_z = d_state[..., :dim_v], d_state[..., dim_v:].transpose(-2, -1)  # (b, kvh, d, d), (b, kvh, 1, d)

    def key_grads(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        phi_k = phi(k[:, :, start:stop]).to(d_state.dtype)  # (batch, kv_heads, length, head_dim)
        d_phi_k = (v[:, :, start:stop].to(d_state.dtype) @ d_s.transpose(-2, -1)).add_(d_z)
        return grad(phi_k, d_phi_k).to(k.dtype), (phi_k @ d_s).to(v.dtype)

    return _blockwise(k.shape[2], block, key_grads)


def _numerator_grads(d_out: torch.Tensor, out: torch.Tensor, raw: torch.Tensor, *, eps: float) -> torch.Tensor:
    """dN = (dOut / den | -(dOut . out) / den), den = max(raw, eps), the second column zero where eps holds den:
    the gradient of num = (numerator | normalizer) from that of out = numerator / den. d_out, out (..., rows, d)
    and raw (..., rows, 1) -> (..., rows, d + 1), in raw's dtype."""
    dim_v = out.shape[-1]
    d_num = raw.new_empty(*raw.shape[:-1], dim_v + 1)  # (..., rows, head_dim + 1)
    d_value = torch.div(d_out, raw.clamp_min(eps), out=d_num[..., :dim_v])
    d_den = torch.linalg.vecdot(d_value, out.to(raw.dtype)).unsqueeze(-1).neg_()
    d_num[..., dim_v:] = d_den.masked_fill_(raw < eps, 0.0)
    return d_num


class _NonCausal(torch.autograd.Function):
    """Non-causal linear attention under autograd: the forward is the blocked one of ``_noncausal`` (each block's
    feature maps computed in cache), and the backward, written out, walks the same blocks, recomputing the
    feature maps instead of keeping them (it keeps only the inputs, the output and the state):

        num = phi(Q) (S | z),  (S | z) = phi(K)^T (V | 1),  out = num[:d] / den,  den = max(phi(Q) z, eps)

        dN = (dOut / den | -(dOut . out) / den)   (the second column zero where eps holds den)
        d(S | z) = sum over query blocks of phi(Q)^T dN,  dphi(Q) = dN (S | z)^T
        dphi(K) = V dS^T + dz,  dV = phi(K) dS

    and each feature map's derivative from its output. q (batch, heads, q_len, d), k, v (batch, kv_heads, n, d).
    """

    @staticmethod
    def forward(ctx, q, k, v, name: str, block: int, eps: float):
        out, state = _noncausal(q, k, v, phi=FEATURE_MAPS[name], block=block, eps=eps)
        ctx.save_for_backward(q, k, v, state, out)
        ctx.name, ctx.block, ctx.eps = name, block, eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out):
        q, k, v, state, out = ctx.saved_tensors
        phi, grad, block, eps = FEATURE_MAPS[ctx.name], _FEATURE_GRADS[ctx.name], ctx.block, ctx.eps
        heads, kv_heads, dim_v = q.shape[1], k.shape[1], v.shape[-1]
        acc = state.dtype
        rows, out_rows = group_queries(q, kv_heads), group_queries(out, kv_heads)  # (batch, kv_heads, rows, d)
        d_rows = group_queries(d_out, kv_heads)  # (batch, kv_heads, rows, head_dim)
        z = state[..., dim_v:]  # (batch, kv_heads, head_dim, 1)
        d_state = torch.zeros_like(state)  # (batch, kv_heads, head_dim, head_dim + 1)

        def query_grads(start: int, stop: int) -> tuple[torch.Tensor]:  # and d_state, summed over the blocks
            phi_q = phi(rows[:, :, start:stop]).to(acc)  # (batch, kv_heads, length, head_dim)
            raw = phi_q @ z  # (batch, kv_heads, length, 1): the normalizer before its floor
            d_num = _numerator_grads(d_rows[:, :, start:stop], out_rows[:, :, start:stop], raw, eps=eps)
            d_state.add_(phi_q.transpose(-2, -1) @ d_num)
            return (grad(phi_q, d_num @ state.transpose(-2, -1)).to(q.dtype),)

        (d_q,) = _blockwise(rows.shape[2], block, query_grads)  # (batch, kv_heads, rows, head_dim)
        d_k, d_v = _key_state_grads(k, v, d_state, name=ctx.name, block=block)  # (batch, kv_heads, n, d) each
        return ungroup_queries(d_q, heads), d_k, d_v, None, None, None


def feature_map(name: str) -> FeatureMap:
    """The feature map called ``name``; a clear error on unknown names."""
    if name not in FEATURE_MAPS:
        raise ValueError(f"unknown feature_map {name!r}; choose one of {', '.join(FEATURE_MAPS)}")
    return FEATURE_MAPS[name]


def _block_positions(
    shape: torch.Size | tuple[int, ...], *, chunk: int, causal: bool, device: str | torch.device
) -> int:
    """Positions per vectorized step for (batch, heads, seq_len, head_dim) inputs on ``device``: whole chunks."""
    batch, heads, _, dim = shape
    if causal:
        elements = blocks.device_value(_CAUSAL_BLOCK_ELEMENTS, _ACCELERATOR_CAUSAL_BLOCK_ELEMENTS, device)
    else:
        elements = blocks.device_value(_BLOCK_ELEMENTS, _ACCELERATOR_BLOCK_ELEMENTS, device)
    return chunk * max(1, elements // (batch * heads * dim * chunk))


def _store(out: torch.Tensor, start: int, num: torch.Tensor, *, eps: float) -> None:
    """out[:, :, start:start + length] = numerator / max(normalizer, eps); ``num`` is (..., length, d_v + 1).

    Its last column is the normalizer. The quotient is written straight into ``out`` (no autograd: under it
    the blocks are one), cast to ``out``'s dtype (from float32 for half-precision inputs).
    """
    dim_v = out.shape[-1]
    length = min(num.shape[2], out.shape[2] - start)  # drop the padding rows
    numerator = num[:, :, :length, :dim_v]  # (batch, heads, length, head_dim)
    denominator = num[:, :, :length, dim_v:].clamp_min(eps)  # (batch, heads, length, 1)
    torch.div(numerator, denominator, out=out[:, :, start : start + length])


def _positions(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """x[:, :, start:stop], or x itself when that is all of it (under autograd a slice's backward fills a
    gradient the size of the whole input)."""
    return x if start == 0 and stop >= x.shape[2] else x[:, :, start:stop]


def _quotient(num: torch.Tensor, *, dim_v: int, eps: float) -> torch.Tensor:
    """numerator / max(normalizer, eps) of ``num`` (..., length, d_v + 1), whose last column is the normalizer."""
    return num[..., :dim_v] / num[..., dim_v:].clamp_min(eps)


def _with_ones(v: torch.Tensor) -> torch.Tensor:
    """(v | 1): the extra column carries the normalizer through the same products."""
    ones = v.new_ones(*v.shape[:-1], 1)  # (batch, heads, length, 1)
    return torch.cat([v, ones], dim=-1)  # (batch, heads, length, head_dim + 1)


def _key_state(k: torch.Tensor, v: torch.Tensor, *, phi: FeatureMap, block: int, acc: torch.dtype) -> torch.Tensor:
    """(S | z) = sum_j phi(k_j) (v_j | 1)^T over every position of k, v (batch, kv_heads, length, head_dim).

    Returns (batch, kv_heads, head_dim, head_dim + 1) in ``acc``, a block of positions at a time.
    """
    batch, kv_heads, length, dim = k.shape
    dim_v = v.shape[-1]
    kv = k.new_zeros(batch, kv_heads, dim, dim_v, dtype=acc)  # (batch, kv_heads, head_dim, head_dim): S
    z = k.new_zeros(batch, kv_heads, dim, dtype=acc)  # (batch, kv_heads, head_dim): z = sum_j phi(k_j)
    for start in range(0, length, block):
        phi_k = phi(_positions(k, start, start + block)).to(acc)  # (batch, kv_heads, length, head_dim)
        v_blk = _positions(v, start, start + block).to(acc)  # (batch, kv_heads, length, head_dim)
        kv = kv + torch.matmul(phi_k.transpose(-2, -1), v_blk)  # (batch, kv_heads, head_dim, head_dim)
        z = z + phi_k.sum(dim=2)  # (batch, kv_heads, head_dim)
    return torch.cat([kv, z.unsqueeze(-1)], dim=-1)  # (batch, kv_heads, head_dim, head_dim + 1): (S | z)


def _noncausal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, phi: FeatureMap, block: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """phi(Q) (phi(K)^T V) normalized by phi(Q) sum_j phi(k_j), a block of positions at a time; and (S | z).

    Each key/value head's state serves its group of query heads, their rows side by side (``group_queries``).
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    acc = _STATE_DTYPES.get(q.dtype, q.dtype)  # the sums' dtype: float32 for half inputs
    state = _key_state(k, v, phi=phi, block=block, acc=acc)  # (batch, kv_heads, head_dim, head_dim + 1)
    rows = group_queries(q, kv_heads)  # (batch, kv_heads, group * q_len, head_dim)
    out = v.new_empty(*rows.shape[:3], v.shape[-1])  # (batch, kv_heads, group * q_len, head_dim), the input dtype
    for start in range(0, rows.shape[2], block):
        phi_q = phi(rows[:, :, start : start + block]).to(acc)  # (batch, kv_heads, length, head_dim)
        _store(out, start, torch.matmul(phi_q, state), eps=eps)  # (batch, kv_heads, length, head_dim + 1)
    return ungroup_queries(out, heads), state  # (batch, heads, q_len, head_dim), (S | z)


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
    """For each chunk, the sum of x over the chunks before it (after it with ``after``): x (..., n_chunks, d, e).

    One product with a strictly triangular matrix of ones over the flattened states, in place of aten's cumsum
    along a middle dimension (and flips): the causal training step at 8192 tokens 129.6 ms against 134.0.
    """
    n_chunks = x.shape[-3]
    ones = torch.ones(n_chunks, n_chunks, dtype=x.dtype, device=x.device)
    triangle = ones.triu(1) if after else ones.tril(-1)  # (n_chunks, n_chunks)
    return torch.matmul(triangle, x.flatten(-2)).view_as(x)  # (..., n_chunks, d, e)


def _causal(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    phi: FeatureMap,
    chunk: int,
    block: int,
    eps: float,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Causal linear attention by chunks: quadratic within a chunk, carried state (S | z) across chunks.

    q (batch, heads, length, d) and k, v (batch, kv_heads, length, d) are aligned position by position;
    ``state`` (batch, kv_heads, d, d + 1) holds the keys before them (cross lengths), None: nothing. Returns the
    output and the state entering each block of ``block`` positions.
    """
    batch, heads, seq_len, dim = q.shape
    kv_heads, dim_v = k.shape[1], v.shape[-1]
    group = heads // kv_heads
    acc = _STATE_DTYPES.get(q.dtype, q.dtype)  # the sums' dtype: float32 for half inputs
    if state is None:
        # state = sum over the positions before the block of phi(k) (v | 1)^T; its last column is z
        state = q.new_zeros(batch, kv_heads, dim, dim_v + 1, dtype=acc)  # (batch, kv_heads, head_dim, head_dim + 1)
    # key j of a chunk visible to row i of the group's rows when j <= i mod chunk (None: tril_ does it)
    keep = torch.tril(q.new_ones(chunk, chunk, dtype=torch.bool)).repeat(group, 1) if group > 1 else None
    whole = block >= seq_len  # one block (always under autograd): no output buffer to write slices of
    out = None if whole else v.new_empty(batch, heads, seq_len, dim_v)  # (batch, heads, seq_len, head_dim)
    entering = []  # the state entering each block
    for start in range(0, seq_len, block):
        entering.append(state)
        stop = min(start + block, seq_len)
        # padding (only in the last block) goes after every real position: causally invisible,
        # and phi(k) is padded with zeros, so it adds nothing to any state
        q_blk = pad_seq(phi(_positions(q, start, stop)), chunk)  # (batch, heads, padded, head_dim)
        k_blk = pad_seq(phi(_positions(k, start, stop)), chunk)  # (batch, kv_heads, padded, head_dim)
        v_blk = pad_seq(_with_ones(_positions(v, start, stop)), chunk)  # (batch, kv_heads, padded, head_dim + 1)
        padded = q_blk.shape[2]
        n_chunks = padded // chunk
        q_c = _chunk_rows(q_blk, kv_heads=kv_heads, chunk=chunk)  # (batch, kv_heads, n_chunks, group*chunk, d)
        k_c = k_blk.view(batch, kv_heads, n_chunks, chunk, dim)  # (batch, kv_heads, n_chunks, chunk, head_dim)
        v_c = v_blk.view(batch, kv_heads, n_chunks, chunk, dim_v + 1)  # (batch, kv_heads, n_chunks, chunk, d + 1)

        # within a chunk: the quadratic form, key j visible to query i when j <= i (in the input dtype)
        scores = torch.matmul(q_c, k_c.transpose(-2, -1))  # (batch, kv_heads, n_chunks, group * chunk, chunk)
        scores = scores.tril_() if keep is None else scores.masked_fill_(~keep, 0)
        # across chunks: exclusive prefix sums of the chunk states, starting from the carried state (in acc)
        k_t = k_c.transpose(-2, -1).to(acc)  # (batch, kv_heads, n_chunks, head_dim, chunk)
        chunk_states = torch.matmul(k_t, v_c.to(acc))  # (batch, kv_heads, n_chunks, head_dim, head_dim + 1)
        prefix = _sums_before(chunk_states).add_(state.unsqueeze(2))  # (batch, kv_heads, n_chunks, d, d + 1)
        state = prefix[:, :, -1] + chunk_states[:, :, -1]  # (batch, kv_heads, head_dim, head_dim + 1)

        # (batch, kv_heads, n_chunks, group * chunk, head_dim + 1), in acc
        num = torch.matmul(q_c.to(acc), prefix) + torch.matmul(scores, v_c)
        num = _unchunk_rows(num, heads=heads, chunk=chunk)  # (batch, heads, padded, head_dim + 1)
        if whole:
            return _quotient(num[:, :, :seq_len], dim_v=dim_v, eps=eps).to(v.dtype), entering  # (b, h, seq_len, d)
        _store(out, start, num, eps=eps)
    return out, entering


class _Causal(torch.autograd.Function):
    """Causal linear attention under autograd: the forward is the blocked one of ``_causal``, and the backward,
    written out, walks the blocks from the last, recomputing each block's feature maps and chunk states from the
    state that entered it (kept from the forward, with the inputs and the output). Per chunk c of a block, with
    P_c the state before the chunk, C_c = phi(K_c)^T (V_c | 1) and A_c = tril(phi(Q_c) phi(K_c)^T):

        num_c = phi(Q_c) P_c + A_c (V_c | 1);  dN_c as for the non-causal form
        dphi(Q_c) = dN_c P_c^T + tril(dN_c (V_c | 1)^T) phi(K_c)
        dC_c = G + sum over the block's later chunks c' of phi(Q_c')^T dN_c'   (G: the gradient of the state the
        block hands on, from the blocks after it)
        dphi(K_c) = tril(dN_c (V_c | 1)^T)^T phi(Q_c) + (V_c | 1) dC_c^T,  d(V_c | 1) = A_c^T dN_c + phi(K_c) dC_c

    and the state entering the block gets G + sum_c phi(Q_c)^T dN_c. The keys before the queries (cross lengths)
    get theirs from the state's gradient at the start, as the non-causal keys do.
    """

    @staticmethod
    def forward(ctx, q, k, v, name: str, chunk: int, block: int, eps: float):
        out, entering = _causal_with_earlier_keys(q, k, v, phi=FEATURE_MAPS[name], chunk=chunk, block=block, eps=eps)
        ctx.save_for_backward(q, k, v, out, *entering)
        ctx.name, ctx.chunk, ctx.block, ctx.eps = name, chunk, block, eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out):
        q, k, v, out, *entering = ctx.saved_tensors
        phi, grad, chunk, block, eps = FEATURE_MAPS[ctx.name], _FEATURE_GRADS[ctx.name], ctx.chunk, ctx.block, ctx.eps
        heads, q_len = q.shape[1], q.shape[2]
        kv_heads, dim_v = k.shape[1], v.shape[-1]
        before = k.shape[2] - q_len
        acc = entering[0].dtype
        group = heads // kv_heads
        keep = torch.tril(q.new_ones(chunk, chunk, dtype=torch.bool)).repeat(group, 1)  # (group * chunk, chunk)
        d_q, d_k, d_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        g_state = torch.zeros_like(entering[0])  # (batch, kv_heads, head_dim, head_dim + 1): G
        starts = list(range(0, q_len, block))
        for start, state in zip(reversed(starts), reversed(entering), strict=True):
            stop = min(start + block, q_len)
            length = stop - start

            phi_q = phi(q[:, :, start:stop]).to(acc)  # (batch, heads, length, head_dim)
            phi_k = phi(k[:, :, before + start : before + stop]).to(acc)  # (batch, kv_heads, length, head_dim)
            tail_v = v[:, :, before + start : before + stop]
            q_c = _chunk_rows(pad_seq(phi_q, chunk), kv_heads=kv_heads, chunk=chunk)  # (b, kvh, nc, g*chunk, d)
            k_c = pad_seq(phi_k, chunk).unflatten(2, (-1, chunk))  # (batch, kv_heads, nc, chunk, head_dim)
            v_c = pad_seq(_with_ones(tail_v.to(acc)), chunk).unflatten(2, (-1, chunk))  # (b, kvh, nc, chunk, d + 1)
            scores = (q_c @ k_c.transpose(-2, -1)).masked_fill_(~keep, 0)  # (b, kvh, nc, g*chunk, chunk): A_c
            chunk_states = k_c.transpose(-2, -1) @ v_c  # (batch, kv_heads, nc, head_dim, head_dim + 1): C_c
            prefix = _sums_before(chunk_states).add_(state.unsqueeze(2))  # P_c
            raw = q_c @ prefix[..., dim_v:] + scores @ v_c[..., dim_v:]  # (b, kvh, nc, g*chunk, 1)
            rows = (d_out, out)
            d_out_c, out_c = (
                _chunk_rows(pad_seq(x[:, :, start:stop], chunk), kv_heads=kv_heads, chunk=chunk) for x in rows
            )
            d_num = _numerator_grads(d_out_c, out_c, raw, eps=eps)  # (b, kvh, nc, g*chunk, head_dim + 1)
            d_prefix = q_c.transpose(-2, -1) @ d_num  # (batch, kv_heads, nc, head_dim, head_dim + 1)
            later = _sums_before(d_prefix, after=True)  # sum over the block's later chunks
            d_states = later + g_state.unsqueeze(2)  # (batch, kv_heads, nc, head_dim, head_dim + 1): dC_c
            g_state = g_state + d_prefix.sum(dim=2)  # the gradient of the state entering this block
            d_scores = (d_num @ v_c.transpose(-2, -1)).masked_fill_(~keep, 0)  # (b, kvh, nc, g*chunk, chunk)
            d_phi_q = d_num @ prefix.transpose(-2, -1) + d_scores @ k_c  # (b, kvh, nc, g*chunk, head_dim)
            d_phi_k = d_scores.transpose(-2, -1) @ q_c + v_c @ d_states.transpose(-2, -1)  # (b, kvh, nc, c, d)
            d_v_c = scores.transpose(-2, -1) @ d_num + k_c @ d_states  # (batch, kv_heads, nc, chunk, head_dim + 1)
            d_phi_q = _unchunk_rows(d_phi_q, heads=heads, chunk=chunk)[:, :, :length]  # (b, h, length, d)
            grad(phi_q, d_phi_q, out=d_q[:, :, start:stop])  # written in place: no copy of the block
            grad(phi_k, d_phi_k.flatten(2, 3)[:, :, :length], out=d_k[:, :, before + start : before + stop])
            d_v[:, :, before + start : before + stop] = d_v_c.flatten(2, 3)[:, :, :length, :dim_v]
        if before:
            d_k[:, :, :before], d_v[:, :, :before] = _key_state_grads(
                k[:, :, :before], v[:, :, :before], g_state, name=ctx.name, block=block
            )
        return d_q, d_k, d_v, None, None, None, None


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    feature_map_name: str = "elu",
    chunk_size: int = 64,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Linear attention; q (batch, heads, q_len, head_dim), k and v (batch, kv_heads, kv_len, head_dim).

    Causal with kv_len > q_len, the keys before the first query's own position enter as the starting state.
    """
    assert chunk_size >= 1, f"chunk_size must be >= 1, got {chunk_size}"
    assert eps > 0, f"eps must be > 0, got {eps}"
    phi = feature_map(feature_map_name)
    chunk = min(chunk_size, q.shape[2])
    block = _block_positions(q.shape, chunk=chunk, causal=causal, device=q.device)
    if not causal:
        if needs_grad(q, k, v):
            return _NonCausal.apply(q, k, v, feature_map_name, block, eps)  # (batch, heads, q_len, head_dim)
        return _noncausal(q, k, v, phi=phi, block=block, eps=eps)[0]  # (batch, heads, q_len, head_dim)
    if needs_grad(q, k, v):
        return _Causal.apply(q, k, v, feature_map_name, chunk, block, eps)  # (batch, heads, q_len, head_dim)
    return _causal_with_earlier_keys(q, k, v, phi=phi, chunk=chunk, block=block, eps=eps)[0]


def _causal_with_earlier_keys(q, k, v, *, phi: FeatureMap, chunk: int, block: int, eps: float):
    """Causal linear attention with kv_len >= q_len: the keys before the first query's own position (every query
    sees them, the lower-right alignment) summed into the starting state first. Returns ``_causal``'s output and
    states entering each block."""
    before = k.shape[2] - q.shape[2]
    acc = _STATE_DTYPES.get(q.dtype, q.dtype)
    state = _key_state(k[:, :, :before], v[:, :, :before], phi=phi, block=block, acc=acc) if before else None
    tail_k, tail_v = k[:, :, before:], v[:, :, before:]  # (batch, kv_heads, q_len, head_dim), aligned with q
    return _causal(q, tail_k, tail_v, phi=phi, chunk=chunk, block=block, eps=eps, state=state)


@register("linear")
class LinearAttention(AttentionModule):
    """Kernelized linear attention, elu(x) + 1 features by default (approximate, O(n d^2))."""

    Config = LinearConfig
    family = "linear"
    paper = "https://arxiv.org/abs/2006.16236"
    time_complexity = "O(n d^2)"
    memory_complexity = "O(n d)"
    exact = False
    supports_causal = True
    supports_grouped_heads = True  # one state per key/value head, read by its group of query heads
    supports_cross = True  # any number of queries over the keys' state; causal: the earlier keys start it
    supports_decode = True  # the running state (S | z): O(d^2) per step and in memory, whatever the context
    decode_complexity = "O(d^2)"  # a step's time and its cache's bytes
    config: LinearConfig

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
        check_qkv(q, k, v, grouped=True, cross=True)
        return linear_attention(
            q,
            k,
            v,
            causal=causal,
            feature_map_name=self.config.feature_map,
            chunk_size=self.config.chunk_size,
            eps=self.config.eps,
        )

    @classmethod
    def config_error(cls, config):
        eps = config.eps  # a positive number (NaN and infinity are the default check's)
        eps_ok = isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0
        return (
            super().config_error(config)
            or choice_error(config, "feature_map", FEATURE_MAPS)
            or int_error(config, "chunk_size", minimum=1)
            or (None if eps_ok else f"eps must be a number above 0, got {eps!r}")
        )

    @staticmethod
    def _padded_len(config: LinearConfig, seq_len: int) -> int:
        chunk = min(config.chunk_size, seq_len)
        return -(-seq_len // chunk) * chunk

    def prefill(self, k: torch.Tensor, v: torch.Tensor, *, capacity: int) -> DecodeCache:
        acc = _STATE_DTYPES.get(k.dtype, k.dtype)
        phi = feature_map(self.config.feature_map)
        block = _block_positions(k.shape, chunk=1, causal=False, device=k.device)
        state = _key_state(k, v, phi=phi, block=block, acc=acc)  # (batch, kv_heads, head_dim, head_dim + 1)
        return DecodeCache(length=k.shape[2], capacity=capacity, tensors={"state": state})

    def decode_step(self, q, k, v, cache):
        cache.check_room()
        state = cache.tensors["state"]  # (batch, kv_heads, head_dim, head_dim + 1)
        phi = feature_map(self.config.feature_map)
        phi_k = phi(k).to(state.dtype)  # (batch, kv_heads, 1, head_dim)
        state = state + torch.matmul(phi_k.transpose(-2, -1), _with_ones(v).to(state.dtype))  # a new tensor
        rows = phi(group_queries(q, k.shape[1])).to(state.dtype)  # (batch, kv_heads, group, head_dim)
        num = torch.matmul(rows, state)  # (batch, kv_heads, group, head_dim + 1)
        out = _quotient(num, dim_v=v.shape[-1], eps=self.config.eps).to(q.dtype)  # (batch, kv_heads, group, d)
        grown = DecodeCache(length=cache.length + 1, capacity=cache.capacity, tensors={"state": state})
        return ungroup_queries(out, q.shape[1]), grown  # (batch, heads, 1, head_dim)

    @staticmethod
    def _padded_len(config: LinearConfig, seq_len: int) -> int:
        chunk = min(config.chunk_size, seq_len)
        return -(-seq_len // chunk) * chunk

    @staticmethod
    def _key_state_flops(*, length: int, d: int) -> float:
        # phi(K)^T V, n d^2 multiply-adds, and z, n d adds
        return 2.0 * length * d * d + length * d

    @classmethod
    def flops(cls, config, *, batch, heads, seq_len, head_dim, causal, q_len=None, kv_heads=None):
        # matrix products and reductions only (the feature map's elementwise work is not counted); the key
        # states are per key/value head, the query products per query head
        d, q_len, kv_heads = head_dim, q_len or seq_len, kv_heads or heads
        if not causal:
            # the key state over seq_len; phi(Q) (S | z), q_len d (d + 1); the division
            per_query_head = 2.0 * q_len * d * (d + 1) + q_len * d
            return batch * (kv_heads * cls._key_state_flops(length=seq_len, d=d) + heads * per_query_head)
        chunk = min(config.chunk_size, q_len)
        padded = cls._padded_len(config, q_len)
        n_chunks = padded // chunk
        per_query_head = (
            2.0 * padded * chunk * d  # phi(Q_c) phi(K_c)^T, the whole chunk x chunk block
            + 2.0 * padded * chunk * (d + 1)  # masked scores times (V | 1)
            + 2.0 * padded * d * (d + 1)  # phi(Q_c) times the prefix state
            + 1.0 * padded * d  # the division by the normalizer
        )
        per_kv_head = (
            cls._key_state_flops(length=seq_len - q_len, d=d)  # the keys before the first query's own
            + 2.0 * padded * d * (d + 1)  # chunk states phi(K_c)^T (V_c | 1)
            + 1.0 * n_chunks * d * (d + 1)  # prefix sums of the chunk states
        )
        return batch * (heads * per_query_head + kv_heads * per_kv_head)

    @classmethod
    def memory_bytes(
        cls, config, *, batch, heads, seq_len, head_dim, itemsize, causal, device="cpu", dtype=None, q_len=None
    ):
        d, q_len = head_dim, q_len or seq_len
        chunk = min(config.chunk_size, q_len)
        block = min(  # the device's step, as forward cuts it
            _block_positions((batch, heads, q_len, d), chunk=chunk, causal=causal, device=device),
            cls._padded_len(config, max(q_len, seq_len)),
        )
        acc = max(itemsize, 4)  # the sums' bytes per element: float32 for half inputs
        cast = acc if itemsize < 4 else 0  # half inputs: the float32 copies of a state product's operands
        if not causal:
            # a block's phi(K) or phi(Q) (and its copy in acc), product and quotient
            per_block = block * (d + 1) * (itemsize + 2 * acc + cast)
        else:
            n_chunks = block // chunk
            per_block = (
                (3.0 * block * (d + 1) + block * chunk) * itemsize  # the block's phi(Q), phi(K), (V | 1); scores
                + 3.0 * n_chunks * d * (d + 1) * acc  # chunk states, shifted copy, prefix sums
                + block * (d + 1) * (2 * acc + itemsize)  # the two products and their sum
                + 3.0 * block * (d + 1) * cast  # phi(Q), phi(K), (V | 1) in acc
            )
        # the output; temporaries; the carried state (grouped heads need less: this bounds them)
        return batch * heads * (q_len * d * itemsize + per_block + 2.0 * d * (d + 1) * acc)

    @classmethod
    def decode_flops(cls, config, *, batch, heads, kv_heads, seq_len, head_dim):
        d = head_dim
        # the new key's phi(k)^T (v | 1) added to the state; phi(q) (S | z) and the division per query head
        return batch * (kv_heads * 3.0 * d * (d + 1) + heads * (2.0 * d * (d + 1) + d))

    @classmethod
    def cache_bytes(cls, config, *, batch, heads, kv_heads, seq_len, head_dim, itemsize):
        return float(batch * kv_heads * head_dim * (head_dim + 1) * max(itemsize, 4))  # (S | z), whatever seq_len
