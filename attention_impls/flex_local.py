"""Sliding-window attention as a FlexAttention mask: ``local``'s semantics in PyTorch's fused kernel.

Paper: Beltagy, Peters and Cohan 2020, "Longformer: The Long-Document Transformer",
https://arxiv.org/abs/2004.05150 ; FlexAttention: Dong et al. 2024, "Flex Attention: A Programming Model for
Generating Optimized Attention Kernels", https://arxiv.org/abs/2412.05496

Query ``i`` (at key position ``p = i + seq_len - q_len``: the last query on the last key) attends to key ``j``
when ``|p - j| <= window``, and ``j <= p`` when causal, exactly as ``local``:

    out_i = softmax_j(q_i k_j^T / sqrt(d) over the band) v

The band is a ``mask_mod``; the block mask (``attention_impls.flex``) lists, per block of ``block_size``
queries, the key blocks the band touches: those inside it are full (no mask evaluated), those it cuts are
partial. Time O(n (w + b) d) for blocks of b positions, memory O(n d) (no scores written out); the kernel is
compiled per shape by ``torch.compile`` on first use (its time is the first call's, outside the timed ones).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from attention_impls import flex
from attention_impls.base import UnsupportedCase, check_qkv, choice_error, int_error
from attention_impls.registry import register

__all__ = ["FlexLocalAttention", "FlexLocalConfig", "band_blocks"]

_MORE_QUERIES = "flex_local aligns the queries with the last keys: it needs q_len <= seq_len"


@dataclasses.dataclass(frozen=True)
class FlexLocalConfig:
    """Hyperparameters of sliding-window FlexAttention."""

    window: int = 128  # |i - j| <= window (and j <= i when causal), as local's
    block_size: int = 128  # positions per block of the block mask (FlexAttention's default)
    kernel: str = "compiled"  # "compiled": torch.compile(flex_attention); "eager": PyTorch's reference path


def band_blocks(*, q_len: int, kv_len: int, window: int, block: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_blocks, kv_blocks) bool tables: whether some pair of a query block and a key block is in the band,
    and whether every pair is. Query positions are shifted by kv_len - q_len; the last blocks end at the lengths."""
    offset = kv_len - q_len
    q_first = torch.arange(0, q_len, block) + offset  # (q_blocks,) first and last position of each block
    q_last = (q_first + block - 1).clamp(max=kv_len - 1)
    k_first = torch.arange(0, kv_len, block)  # (kv_blocks,)
    k_last = (k_first + block - 1).clamp(max=kv_len - 1)
    p0, p1 = q_first[:, None], q_last[:, None]  # (q_blocks, 1)
    k0, k1 = k_first[None, :], k_last[None, :]  # (1, kv_blocks)
    if causal:  # some j <= p with p - j <= w; every j <= p with p - j <= w
        return (k0 <= p1) & (p0 - k1 <= window), (k1 <= p0) & (p1 - k0 <= window)
    return (k0 - p1 <= window) & (p0 - k1 <= window), (p1 - k0 <= window) & (k1 - p0 <= window)


@register("flex_local")
class FlexLocalAttention(flex.FlexModule):
    """Sliding-window attention as a FlexAttention block mask (exact within the band, O(n w d))."""

    Config = FlexLocalConfig
    family = "local"
    paper = "https://arxiv.org/abs/2004.05150"
    time_complexity = "O(n w d)"
    memory_complexity = "O(n d)"
    exact = False
    supports_causal = True
    supports_grouped_heads = True  # enable_gqa: key/value heads read by their group, never repeated
    supports_cross = True  # the queries aligned with the last keys, as local
    config: FlexLocalConfig

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
        check_qkv(q, k, v, grouped=True, cross=True)
        q_len, kv_len = q.shape[2], k.shape[2]
        if q_len > kv_len:
            raise UnsupportedCase(_MORE_QUERIES)
        window, block, offset = self.config.window, self.config.block_size, kv_len - q_len

        def in_band(b, h, q_idx, kv_idx):
            distance = q_idx + offset - kv_idx
            keep = distance.abs() <= window
            return keep & (distance >= 0) if causal else keep

        def build():
            any_kept, all_kept = band_blocks(q_len=q_len, kv_len=kv_len, window=window, block=block, causal=causal)
            return flex.block_mask(
                any_kept, all_kept, in_band, q_len=q_len, kv_len=kv_len, block=block, device=q.device
            )

        return self._attend(q, k, v, (q_len, kv_len, causal, q.device), build)  # (batch, heads, q_len, head_dim)

    @classmethod
    def shape_problem(cls, config, *, q_len, seq_len, heads, kv_heads, causal, decode):
        return _MORE_QUERIES if q_len > seq_len else None

    @classmethod
    def config_error(cls, config):
        return (
            super().config_error(config)
            or int_error(config, "window", minimum=0)
            or int_error(config, "block_size", minimum=1)
            or choice_error(config, "kernel", flex.KERNELS)
        )

    @classmethod
    def flops(cls, config, *, batch, heads, seq_len, head_dim, causal, q_len=None, kv_heads=None):
        # Q K^T and P V over the pairs of the kept blocks (the kernel computes partial blocks whole)
        q_len = q_len or seq_len
        any_kept, _ = band_blocks(
            q_len=q_len, kv_len=seq_len, window=config.window, block=config.block_size, causal=causal
        )
        pairs = flex.kept_block_pairs(any_kept, q_len=q_len, kv_len=seq_len, block=config.block_size)
        return 4.0 * batch * heads * pairs * head_dim

    @classmethod
    def memory_bytes(cls, config, *, batch, heads, seq_len, head_dim, itemsize, causal, q_len=None, kv_heads=None):
        q_len = q_len or seq_len
        block_pairs = math.ceil(q_len / config.block_size) * math.ceil(seq_len / config.block_size)
        # the output; the block mask's four index tables (and their transposes), int32
        return float(batch * heads * q_len * head_dim * itemsize + 8 * 4 * block_pairs)
