"""Query-chunked exact attention, registered from outside attnbench.

Paper: Rabe & Staats 2021, "Self-attention Does Not Need O(n^2) Memory",
https://arxiv.org/abs/2112.05682 (here only the query chunking: each chunk of
queries sees all keys, so the score buffer is chunk x n instead of n x n).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from attention_impls import AttentionModule, register


@dataclasses.dataclass(frozen=True)
class ChunkedConfig:
    query_chunk: int = 256  # queries processed at once; the score buffer is query_chunk x seq_len


@register("chunked")
class ChunkedAttention(AttentionModule):
    """Exact softmax attention computed one block of queries at a time."""

    Config = ChunkedConfig
    family = "chunked"
    paper = "https://arxiv.org/abs/2112.05682"
    time_complexity = "O(n^2 d)"
    memory_complexity = "O(n c)"
    exact = True
    supports_causal = True

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
        seq_len = q.shape[2]
        scale = 1.0 / math.sqrt(q.shape[-1])
        chunk = self.config.query_chunk
        outputs = []
        key_pos = torch.arange(seq_len, device=q.device)
        for start in range(0, seq_len, chunk):
            q_chunk = q[:, :, start : start + chunk]  # (batch, heads, chunk, head_dim)
            scores = torch.matmul(q_chunk, k.transpose(-2, -1)) * scale  # (batch, heads, chunk, seq_len)
            if causal:
                query_pos = torch.arange(start, start + q_chunk.shape[2], device=q.device).unsqueeze(1)
                scores = scores.masked_fill(key_pos.unsqueeze(0) > query_pos, float("-inf"))
            probs = torch.softmax(scores, dim=-1)  # every row keeps at least its own key
            outputs.append(torch.matmul(probs, v))  # (batch, heads, chunk, head_dim)
        return torch.cat(outputs, dim=2)  # (batch, heads, seq_len, head_dim)

    @classmethod
    def flops(cls, config, *, batch, heads, seq_len, head_dim, causal):
        return 4.0 * batch * heads * seq_len * seq_len * head_dim

    @classmethod
    def memory_bytes(cls, config, *, batch, heads, seq_len, head_dim, itemsize, causal):
        chunk = min(config.query_chunk, seq_len)
        return 2.0 * batch * heads * chunk * seq_len * itemsize + batch * heads * seq_len * head_dim * itemsize
