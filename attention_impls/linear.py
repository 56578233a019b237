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
state S, z (causal: the sums before every chunk, n / chunk x d x d numbers per key/value head, and each
query's normalizer), not every block's intermediates.

For float16 and bfloat16 inputs the sums over positions (S and z, the chunk
states and their prefix sums, and each query's product with them) are kept in
float32: a float16 sum overflows near 56K positions of order-one terms, and a
bfloat16 one stops growing once each term is below its 8-bit precision. The
feature map and the quadratic form within a chunk stay in the input dtype, and
the result is written back in it.

S and z are kept apart (``_State``): the denominators phi(q_i)^T z are a dot
product per row, as the numerators are products with d x d matrices (an extra
column for z, d + 1 wide, made every product with the state 20% slower on the
CPU, and a product with one column is three to four times slower than the dot
products). The denominator is floored at ``eps`` (clamp, not add: outputs are exact where it is not tiny), so
a query whose features all vanish (relu, or elu + 1 of very negative inputs)
yields zeros, not NaN.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

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

__all__ = [
    "FEATURE_MAPS",
    "LinearAttention",
    "LinearConfig",
    "block_positions",
    "feature_map",
    "linear_attention",
    "linear_attention_on_features",
    "state_output",
]

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


# features the caller computed (performer's random features): the identity map, whose derivative hands the
# gradient on; internal, not a choice of ``LinearConfig.feature_map``
_GIVEN = "given"


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _phi(name: str) -> FeatureMap:
    """The feature map called ``name``, the given features' identity included (no check: names are checked
    where a user gives them)."""
    return _identity if name == _GIVEN else FEATURE_MAPS[name]


_FEATURE_GRADS[_GIVEN] = lambda y, g, out=None: g if out is None else out.copy_(g)


class _State(NamedTuple):
    """The sums over the positions so far: kv = sum_j phi(k_j) v_j^T (batch, kv_heads, head_dim, head_dim) and
    z = sum_j phi(k_j) (batch, kv_heads, head_dim), in the sums' dtype."""

    kv: torch.Tensor
    z: torch.Tensor


def _normalizer(phi_q: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """phi(q_i)^T z for rows phi_q (..., rows, d) and z (..., d): (..., rows), the denominator before its floor.

    A dot product per row: a matrix product with one column takes three to four times as long on the CPU."""
    return torch.linalg.vecdot(phi_q, z.unsqueeze(-2))


def _row_sums(phi: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i weights_i phi_i for phi (..., rows, d) and weights (..., rows): (..., d)."""
    return torch.linalg.vecdot(phi, weights.unsqueeze(-1), dim=-2)


def _output_grads(
    d_out: torch.Tensor, out: torch.Tensor, raw: torch.Tensor, *, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of the numerator and of the raw normalizer from that of out = numerator / max(raw, eps):
    dN = dOut / den and d_raw = -(dN . out), zero where eps holds den. d_out, out (..., rows, d) and raw
    (..., rows) -> (..., rows, d) and (..., rows), in raw's dtype."""
    d_num = d_out.to(raw.dtype) / raw.clamp_min(eps).unsqueeze(-1)  # (..., rows, head_dim)
    d_raw = torch.linalg.vecdot(d_num, out.to(raw.dtype)).neg_()  # (..., rows)
    return d_num, d_raw.masked_fill_(raw < eps, 0.0)


def _key_state_grads(
    k: torch.Tensor, v: torch.Tensor, d_state: _State, *, name: str, block: int, d_k: torch.Tensor, d_v: torch.Tensor
) -> None:
    """The gradients of k and v (batch, kv_heads, n, d), written into d_k and d_v, from those of
    S = sum_j phi(k_j) v_j^T and z = sum_j phi(k_j): dphi(K) = V dS^T + dz, dV = phi(K) dS, a block of positions
    at a time."""
    phi, grad = _phi(name), _FEATURE_GRADS[name]
    d_kv, d_z = d_state.kv, d_state.z.unsqueeze(-2)  # (batch, kv_heads, d, d), (batch, kv_heads, 1, d)
    for start in range(0, k.shape[2], block):
        stop = min(start + block, k.shape[2])
        phi_k = phi(k[:, :, start:stop]).to(d_kv.dtype)  # (batch, kv_heads, length, head_dim)
        d_phi_k = (v[:, :, start:stop].to(d_kv.dtype) @ d_kv.transpose(-2, -1)).add_(d_z)
        grad(phi_k, d_phi_k, out=d_k[:, :, start:stop])  # written in place: no copy of the block
        d_v[:, :, start:stop] = phi_k @ d_kv


class _NonCausal(torch.autograd.Function):
    """Non-causal linear attention under autograd: the forward is the blocked one of ``_noncausal`` (each block's
    feature maps computed in cache), and the backward, written out, walks the same blocks, recomputing the
    feature maps instead of keeping them (it keeps only the inputs, the output and the state):

        num = phi(Q) S,  raw = phi(Q) z,  out = num / den,  den = max(raw, eps)
        S = phi(K)^T V,  z = phi(K)^T 1

        dN = dOut / den,  d_raw = -(dN . out)   (zero where eps holds den)
        dS = sum over query blocks of phi(Q)^T dN,  dz = sum of phi(Q)^T d_raw
        dphi(Q) = dN S^T + d_raw z^T
        dphi(K) = V dS^T + dz,  dV = phi(K) dS

    and each feature map's derivative from its output. q (batch, heads, q_len, d), k, v (batch, kv_heads, n, d).
    """

    @staticmethod
    def forward(ctx, q, k, v, name: str, block: int, eps: float):
        out, state = _noncausal(q, k, v, phi=_phi(name), block=block, eps=eps)
        ctx.save_for_backward(q, k, v, out, *state)
        ctx.name, ctx.block, ctx.eps = name, block, eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out):
        q, k, v, out, kv, z = ctx.saved_tensors
        phi, grad, block, eps = _phi(ctx.name), _FEATURE_GRADS[ctx.name], ctx.block, ctx.eps
        heads, kv_heads = q.shape[1], k.shape[1]
        rows, out_rows = group_queries(q, kv_heads), group_queries(out, kv_heads)  # (batch, kv_heads, rows, d)
        d_rows = group_queries(d_out, kv_heads)  # (batch, kv_heads, rows, head_dim)
        d_state = _State(torch.zeros_like(kv), torch.zeros_like(z))  # dS, dz: summed over the blocks
        kv_t, z_row = kv.transpose(-2, -1), z.unsqueeze(-2)  # (batch, kv_heads, d, d), (batch, kv_heads, 1, d)

        d_q, d_k, d_v = torch.empty_like(rows), torch.empty_like(k), torch.empty_like(v)
        for start in range(0, rows.shape[2], block):
            stop = min(start + block, rows.shape[2])
            phi_q = phi(rows[:, :, start:stop]).to(kv.dtype)  # (batch, kv_heads, length, head_dim)
            raw = _normalizer(phi_q, z)  # (batch, kv_heads, length)
            d_num, d_raw = _output_grads(d_rows[:, :, start:stop], out_rows[:, :, start:stop], raw, eps=eps)
            d_state.kv.add_(phi_q.transpose(-2, -1) @ d_num)
            d_state.z.add_(_row_sums(phi_q, d_raw))
            d_phi_q = (d_num @ kv_t).addcmul_(d_raw.unsqueeze(-1), z_row)  # (batch, kv_heads, length, d)
            grad(phi_q, d_phi_q, out=d_q[:, :, start:stop])
        _key_state_grads(k, v, d_state, name=ctx.name, block=block, d_k=d_k, d_v=d_v)  # the state's, over n
        return ungroup_queries(d_q, heads), d_k, d_v, None, None, None


def feature_map(name: str) -> FeatureMap:
    """The feature map called ``name``; a clear error on unknown names."""
    if name not in FEATURE_MAPS:
        raise ValueError(f"unknown feature_map {name!r}; choose one of {', '.join(FEATURE_MAPS)}")
    return FEATURE_MAPS[name]


def block_positions(
    shape: torch.Size | tuple[int, ...], *, chunk: int, causal: bool, device: str | torch.device
) -> int:
    """Positions per vectorized step for (batch, heads, seq_len, head_dim) inputs on ``device``: whole chunks."""
    batch, heads, _, dim = shape
    if causal:
        elements = blocks.device_value(_CAUSAL_BLOCK_ELEMENTS, _ACCELERATOR_CAUSAL_BLOCK_ELEMENTS, device)
    else:
        elements = blocks.device_value(_BLOCK_ELEMENTS, _ACCELERATOR_BLOCK_ELEMENTS, device)
    return chunk * max(1, elements // (batch * heads * dim * chunk))


def _divide(num: torch.Tensor, raw: torch.Tensor, *, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """num / max(raw, eps): num (..., rows, d) over raw (..., rows), into ``out`` when given (cast to its dtype)."""
    return torch.div(num, raw.clamp_min(eps).unsqueeze(-1), out=out)


def state_output(rows: torch.Tensor, kv: torch.Tensor, z: torch.Tensor, *, eps: float) -> torch.Tensor:
    """phi(q) S over max(phi(q) z, eps) for feature rows (..., rows, m) against the sums S (..., m, d) and z
    (..., m): (..., rows, d), in the sums' dtype (a decoding step's output)."""
    return _divide(rows @ kv, _normalizer(rows, z), eps=eps)


def _positions(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """x[:, :, start:stop], or x itself when that is all of it (under autograd a slice's backward fills a
    gradient the size of the whole input)."""
    return x if start == 0 and stop >= x.shape[2] else x[:, :, start:stop]


def _zero_state(k: torch.Tensor, v: torch.Tensor, acc: torch.dtype) -> _State:
    """S and z over no positions, for keys k and values v (batch, kv_heads, length, d)."""
    batch, kv_heads, _, dim = k.shape
    kv = k.new_zeros(batch, kv_heads, dim, v.shape[-1], dtype=acc)  # (batch, kv_heads, head_dim, head_dim)
    return _State(kv, k.new_zeros(batch, kv_heads, dim, dtype=acc))  # z: (batch, kv_heads, head_dim)


def _key_state(k: torch.Tensor, v: torch.Tensor, *, phi: FeatureMap, block: int, acc: torch.dtype) -> _State:
    """S = sum_j phi(k_j) v_j^T and z = sum_j phi(k_j) over every position of k, v (batch, kv_heads, length, d),
    in ``acc``, a block of positions at a time."""
    state = _zero_state(k, v, acc)
    for start in range(0, k.shape[2], block):
        phi_k = phi(_positions(k, start, start + block)).to(acc)  # (batch, kv_heads, length, head_dim)
        v_blk = _positions(v, start, start + block).to(acc)  # (batch, kv_heads, length, head_dim)
        state.kv.add_(phi_k.transpose(-2, -1) @ v_blk)  # (batch, kv_heads, head_dim, head_dim)
        state.z.add_(phi_k.sum(dim=2))  # (batch, kv_heads, head_dim)
    return state


def _noncausal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, phi: FeatureMap, block: int, eps: float
) -> tuple[torch.Tensor, _State]:
    """phi(Q) (phi(K)^T V) normalized by phi(Q) sum_j phi(k_j), a block of positions at a time; and S, z.

    Each key/value head's state serves its group of query heads, their rows side by side (``group_queries``).
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    acc = _STATE_DTYPES.get(q.dtype, q.dtype)  # the sums' dtype: float32 for half inputs
    state = _key_state(k, v, phi=phi, block=block, acc=acc)
    rows = group_queries(q, kv_heads)  # (batch, kv_heads, group * q_len, head_dim)
    out = v.new_empty(*rows.shape[:3], v.shape[-1])  # (batch, kv_heads, group * q_len, head_dim), the input dtype
    for start in range(0, rows.shape[2], block):
        phi_q = phi(rows[:, :, start : start + block]).to(acc)  # (batch, kv_heads, length, head_dim)
        stop = start + phi_q.shape[2]
        _divide(phi_q @ state.kv, _normalizer(phi_q, state.z), eps=eps, out=out[:, :, start:stop])
    return ungroup_queries(out, heads), state  # (batch, heads, q_len, head_dim)


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
    feature_map(feature_map_name)  # a clear error on unknown names
    return _linear(q, k, v, name=feature_map_name, causal=causal, chunk_size=chunk_size, eps=eps)


def linear_attention_on_features(
    phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, *, causal: bool, chunk_size: int = 64, eps: float
) -> torch.Tensor:
    """Linear attention on features the caller computed: phi_q (batch, heads, q_len, m), phi_k (batch, kv_heads,
    kv_len, m) with m features (any number) and v (batch, kv_heads, kv_len, head_dim), all of one dtype.
    Gradients flow to phi_q, phi_k and v."""
    return _linear(phi_q, phi_k, v, name=_GIVEN, causal=causal, chunk_size=chunk_size, eps=eps)


def _linear(q, k, v, *, name: str, causal: bool, chunk_size: int, eps: float) -> torch.Tensor:
    assert chunk_size >= 1, f"chunk_size must be >= 1, got {chunk_size}"
    assert eps > 0, f"eps must be > 0, got {eps}"
    phi = _phi(name)
    chunk = min(chunk_size, q.shape[2])
    block = block_positions(q.shape, chunk=chunk, causal=causal, device=q.device)
    if not causal:
        if needs_grad(q, k, v):
            return _NonCausal.apply(q, k, v, name, block, eps)  # (batch, heads, q_len, head_dim)
        return _noncausal(q, k, v, phi=phi, block=block, eps=eps)[0]  # (batch, heads, q_len, head_dim)
    if needs_grad(q, k, v):
        return _Causal.apply(q, k, v, name, chunk, block, eps)  # (batch, heads, q_len, head_dim)
    return _causal_with_earlier_keys(q, k, v, phi=phi, chunk=chunk, block=block, eps=eps)[0]


def _causal_with_earlier_keys(q, k, v, *, phi: FeatureMap, chunk: int, block: int, eps: float, keep: bool = False):
    """Causal linear attention with kv_len >= q_len: the keys before the first query's own position (every query
    sees them, the lower-right alignment) summed into the starting state first. Returns ``_causal``'s output and
    its blocks' sums."""
    before = k.shape[2] - q.shape[2]
    acc = _STATE_DTYPES.get(q.dtype, q.dtype)
    state = _key_state(k[:, :, :before], v[:, :, :before], phi=phi, block=block, acc=acc) if before else None
    tail_k, tail_v = k[:, :, before:], v[:, :, before:]  # (batch, kv_heads, q_len, head_dim), aligned with q
    return _causal(q, tail_k, tail_v, phi=phi, chunk=chunk, block=block, eps=eps, state=state, keep=keep)


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
    supports_decode = True  # the running sums S and z: O(d^2) per step and in memory, whatever the context
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
        block = block_positions(k.shape, chunk=1, causal=False, device=k.device)
        state = _key_state(k, v, phi=phi, block=block, acc=acc)  # (b, kvh, d, d) and (b, kvh, d)
        return DecodeCache(length=k.shape[2], capacity=capacity, tensors=state._asdict())

    def decode_step(self, q, k, v, cache):
        cache.check_room()
        kv, z = _State(**cache.tensors)  # (batch, kv_heads, d, d), (batch, kv_heads, d)
        phi = feature_map(self.config.feature_map)
        phi_k = phi(k).to(kv.dtype)  # (batch, kv_heads, 1, head_dim)
        state = _State(kv + phi_k.transpose(-2, -1) @ v.to(kv.dtype), z + phi_k[:, :, 0])  # new tensors
        rows = phi(group_queries(q, k.shape[1])).to(kv.dtype)  # (batch, kv_heads, group, head_dim)
        out = state_output(rows, state.kv, state.z, eps=self.config.eps).to(q.dtype)
        grown = DecodeCache(length=cache.length + 1, capacity=cache.capacity, tensors=state._asdict())
        return ungroup_queries(out, q.shape[1]), grown  # (batch, heads, 1, head_dim)

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
            # the key state over seq_len; phi(Q) S and phi(Q) z, q_len d (d + 1); the division
            per_query_head = 2.0 * q_len * d * (d + 1) + q_len * d
            return batch * (kv_heads * cls._key_state_flops(length=seq_len, d=d) + heads * per_query_head)
        chunk = min(config.chunk_size, q_len)
        padded = cls._padded_len(config, q_len)
        n_chunks = padded // chunk
        per_query_head = (
            2.0 * padded * chunk * d  # phi(Q_c) phi(K_c)^T, the whole chunk x chunk block
            + 2.0 * padded * chunk * d
            + padded * chunk  # masked scores times V_c, and their row sums
            + 2.0 * padded * d * (d + 1)  # phi(Q_c) times the prefix sums S and z
            + 1.0 * padded * d  # the division by the normalizer
        )
        per_kv_head = (
            cls._key_state_flops(length=seq_len - q_len, d=d)  # the keys before the first query's own
            + 2.0 * padded * d * d
            + padded * d  # chunk sums phi(K_c)^T V_c and phi(K_c)^T 1
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
            block_positions((batch, heads, q_len, d), chunk=chunk, causal=causal, device=device),
            cls._padded_len(config, max(q_len, seq_len)),
        )
        acc = max(itemsize, 4)  # the sums' bytes per element: float32 for half inputs
        cast = acc if itemsize < 4 else 0  # half inputs: the float32 copies of a state product's operands
        if not causal:
            # a block's phi(K) or phi(Q) (and its copy in acc), product and its rows' dot products
            per_block = block * d * (itemsize + 2 * acc + cast) + block * 2 * acc
        else:
            n_chunks = block // chunk
            per_block = (
                (3.0 * block * d + block * chunk) * itemsize  # the block's phi(Q), phi(K), V; scores
                + 3.0 * n_chunks * d * (d + 1) * acc  # chunk sums, their products with the triangle, prefix sums
                + block * d * (acc + itemsize)
                + 2.0 * block * acc  # the two products; the normalizers
                + 3.0 * block * d * cast  # phi(Q), phi(K), V in acc
            )
        # the output; temporaries; the carried state (grouped heads need less: this bounds them)
        return batch * heads * (q_len * d * itemsize + per_block + 2.0 * d * (d + 1) * acc)

    @classmethod
    def decode_flops(cls, config, *, batch, heads, kv_heads, seq_len, head_dim):
        d = head_dim
        # the new key's phi(k)^T v and phi(k) added to S and z; phi(q) S, phi(q) z and the division per query head
        return batch * (kv_heads * 3.0 * d * (d + 1) + heads * (2.0 * d * (d + 1) + d))

    @classmethod
    def cache_bytes(cls, config, *, batch, heads, kv_heads, seq_len, head_dim, itemsize):
        return float(batch * kv_heads * head_dim * (head_dim + 1) * max(itemsize, 4))  # S and z, whatever seq_len
