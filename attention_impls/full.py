"""Full (quadratic) softmax attention, materializing the score matrix.

Paper: Vaswani et al. 2017, "Attention Is All You Need", https://arxiv.org/abs/1706.03762

    out = softmax(Q K^T / sqrt(d)) V

The (seq_len x seq_len) score matrix is computed and stored: O(n^2 d) time,
O(n^2) memory. This is the baseline every other mechanism is compared with.
"""

from __future__ import annotations

import math

import torch

from attention_impls.base import (
    AttentionModule,
    EmptyConfig,
    causal_keep,
    check_qkv,
    group_queries,
    masked_softmax,
    ungroup_queries,
)
from attention_impls.decoding import KVCacheDecoding
from attention_impls.registry import register


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V; q (batch, heads, q_len, d), k and v (batch, kv_heads, kv_len, d).

    Grouped heads share their key/value head's keys through ``group_queries`` (no copy of k or v); causal
    aligns the last query with the last key (``causal_keep``).
    """
    batch, heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(dim)
    rows = group_queries(q, kv_heads)  # (batch, kv_heads, group * q_len, d)
    scores = torch.matmul(rows, k.transpose(-2, -1)) * scale  # (batch, kv_heads, group * q_len, kv_len)
    scores = scores.view(batch, kv_heads, heads // kv_heads, q_len, kv_len)  # (batch, kv_heads, group, q_len, kv_len)
    keep = causal_keep(q_len, kv_len, q.device) if causal else None  # (q_len, kv_len)
    probs = masked_softmax(scores, keep).view(batch, kv_heads, -1, kv_len)  # (batch, kv_heads, group*q_len, kv_len)
    return ungroup_queries(torch.matmul(probs, v), heads)  # (batch, heads, q_len, head_dim)


@register("full")
class FullAttention(KVCacheDecoding, AttentionModule):
    """Materialized softmax attention (exact, O(n^2) memory)."""

    Config = EmptyConfig
    family = "full"
    paper = "https://arxiv.org/abs/1706.03762"
    time_complexity = "O(n^2 d)"
    memory_complexity = "O(n^2)"
    exact = True
    supports_causal = True
    supports_grouped_heads = True
    supports_cross = True

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
        check_qkv(q, k, v, grouped=True, cross=True)
        return full_attention(q, k, v, causal=causal)

    @staticmethod
    def attend_cache(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return full_attention(q, keys, values)  # (batch, heads, 1, head_dim): the new token sees every key

    @classmethod
    def flops(cls, config, *, batch, heads, seq_len, head_dim, causal, q_len=None):
        # Q K^T and P V, each q_len * seq_len * head_dim multiply-adds; the masked part is computed too
        return 4.0 * batch * heads * (q_len or seq_len) * seq_len * head_dim

    @classmethod
    def memory_bytes(cls, config, *, batch, heads, seq_len, head_dim, itemsize, causal, q_len=None):
        # scores, exponentials and probabilities: three (q_len x seq_len) matrices per head; the output
        rows = batch * heads * (q_len or seq_len)
        return 3.0 * rows * seq_len * itemsize + rows * head_dim * itemsize
