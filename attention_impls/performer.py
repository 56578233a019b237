"""Performer: softmax attention through positive orthogonal random features (FAVOR+).

Paper: Choromanski et al. 2021, "Rethinking Attention with Performers", https://arxiv.org/abs/2009.14794

The softmax kernel exp(q . k / sqrt(d)) is the expectation, over w ~ N(0, I_d), of phi(q') . phi(k') with

    phi(x)_i = exp(w_i . x - |x|^2 / 2) / sqrt(m),   x' = x / d^(1/4),   i = 1..m features

(positive, so the estimate of every attention weight is positive and the normalizer never cancels). The m
rows w_i are drawn in blocks of d orthogonal directions (QR of a Gaussian matrix), each row scaled to the norm
of a Gaussian vector: orthogonal random features, whose estimate has lower variance than i.i.d. ones. The
attention is then linear attention on the features (``attention_impls.linear``):

    out_i = phi(q_i)^T S / (phi(q_i)^T z),   S = sum_j phi(k_j) v_j^T (m x d),   z = sum_j phi(k_j)

O(n m d) time and O(n m) memory (the features; the paper's O(n m + n d + m d)); causal, the sums run over the
keys up to each query, by chunks (prefix sums of the chunk sums and an exact quadratic form within a chunk);
decoding keeps S and z: O(m d) per token whatever the context.

Numerics. The exponent is shifted by a constant before the exponential, as in the paper's code, so that the
largest feature is 1: for a query, by the largest of its own m exponents; for keys, by the largest over all
keys of its (batch, key/value head), |x'|^2 / 2 included (the reference code leaves it out of the keys' shift,
so keys of large norm underflow to zero features in float32). Each
shift multiplies a query's numerator and denominator alike, or every key's features alike, so the output does
not depend on it (exactly: no epsilon is added to the features, unlike the reference code's 1e-4, so the
shifts are taken out of the gradient, too); the 1 / sqrt(m) factor cancels the same way and is left out.
Causal, the keys' one shift is set by the largest key of the whole sequence (the output still does not depend
on it): where the keys' logits spread over more than the dtype's exponent range (about 87 in float32), the
features of the early keys underflow and the early queries lose precision (inputs of norm 7 sqrt(d): 11% in
float32, against 6e-7 without the mask). Decoding keeps the keys' shift with the sums and, when a new key's exponent exceeds it, rescales S and z to
the new one (as an online softmax does). The denominator is floored at the smallest positive number of its
dtype, so a query whose features all underflow gets zeros, not NaN. Half-precision inputs get float32
features and sums; the output is written back in the input's dtype.

The features are drawn once, when the module is built, from torch's RNG (the benchmark seeds it), and never
redrawn: the paper's periodic redraw is a training matter, off here.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from attention_impls.base import AttentionModule, check_qkv, group_queries, int_error, needs_grad, ungroup_queries
from attention_impls.decoding import DecodeCache
from attention_impls.linear import block_positions, linear_attention_on_features, state_output
from attention_impls.registry import register

__all__ = ["PerformerAttention", "PerformerConfig", "orthogonal_features", "random_features"]

# the dtype of the features and sums, per input dtype (others keep their own)
_FEATURE_DTYPES = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


@dataclasses.dataclass(frozen=True)
class PerformerConfig:
    """Hyperparameters of Performer attention."""

    features: int = 256  # m, random features (the reference code's default is d ln d: 266 for d = 64)
    chunk_size: int = 64  # causal path: positions per chunk of the exact quadratic form within a chunk


def orthogonal_features(features: int, dim: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """(features, dim) random rows: blocks of ``dim`` orthonormal rows (the Q of a Gaussian matrix's QR, its
    columns' signs those of R's diagonal, which makes it uniform over orthogonal matrices: without that, LAPACK's
    Q has a direction favoured and the estimate is biased), the last block cut short, each row then scaled to
    the norm of an independent N(0, I_dim) vector, so that every row is distributed as a Gaussian one while the
    rows of a block stay orthogonal. In float64."""
    blocks = []
    for _ in range(-(-features // dim)):
        gaussian = torch.randn(dim, dim, dtype=torch.float64, generator=generator)
        orthonormal, triangular = torch.linalg.qr(gaussian)  # (dim, dim), orthonormal columns
        blocks.append((orthonormal * triangular.diagonal().sign()).T)  # rows
    rows = torch.cat(blocks)[:features]  # (features, dim), unit rows
    norms = torch.randn(features, dim, dtype=torch.float64, generator=generator).norm(dim=1, keepdim=True)
    return rows * norms  # (features, dim)


def _logits(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """w_i . x' - |x'|^2 / 2 for x (..., n, d) and projection (m, d), x' = x / d^(1/4): (..., n, m)."""
    scale = x.shape[-1] ** -0.25
    exponents = torch.matmul(x, projection.T * scale)  # (..., n, m): w_i . x'
    half_norms = x.square().sum(dim=-1, keepdim=True) * (scale * scale / 2)  # (..., n, 1): |x'|^2 / 2
    return exponents - half_norms if needs_grad(exponents) else exponents.sub_(half_norms)


def random_features(x: torch.Tensor, projection: torch.Tensor, *, per_row: bool) -> torch.Tensor:
    """exp(w_i . x' - |x'|^2 / 2 - shift) for x (batch, heads, n, d) and projection (m, d): (batch, heads, n, m).

    The shift, taken out of the gradient, makes the largest feature 1: each row's own with ``per_row``
    (queries), else the largest over all of a (batch, head)'s rows (keys)."""
    if not per_row or needs_grad(x, projection):
        logits = _logits(x, projection)  # (batch, heads, n, m)
        with torch.no_grad():
            shift = logits.amax(dim=-1, keepdim=True) if per_row else logits.amax(dim=(-2, -1), keepdim=True)
        return torch.exp(logits - shift) if needs_grad(logits) else logits.sub_(shift).exp_()
    # a row's |x'|^2 / 2 is part of its own shift: exp(w_i . x' - max_i w_i . x'), in place
    exponents = torch.matmul(x, projection.T * x.shape[-1] ** -0.25)  # (batch, heads, n, m)
    return exponents.sub_(exponents.amax(dim=-1, keepdim=True)).exp_()


@register("performer")
class PerformerAttention(AttentionModule):
    """FAVOR+: softmax attention estimated with positive orthogonal random features (approximate, O(n m d))."""

    Config = PerformerConfig
    family = "performer"
    paper = "https://arxiv.org/abs/2009.14794"
    time_complexity = "O(n m d)"
    memory_complexity = "O(n m)"
    exact = False
    supports_causal = True
    supports_grouped_heads = True  # one state per key/value head, read by its group of query heads
    supports_cross = True  # any number of queries over the keys' state; causal: the earlier keys start it
    supports_decode = True  # the running sums S and z: O(m d) per step and in memory, whatever the context
    decode_complexity = "O(m d)"
    config: PerformerConfig

    def __init__(
        self,
        config: PerformerConfig,
        *,
        seq_len: int,
        heads: int,
        head_dim: int,
        q_len: int | None = None,
        kv_heads: int | None = None,
    ) -> None:
        super().__init__(config, seq_len=seq_len, heads=heads, head_dim=head_dim, q_len=q_len, kv_heads=kv_heads)
        # (features, head_dim), shared by every head as in the paper's code; a buffer: drawn, not learned
        projection = orthogonal_features(config.features, head_dim).to(torch.get_default_dtype())
        self.register_buffer("projection", projection)

    def _projection(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection.to(device=x.device, dtype=_FEATURE_DTYPES.get(x.dtype, x.dtype))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
        check_qkv(q, k, v, grouped=True, cross=True)
        acc = _FEATURE_DTYPES.get(q.dtype, q.dtype)
        projection = self._projection(q)
        phi_q = random_features(q.to(acc), projection, per_row=True)  # (batch, heads, q_len, m)
        phi_k = random_features(k.to(acc), projection, per_row=False)  # (batch, kv_heads, seq_len, m)
        tiny = torch.finfo(acc).tiny  # the normalizer's floor: zeros, not NaN, where every feature underflows
        out = linear_attention_on_features(
            phi_q, phi_k, v.to(acc), causal=causal, chunk_size=self.config.chunk_size, eps=tiny
        )
        return out.to(q.dtype)  # (batch, heads, q_len, head_dim)

    @classmethod
    def config_error(cls, config):
        return (
            super().config_error(config)
            or int_error(config, "features", minimum=1)
            or int_error(config, "chunk_size", minimum=1)
        )

    def prefill(self, k: torch.Tensor, v: torch.Tensor, *, capacity: int) -> DecodeCache:
        acc = _FEATURE_DTYPES.get(k.dtype, k.dtype)
        projection = self._projection(k)
        logits = _logits(k.to(acc), projection)  # (batch, kv_heads, n, m)
        if k.shape[2]:
            shift = logits.amax(dim=(-2, -1), keepdim=True)  # (batch, kv_heads, 1, 1)
        else:  # no keys yet: the first one's largest logit becomes the shift
            shift = logits.new_full((*k.shape[:2], 1, 1), -math.inf)
        phi_k = logits.sub_(shift).exp_()  # (batch, kv_heads, n, m)
        kv = phi_k.transpose(-2, -1) @ v.to(acc)  # (batch, kv_heads, m, head_dim)
        tensors = {"kv": kv, "z": phi_k.sum(dim=2), "shift": shift.flatten(2)}  # z (b, kvh, m), shift (b, kvh, 1)
        return DecodeCache(length=k.shape[2], capacity=capacity, tensors=tensors)

    def decode_step(self, q, k, v, cache):
        cache.check_room()
        kv, z, shift = cache.tensors["kv"], cache.tensors["z"], cache.tensors["shift"]  # (b, kvh, m, d), (b, kvh, m)
        acc = kv.dtype
        projection = self._projection(k)
        logits = _logits(k[:, :, 0].to(acc), projection)  # (batch, kv_heads, m)
        new_shift = torch.maximum(shift, logits.amax(dim=-1, keepdim=True))  # (batch, kv_heads, 1)
        rescale = torch.exp(shift - new_shift)  # (batch, kv_heads, 1): the sums so far, to the new shift
        phi_k = logits.sub_(new_shift).exp_()  # (batch, kv_heads, m)
        kv = kv * rescale.unsqueeze(-1) + phi_k.unsqueeze(-1) * v[:, :, 0].to(acc).unsqueeze(-2)  # new tensors
        z = z * rescale + phi_k
        rows = random_features(group_queries(q, k.shape[1]).to(acc), projection, per_row=True)  # (b, kvh, g, m)
        out = state_output(rows, kv, z, eps=torch.finfo(acc).tiny).to(q.dtype)  # (batch, kv_heads, group, d)
        grown = DecodeCache(
            length=cache.length + 1, capacity=cache.capacity, tensors={"kv": kv, "z": z, "shift": new_shift}
        )
        return ungroup_queries(out, q.shape[1]), grown  # (batch, heads, 1, head_dim)

    @classmethod
    def flops(cls, config, *, batch, heads, seq_len, head_dim, causal, q_len=None, kv_heads=None):
        # the features (a product with the projection, 2 n d m, and an exponential per entry, counted as one),
        # then linear attention on m features: per key/value head the sums phi(K)^T V and phi(K)^T 1, per query
        # head the products with them (causal: by chunks, the quadratic form within each chunk besides)
        m, d, q_len, kv_heads = config.features, head_dim, q_len or seq_len, kv_heads or heads
        features = heads * q_len * (2.0 * d * m + m) + kv_heads * seq_len * (2.0 * d * m + m)
        sums = kv_heads * seq_len * (2.0 * m * d + m)
        per_query = 2.0 * m * d + 2.0 * m + d  # phi(q) S, phi(q) z, the division
        if causal:
            chunk = min(config.chunk_size, q_len)
            per_query += 2.0 * chunk * m + 2.0 * chunk * d + chunk  # the chunk's scores, times V, row sums
        return batch * (features + sums + heads * q_len * per_query)

    @classmethod
    def memory_bytes(
        cls, config, *, batch, heads, seq_len, head_dim, itemsize, causal, device="cpu", q_len=None, kv_heads=None
    ):
        m, d, q_len, kv_heads = config.features, head_dim, q_len or seq_len, kv_heads or heads
        acc = max(itemsize, 4)  # features and sums in float32 for half inputs
        # the features of q and k (each made in place of its product with the projection) and the output
        rows = heads * q_len + kv_heads * seq_len
        held = rows * m * acc + heads * q_len * d * itemsize
        casts = (rows + kv_heads * seq_len) * d * acc if itemsize < 4 else 0  # q, k, v in float32
        # linear attention's temporaries: a few blocks of its step (causal: with the chunks' scores)
        block = block_positions(
            (batch, heads, q_len, m), chunk=min(config.chunk_size, q_len), causal=causal, device=device
        )
        per_block = heads * min(block, q_len) * (4.0 * m + (config.chunk_size if causal else 0)) * acc
        return batch * (held + casts + per_block)

    @classmethod
    def decode_flops(cls, config, *, batch, heads, kv_heads, seq_len, head_dim):
        m, d = config.features, head_dim
        # the new key's features and its outer product added to S and z; per query head its features and
        # phi(q) S, phi(q) z and the division
        per_key = 2.0 * d * m + m + 3.0 * m * d + m
        per_query = 2.0 * d * m + m + 2.0 * m * d + 2.0 * m + d
        return batch * (kv_heads * per_key + heads * per_query)

    @classmethod
    def cache_bytes(cls, config, *, batch, heads, kv_heads, seq_len, head_dim, itemsize):
        m = config.features
        return float(batch * kv_heads * (m * (head_dim + 1) + 1) * max(itemsize, 4))  # S, z and the keys' shift
