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

from attention_impls import blocks
from attention_impls.base import AttentionModule, EmptyConfig, check_qkv
from attention_impls.registry import register


@register("sdpa")
class SDPAttention(AttentionModule):
    """torch.nn.functional.scaled_dot_product_attention (exact, fused)."""

    Config = EmptyConfig
    family = "sdpa"
    paper = "https://arxiv.org/abs/2205.14135"
    time_complexity = "O(n^2 d)"
    memory_complexity = "O(n d)"
    exact = True
    supports_causal = True

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
        check_qkv(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (batch, heads, seq_len, head_dim)

    @classmethod
    def flops(cls, config, *, batch, heads, seq_len, head_dim, causal):
        # flash kernels skip the blocks above the diagonal under a causal mask
        dense = 4.0 * batch * heads * seq_len * seq_len * head_dim
        return dense / 2 if causal else dense

    @classmethod
    def memory_bytes(cls, config, *, batch, heads, seq_len, head_dim, itemsize, causal, device="cpu", dtype=None):
        if not blocks.sdpa_is_fused(device, dtype, itemsize=itemsize):
            # the math path: scores, exponentials and probabilities (seq_len x seq_len per head), the causal
            # mask (bool), the output
            scores = 3.0 * batch * heads * seq_len * seq_len * itemsize + (seq_len * seq_len if causal else 0)
            return scores + batch * heads * seq_len * head_dim * itemsize
        # output, log-sum-exp and per-thread tiles (a fused kernel: no n^2 term)
        return 4.0 * batch * heads * seq_len * head_dim * itemsize + 4.0 * batch * heads * seq_len * 4
