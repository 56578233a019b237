"""Nyströmformer: softmax attention through the Nyström method, with landmarks.

Paper: Xiong et al. 2021, "Nyströmformer: A Nyström-Based Algorithm for Approximating Self-Attention",
https://arxiv.org/abs/2102.03902

The n x n attention matrix softmax(Q K^T / sqrt(d)) is approximated from l landmark queries Q~ and keys K~
(the means of l contiguous segments of the queries and of the keys):

    out = F Z (B V),   F = softmax(Q K~^T / sqrt(d)) (n x l),   A = softmax(Q~ K~^T / sqrt(d)) (l x l),
                       B = softmax(Q~ K^T / sqrt(d)) (l x n),  Z ~ A^+ (the Moore-Penrose pseudo-inverse)

with Z from ``pinv_iterations`` steps of the paper's iteration (Razavi et al. 2014), started from
A^T / (max row sum of |A| x max column sum of |A|):

    Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4

O(n l d + l^3) time and O(n l) memory (F and B), l = min(landmarks, q_len, seq_len); with l = n the landmarks are the positions themselves and
the result is exact attention (Z then inverts A). Segment s holds the positions p with floor(p l / n) = s,
lengths differing by at most one, so no padding is needed (the reference code pads the sequence to a multiple
of l with zero rows, which then enter the means). The iteration's start is normalized per matrix (the
reference code divides by the largest sums over the whole batch). The paper's depthwise convolution of V,
added to the output, is a learned part of its layer, not of the approximation: left out, as in
``nystrom-attention`` with ``residual=False``.

Landmarks mix the whole sequence, so no causal mask. Grouped heads are supported (each query head has its own
landmarks, over its key/value head); cross lengths are not, since a query's output depends on all the other
queries through the landmark queries.
Half-precision inputs: A, its pseudo-inverse and Z (B V) are computed in float32 (the iteration multiplies
l x l matrices six times over; a float16 one drifts).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from attention_impls.base import AttentionModule, check_qkv, group_queries, int_error, ungroup_queries
from attention_impls.registry import register

__all__ = ["NystromAttention", "NystromConfig", "iterative_pinv", "nystrom_attention", "segment_means"]

_PINV_DTYPES = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


@dataclasses.dataclass(frozen=True)
class NystromConfig:
    """Hyperparameters of Nyströmformer attention."""

    landmarks: int = 64  # l, segment means of queries and keys (min(l, length) is used); the paper's 64
    pinv_iterations: int = 6  # steps of the iterative pseudo-inverse, the paper's 6


def segment_means(x: torch.Tensor, landmarks: int) -> torch.Tensor:
    """(..., n, d) -> (..., landmarks, d): the mean of each of ``landmarks`` contiguous segments, position p in
    segment floor(p landmarks / n)."""
    n = x.shape[-2]
    if n % landmarks == 0:  # equal segments: a view and a mean
        return x.unflatten(-2, (landmarks, n // landmarks)).mean(dim=-2)
    segment = torch.arange(n, device=x.device) * landmarks // n  # (n,) the segment of each position
    counts = torch.bincount(segment, minlength=landmarks).to(x.dtype).unsqueeze(-1)  # (landmarks, 1)
    sums = x.new_zeros(*x.shape[:-2], landmarks, x.shape[-1]).index_add(-2, segment, x)  # (..., landmarks, d)
    return sums / counts


def _minus_from_identity(x: torch.Tensor, c: float) -> torch.Tensor:
    """c I - x for square matrices x (..., l, l): a new tensor."""
    out = x.neg()
    out.diagonal(dim1=-2, dim2=-1).add_(c)
    return out


def iterative_pinv(a: torch.Tensor, iterations: int) -> torch.Tensor:
    """An approximation of the pseudo-inverse of each square matrix a (..., l, l), by ``iterations`` steps of
    Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4 from Z = A^T / (max_i sum_j |a_ij| max_j sum_i |a_ij|)."""
    magnitudes = a.abs()
    row_max = magnitudes.sum(dim=-1).amax(dim=-1)  # (...,)
    col_max = magnitudes.sum(dim=-2).amax(dim=-1)  # (...,)
    z = a.transpose(-2, -1) / (row_max * col_max)[..., None, None]  # (..., l, l)
    for _ in range(iterations):
        az = a @ z  # (..., l, l)
        inner = az @ _minus_from_identity(az, 7.0)
        inner = az @ _minus_from_identity(inner, 15.0)
        z = (z @ _minus_from_identity(inner, 13.0)).mul_(0.25)
    return z


def nystrom_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, landmarks: int, pinv_iterations: int
) -> torch.Tensor:
    """F Z (B V) for q (batch, heads, q_len, d), k and v (batch, kv_heads, seq_len, d): (batch, heads, q_len, d).

    The queries of a key/value head's group are its rows side by side (``group_queries``); each query head has
    its own landmarks, so A, Z and B are per query head: (batch, kv_heads, group, l, ...)."""
    batch, heads, q_len, dim = q.shape
    kv_heads, seq_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    marks = min(landmarks, q_len, seq_len)  # landmark queries per query head, landmark keys per key/value head
    scale = 1.0 / math.sqrt(dim)
    acc = _PINV_DTYPES.get(q.dtype, q.dtype)

    q_tilde = segment_means(q, marks).mul_(scale)  # (batch, heads, marks, d), scaled
    k_tilde = segment_means(k, marks)  # (batch, kv_heads, marks, d)
    q_tilde = group_queries(q_tilde, kv_heads)  # (batch, kv_heads, group * marks, d)
    rows = group_queries(q, kv_heads)  # (batch, kv_heads, group * q_len, d)

    f = torch.softmax(torch.matmul(rows, k_tilde.transpose(-2, -1) * scale), dim=-1)  # (b, kvh, g * q_len, marks)
    a = torch.softmax(torch.matmul(q_tilde, k_tilde.transpose(-2, -1)).to(acc), dim=-1)  # (b, kvh, g*marks, marks)
    b = torch.softmax(torch.matmul(q_tilde, k.transpose(-2, -1)), dim=-1)  # (b, kvh, g * marks, seq_len)
    bv = torch.matmul(b, v).to(acc).view(batch, kv_heads, group, marks, dim)  # (b, kvh, g, marks, d)
    z = iterative_pinv(a.view(batch, kv_heads, group, marks, marks), pinv_iterations)  # (b, kvh, g, l, l)
    weights = torch.matmul(z, bv).to(q.dtype)  # Z (B V): (batch, kv_heads, group, l, d)
    f = f.view(batch, kv_heads, group, q_len, marks)
    out = torch.matmul(f, weights)  # (batch, kv_heads, group, q_len, d)
    return ungroup_queries(out.reshape(batch, kv_heads, group * q_len, dim), heads)  # (batch, heads, q_len, d)


@register("nystrom")
class NystromAttention(AttentionModule):
    """Nyströmformer: softmax attention from landmark queries and keys (approximate, O(n l d), no causal mask)."""

    Config = NystromConfig
    family = "nystrom"
    paper = "https://arxiv.org/abs/2102.03902"
    time_complexity = "O(n l d)"
    memory_complexity = "O(n l)"
    exact = False
    supports_causal = False
    supports_grouped_heads = True  # landmark keys once per key/value head; landmark queries per query head
    # no cross lengths: a query's output depends on every other query (through the landmark queries), so
    # fewer queries are not the last rows of the self-attention, as the contract has them
    supports_cross = False
    config: NystromConfig

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
        self.reject_causal(causal)
        check_qkv(q, k, v, grouped=True)
        return nystrom_attention(q, k, v, landmarks=self.config.landmarks, pinv_iterations=self.config.pinv_iterations)

    @classmethod
    def config_error(cls, config):
        return (
            super().config_error(config)
            or int_error(config, "landmarks", minimum=1)
            or int_error(config, "pinv_iterations", minimum=0)
        )

    @classmethod
    def flops(cls, config, *, batch, heads, seq_len, head_dim, causal, q_len=None, kv_heads=None):
        d, q_len, kv_heads = head_dim, q_len or seq_len, kv_heads or heads
        lq = lk = min(config.landmarks, q_len, seq_len)
        per_query_head = (
            2.0 * q_len * lk * d  # Q K~^T
            + 2.0 * lq * lk * d  # Q~ K~^T
            + 2.0 * lq * seq_len * d * 2  # Q~ K^T and B V
            + config.pinv_iterations * 4 * 2.0 * lq**3  # four l x l products a step
            + 2.0 * lk * lq * d  # Z (B V)
            + 2.0 * q_len * lk * d  # F times it
            + 3.0 * (q_len * lk + lq * lk + lq * seq_len)  # the three softmaxes
            + q_len * d  # the landmark queries' means
        )
        return batch * (heads * per_query_head + kv_heads * seq_len * d)  # and the landmark keys' means

    @classmethod
    def memory_bytes(cls, config, *, batch, heads, seq_len, head_dim, itemsize, causal, q_len=None, kv_heads=None):
        d, q_len = head_dim, q_len or seq_len
        lq = lk = min(config.landmarks, q_len, seq_len)
        # F's scores and probabilities, B's, and the output; the landmarks, A, Z and their products (l x l)
        elements = 2.0 * q_len * lk + 2.0 * lq * seq_len + q_len * d + 8.0 * lq * lk + 4.0 * lk * d
        return batch * heads * elements * max(itemsize, 2)
