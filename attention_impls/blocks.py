"""Softmax attention over batches of blocks: the one kernel the blockwise mechanisms (local, sparse) share.

Both cut the sequence into query blocks, give each block its keys (a window, or gathered key blocks) and
attend all blocks of a chunk in one batched call, through one of ``KERNELS``. This module registers nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attention_impls.base import masked_softmax

__all__ = ["CHUNK_ELEMENTS", "KERNELS", "attend"]

# "sdpa": PyTorch's fused scaled_dot_product_attention (tiled, no score matrix stored);
# "matmul": the scores written out and the masked softmax applied explicitly (the plain reference path)
KERNELS = ("sdpa", "matmul")
# Elements of one batched call's keys (or values, or output) per chunk of blocks. Chunks keep each call's
# working set in cache and in reused heap memory (a fresh allocation of tens to hundreds of MB costs more in
# page faults than the work itself), and are still large enough to batch well: 4 MiB per tensor in float32
# (measured: 2^19..2^20 best on CPU).
CHUNK_ELEMENTS = 1 << 20


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None, *, kernel: str):
    """Softmax attention of each block; ``keep`` (True: attended) broadcastable to the scores, or None.

    q (..., m, d), k and v (..., s, d), keep (..., m, s) after broadcasting; returns (..., m, d).
    """
    if kernel == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (..., m, d)
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (..., m, s)
    return torch.matmul(masked_softmax(scores, keep), v)  # (..., m, d)
