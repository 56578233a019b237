"""Full (quadratic) softmax attention, materializing the score matrix.

Paper: Vaswani et al. 2017, "Attention Is All You Need", https://arxiv.org/abs/1706.03762

    out = softmax(Q K^T / sqrt(d)) V

The (seq_len x seq_len) score matrix is computed and stored: O(n^2 d) time,
O(n^2) memory. This is the baseline every other mechanism is compared with.
"""

from __future__ import annotations

import math

import torch

from attention_impls.base import AttentionModule, EmptyConfig, check_qkv, masked_softmax
from attention_impls.registry import register


def causal_keep(seq_len_q: int, seq_len_k: int, device: torch.device) -> torch.Tensor:
    """(seq_len_q, seq_len_k) bool: query i may see key j when j <= i."""
    rows = torch.arange(seq_len_q, device=device).unsqueeze(1)
    cols = torch.arange(seq_len_k, device=device).unsqueeze(0)
    return cols <= rows


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V on (batch, heads, seq_len, head_dim) tensors."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (batch, heads, seq_len, seq_len)
    keep = causal_keep(q.shape[2], k.shape[2], q.device) if causal else None
    probs = masked_softmax(scores, keep)  # (batch, heads, seq_len, seq_len)
    return torch.matmul(probs, v)  # (batch, heads, seq_len, head_dim)


@register("full")
class FullAttention(AttentionModule):
    """Materialized softmax attention (exact, O(n^2) memory)."""

    Config = EmptyConfig
    family = "full"
    paper = "https://arxiv.org/abs/1706.03762"
    time_complexity = "O(n^2 d)"
    memory_complexity = "O(n^2)"
    exact = True
    supports_causal = True

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
        check_qkv(q, k, v)
        return full_attention(q, k, v, causal=causal)

    @classmethod
    def flops(cls, config, *, batch, heads, seq_len, head_dim, causal):
        # Q K^T and P V, each seq_len^2 * head_dim multiply-adds; the masked half is computed too
        return 4.0 * batch * heads * seq_len * seq_len * head_dim

    @classmethod
    def memory_bytes(cls, config, *, batch, heads, seq_len, head_dim, itemsize, causal):
        # scores, exponentials and probabilities: three (seq_len x seq_len) matrices per head
        return 3.0 * batch * heads * seq_len * seq_len * itemsize + batch * heads * seq_len * head_dim * itemsize
