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
blocks, recomputing the feature maps (``_NonCausal`` here, ``_Causal`` in ``linear_causal``): it keeps the inputs, the output and the
state S, z (causal: the sums before every chunk, n / chunk x d x d numbers per key/value head, and each
query's normalizer), not every block's intermediates.

For float16 and bfloat16 inputs the sums over positions (S and z, the chunk
states and their prefix sums, and each query's product with them) are kept in
float32: a float16 sum overflows near 56K positions of order-one terms, and a
bfloat16 one stops growing once each term is below its 8-bit precision. The
feature map and the quadratic form within a chunk stay in the input dtype, and
the result is written back in it.

S and z are kept apart (``_State``, in ``linear_core`` with the feature maps): the denominators phi(q_i)^T z are a dot
product per row, as the numerators are products with d x d matrices (an extra
column for z, d + 1 wide, made every product with the state 20% slower on the
CPU, and a product with one column is three to four times slower than the dot
products). The denominator is floored at ``eps`` (clamp, not add: outputs are exact where it is not tiny), so
a query whose features all vanish (relu, or elu + 1 of very negative inputs)
yields zeros, not NaN.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.autograd.function import once_differentiable

from attention_impls import blocks
from attention_impls.base import (
    AttentionModule,
    check_qkv,
    choice_error,
    group_queries,
    int_error,
    needs_grad,
    ungroup_queries,
)
from attention_impls.decoding import DecodeCache
from attention_impls.linear_causal import _Causal, _causal_with_earlier_keys
from attention_impls.linear_core import (
    _FEATURE_GRADS,
    _GIVEN,
    _STATE_DTYPES,
    FEATURE_MAPS,
    FeatureMap,
    _divide,
    _key_state,
    _key_state_grads,
    _normalizer,
    _output_grads,
    _phi,
    _row_sums,
    _State,
    feature_map,
    state_output,
)
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


@dataclasses.dataclass(frozen=True)
class LinearConfig:
    """Hyperparameters of linear attention."""

    feature_map: str = "elu"  # phi: "elu" (elu(x) + 1, the paper's), "relu" or "softmax" (over head_dim)
    chunk_size: int = 64  # causal path: positions per chunk of the quadratic intra-chunk form
    eps: float = 1e-6  # floor of the normalizer phi(q)^T z


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
