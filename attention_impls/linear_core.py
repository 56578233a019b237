"""What linear attention is made of, shared by its non-causal form (``linear``) and its causal form
(``linear_causal``): the feature maps and their derivatives, the sums S and z (``_State``), the normalizer and
the division by it, and the key state summed a block of positions at a time. ``linear``'s docstring describes
the algorithm; this module registers nothing. Its names keep their underscore: they are the two forms'
internals (``feature_map``, ``state_output`` and ``FEATURE_MAPS`` are ``linear``'s public ones).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from attention_impls.base import needs_grad

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


def _softmax_grad(y: torch.Tensor, grad: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(g - (g . y)) y from the softmax's output y: aten's fused backward, one pass instead of three (70 against
    170 us on a 2^19-element block); copied into ``out`` when given (its out= variant writes a strided ``out``
    wrongly)."""
    d_x = torch._softmax_backward_data(grad, y, -1, y.dtype)
    return d_x if out is None else out.copy_(d_x)


FeatureMap = Callable[[torch.Tensor], torch.Tensor]

FEATURE_MAPS: dict[str, FeatureMap] = {
    "elu": _elu_plus_one,  # elu(x) + 1, the paper's choice: positive, ~linear for x > 0
    "relu": _relu,  # max(x, 0): zero features possible, the eps floor keeps the output finite
    "softmax": _softmax,  # softmax over head_dim (as in Shen et al. 2018 for queries): positive, bounded
}


# each feature map's derivative from its output y and the gradient g of y: the gradient of its input
_FEATURE_GRADS: dict[str, Callable[..., torch.Tensor]] = {  # (y, g, out=None): into out when given
    "elu": _elu_plus_one_grad,
    "relu": lambda y, g, out=None: torch.mul(g, y > 0, out=out),
    "softmax": _softmax_grad,
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


def feature_map(name: str) -> FeatureMap:
    """The feature map called ``name``; a clear error on unknown names."""
    if name not in FEATURE_MAPS:
        raise ValueError(f"unknown feature_map {name!r}; choose one of {', '.join(FEATURE_MAPS)}")
    return FEATURE_MAPS[name]


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
