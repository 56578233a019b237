"""PyTorch's fused ``scaled_dot_product_attention``: what a user would otherwise pick.

Docs: https://pytorch.org/docs/stable/generated/torch.nn.functional.scaled_dot_product_attention.html
FlashAttention (the fused kernel it dispatches to where it can): Dao et al. 2022,
https://arxiv.org/abs/2205.14135

Exact attention; PyTorch picks the backend (flash, memory-efficient or math)
for the device, dtype and shapes. The flash kernels tile the computation, so
memory stays O(n d) while time stays O(n^2 d). Where there is no fused kernel
(MPS; float64 on CUDA) PyTorch falls back to its math path, which writes out
the (n x n) scores as ``full`` does; the memory estimate follows
(``blocks.sdpa_is_fused``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from attention_impls import blocks
from attention_impls.base import AttentionModule, EmptyConfig, check_qkv
from attention_impls.decoding import KVCacheDecoding
from attention_impls.registry import register


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
    """q (batch, heads, q_len, d), k and v (batch, kv_heads, kv_len, d) -> (batch, heads, q_len, d).

    Grouped heads go to the kernel as they are (``enable_gqa``); a causal mask with q_len != kv_len is
    PyTorch's lower-right causal bias (``is_causal`` aligns the first query with the first key instead).
    """
    grouped = q.shape[1] != k.shape[1]
    q_len, kv_len = q.shape[2], k.shape[2]
    if causal and q_len != kv_len:
        mask = causal_lower_right(q_len, kv_len)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=grouped)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=grouped)  # (b, heads, q_len, d)


@register("sdpa")
class SDPAttention(KVCacheDecoding, AttentionModule):
    """torch.nn.functional.scaled_dot_product_attention (exact, fused)."""

    Config = EmptyConfig
    family = "sdpa"
    paper = "https://arxiv.org/abs/2205.14135"
    time_complexity = "O(n^2 d)"
    memory_complexity = "O(n d)"
    exact = True
    supports_causal = True
    supports_grouped_heads = True
    supports_cross = True

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
        check_qkv(q, k, v, grouped=True, cross=True)
        return sdpa_attention(q, k, v, causal=causal)

    @staticmethod
    def attend_cache(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return sdpa_attention(q, keys, values)  # (batch, heads, 1, head_dim): the new token sees every key

    @classmethod
    def flops(cls, config, *, batch, heads, seq_len, head_dim, causal, q_len=None):
        # flash kernels skip the blocks above the diagonal under is_causal; a lower-right causal mask (q_len !=
        # seq_len) reaches the CPU's kernel as an explicit mask, which it applies to every block: counted dense
        q_len = q_len or seq_len
        dense = 4.0 * batch * heads * q_len * seq_len * head_dim
        return dense / 2 if causal and q_len == seq_len else dense

    @classmethod
    def memory_bytes(
        cls, config, *, batch, heads, seq_len, head_dim, itemsize, causal, device="cpu", dtype=None, q_len=None
    ):
        q_len = q_len or seq_len
        rows = batch * heads * q_len
        # a causal mask of its own (bool) where the lengths differ, or where the math path needs one
        mask = q_len * seq_len if causal and q_len != seq_len else 0
        if not blocks.sdpa_is_fused(device, dtype, itemsize=itemsize):
            # the math path: scores, exponentials and probabilities (q_len x seq_len per head), the causal
            # mask (bool), the output
            mask = q_len * seq_len if causal else 0
            return 3.0 * rows * seq_len * itemsize + mask + rows * head_dim * itemsize
        # output, log-sum-exp and per-thread tiles (a fused kernel: no n^2 term)
        return 4.0 * rows * head_dim * itemsize + 4.0 * rows * 4 + mask
