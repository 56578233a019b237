"""Block-sparse attention: each query block attends to a fixed set of key blocks.

Papers:
* Child, Gray, Radford and Sutskever 2019, "Generating Long Sequences with Sparse Transformers",
  https://arxiv.org/abs/1904.10509 (the ``fixed`` and ``strided`` patterns, here at block granularity);
* Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences", https://arxiv.org/abs/2007.14062
  (the default ``bigbird`` layout: window blocks + global blocks + random blocks).

The sequence is cut into blocks of ``block_size`` positions (padded at the end, padding masked). A
*layout* lists, for each query block, the key blocks it attends to, padded to the same count ``K`` for
every query block with a validity mask. Only those blocks are computed: the kept key and value blocks are
gathered into (query_blocks, batch * heads, K * block_size, head_dim) tensors and attended with one
batched call; the masks drop invalid slots, padding keys and (causal) the future half of the diagonal
block. No (n x n) score matrix or mask exists anywhere: time O(n K b d), memory O(n K b).

Layouts (block ``i`` is a query block, ``j`` a key block, ``L`` the stride in blocks):
* ``bigbird``: ``|i - j| <= window_blocks``; ``j < global_blocks``; ``random_blocks`` random other blocks
  per query block (fixed by ``seed``). The global blocks also attend to every key block (BigBird's
  global tokens, computed densely: O(global_blocks * block_size * n)).
* ``fixed``: ``j`` in the stride period of ``i`` (``j // L == i // L``), or ``j`` among the last
  ``summary_blocks`` blocks of any period.
* ``strided``: ``|i - j| < L`` or ``(i - j) % L == 0``.
* ``dense``: every block (equals full attention; for tests and as a reference point).
Causal attention keeps only ``j <= i`` (and ``key <= query`` inside the diagonal block).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from attention_impls import blocks
from attention_impls.base import AttentionModule, check_qkv, choice_error, int_error, needs_grad, pad_seq
from attention_impls.chunked import Rows, Span, chunked
from attention_impls.registry import register

LAYOUTS = ("bigbird", "fixed", "strided", "dense")

__all__ = ["BlockLayout", "SparseAttention", "SparseConfig", "block_layout", "block_mask"]


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """Hyperparameters of block-sparse attention."""

    layout: str = "bigbird"  # "bigbird" (window + global + random), "fixed", "strided" or "dense" (every block)
    block_size: int = 64  # positions per block: the layout is chosen per (query block, key block)
    window_blocks: int = 1  # bigbird: key blocks on each side of the query block (1: previous, own, next)
    global_blocks: int = 2  # bigbird: the first blocks; every query attends to them and they attend to every key
    random_blocks: int = 3  # bigbird: random key blocks per query block, outside the window and the global blocks
    stride: int | None = None  # fixed/strided: the period L in blocks; None: round(sqrt(n_blocks)), which balances
    # the local part (L blocks) against the strided or summary part (n_blocks / L blocks)
    summary_blocks: int = 1  # fixed: the last blocks of each period that every query attends to (c in the paper)
    seed: int = 0  # bigbird: seed of the random blocks (the layout is fixed for a given seed and length)
    kernel: str = "sdpa"  # "sdpa": fused scaled_dot_product_attention on the gathered blocks; "matmul": explicit


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Key blocks of each query block, padded to a fixed count; built on the CPU, never mutated."""

    n_blocks: int  # query and key blocks: ceil(n / block_size)
    dense_rows: int  # the first query blocks attend to every key block (bigbird's global rows), computed densely
    index: torch.Tensor  # (n_blocks - dense_rows, K) long: key block of each slot (a valid block even when unused)
    valid: torch.Tensor  # (n_blocks - dense_rows, K) bool: whether the slot is used (no duplicates)

    @property
    def slots(self) -> int:
        return self.index.shape[1]


def _stride(config: SparseConfig, n_blocks: int) -> int:
    if config.stride is not None:
        return config.stride
    return max(1, round(math.sqrt(n_blocks)))


def _bigbird(config: SparseConfig, n_blocks: int, causal: bool) -> tuple[int, torch.Tensor, torch.Tensor]:
    wb, g, r = config.window_blocks, config.global_blocks, config.random_blocks
    dense_rows = 0 if causal else min(g, n_blocks)
    rows = torch.arange(dense_rows, n_blocks).unsqueeze(1)  # (n_rows, 1)
    n_rows = rows.shape[0]
    offsets = torch.arange(-wb, 1 if causal else wb + 1).unsqueeze(0)  # (1, window slots)
    window = rows + offsets  # (n_rows, window slots)
    globals_ = torch.arange(g).expand(n_rows, g)  # (n_rows, g)
    # random blocks: ranks among the candidates [g, i - wb) and (non-causal) [i + wb + 1, n_blocks)
    left = (rows - wb - g).clamp_min(0)  # (n_rows, 1): candidates before the window
    right_start = (rows + wb + 1).clamp_min(g)  # (n_rows, 1)
    right = torch.zeros_like(left) if causal else (n_blocks - right_start).clamp_min(0)  # (n_rows, 1)
    count = left + right  # (n_rows, 1)
    ranks = torch.zeros(n_rows, r, dtype=torch.long)  # (n_rows, r)
    gen = torch.Generator().manual_seed(config.seed)
    uniform = torch.rand(n_rows, r, generator=gen, dtype=torch.float64)  # (n_rows, r)
    for s in range(r):  # Floyd's sampling of r distinct ranks out of count, vectorized over query blocks
        top = (count - r + s).squeeze(1)  # (n_rows,)
        pick = torch.minimum((uniform[:, s] * (top + 1)).long(), top)  # uniform on [0, top]
        taken = (ranks[:, :s] == pick.unsqueeze(1)).any(dim=1)  # (n_rows,)
        ranks[:, s] = torch.where(taken, top, pick)
    few = count.squeeze(1) < r  # fewer candidates than r: take them all
    ranks[few] = torch.arange(r)
    random_valid = torch.arange(r).unsqueeze(0) < count  # (n_rows, r)
    random = torch.where(ranks < left, g + ranks, right_start + ranks - left)  # (n_rows, r)
    index = torch.cat([window, globals_, random], dim=1)  # (n_rows, K0)
    valid = torch.cat([torch.ones_like(window, dtype=torch.bool), torch.ones_like(globals_, dtype=torch.bool)], dim=1)
    valid = torch.cat([valid, random_valid], dim=1)  # (n_rows, K0)
    return dense_rows, index, valid


def _fixed(config: SparseConfig, n_blocks: int, causal: bool) -> tuple[int, torch.Tensor, torch.Tensor]:
    period = _stride(config, n_blocks)
    c = min(config.summary_blocks, period)
    rows = torch.arange(n_blocks).unsqueeze(1)  # (n_blocks, 1)
    own = (rows // period) * period + torch.arange(period).unsqueeze(0)  # (n_blocks, period): the own period
    n_periods = math.ceil(n_blocks / period)
    summary = torch.arange(n_periods).unsqueeze(1) * period + torch.arange(period - c, period)  # (n_periods, c)
    summary = summary.reshape(1, n_periods * c).expand(n_blocks, -1)  # (n_blocks, n_periods * c)
    index = torch.cat([own, summary], dim=1)  # (n_blocks, period + n_periods * c)
    return 0, index, torch.ones_like(index, dtype=torch.bool)  # duplicates are dropped in _finish


def _strided(config: SparseConfig, n_blocks: int, causal: bool) -> tuple[int, torch.Tensor, torch.Tensor]:
    period = _stride(config, n_blocks)
    n_periods = math.ceil(n_blocks / period)
    rows = torch.arange(n_blocks).unsqueeze(1)  # (n_blocks, 1)
    near = rows + torch.arange(-(period - 1), 1 if causal else period)  # |i - j| < L: (n_blocks, 2L - 1 or L)
    # (i - j) % L == 0: the blocks of i's residue class, on both sides (causal: _finish drops j > i)
    far = rows % period + torch.arange(n_periods) * period  # (n_blocks, n_periods)
    index = torch.cat([near, far], dim=1)  # (n_blocks, K0); i itself appears twice, dropped in _finish
    return 0, index, torch.ones_like(index, dtype=torch.bool)


def _dense(config: SparseConfig, n_blocks: int, causal: bool) -> tuple[int, torch.Tensor, torch.Tensor]:
    index = torch.arange(n_blocks).expand(n_blocks, n_blocks)  # (n_blocks, n_blocks)
    return 0, index, torch.ones_like(index, dtype=torch.bool)


_BUILDERS = {"bigbird": _bigbird, "fixed": _fixed, "strided": _strided, "dense": _dense}


def _finish(n_blocks: int, dense_rows: int, index: torch.Tensor, valid: torch.Tensor, causal: bool) -> BlockLayout:
    """Drop out-of-range, future (causal) and duplicate slots; put used slots first; trim to the widest row."""
    rows = torch.arange(dense_rows, n_blocks).unsqueeze(1)  # (n_rows, 1)
    valid = valid & (index >= 0) & (index < n_blocks)
    if causal:
        valid = valid & (index <= rows)
    keyed = torch.where(valid, index, n_blocks).sort(dim=1).values  # (n_rows, K0): unused slots sort last
    repeated = torch.zeros_like(keyed, dtype=torch.bool)
    repeated[:, 1:] = keyed[:, 1:] == keyed[:, :-1]
    keyed = torch.where(repeated, n_blocks, keyed).sort(dim=1).values  # (n_rows, K0)
    valid = keyed < n_blocks
    width = int(valid.sum(dim=1).max()) if valid.numel() else 1
    keyed, valid = keyed[:, :width], valid[:, :width]  # (n_rows, K)
    index = torch.where(valid, keyed, rows)  # unused slots point at the query's own block (masked)
    has_diagonal = (valid & (index == rows)).any(dim=1)
    assert bool(has_diagonal.all()), "every query block must keep its own block (no query would be left empty)"
    return BlockLayout(n_blocks=n_blocks, dense_rows=dense_rows, index=index.contiguous(), valid=valid.contiguous())


@functools.lru_cache(maxsize=64)
def _cached_layout(config: SparseConfig, n_blocks: int, causal: bool) -> BlockLayout:
    dense_rows, index, valid = _BUILDERS[config.layout](config, n_blocks, causal)
    return _finish(n_blocks, dense_rows, index, valid, causal)


def block_layout(config: SparseConfig, *, seq_len: int, causal: bool) -> BlockLayout:
    """The layout used for ``seq_len`` positions (cached; do not modify its tensors)."""
    problem = SparseAttention.config_error(config)
    assert problem is None, problem
    assert seq_len >= 1, f"seq_len must be >= 1, got {seq_len}"
    return _cached_layout(config, math.ceil(seq_len / config.block_size), causal)


def block_mask(config: SparseConfig, *, seq_len: int, causal: bool) -> torch.Tensor:
    """The layout as a dense (n_blocks, n_blocks) bool block mask: [i, j] = query block i sees key block j.

    For tests (the equivalent dense mask); the forward pass never builds it. Within a kept block every
    pair is attended, except padding and, when causal, keys after the query.
    """
    layout = block_layout(config, seq_len=seq_len, causal=causal)
    mask = torch.zeros(layout.n_blocks, layout.n_blocks, dtype=torch.bool)  # (n_blocks, n_blocks)
    mask[: layout.dense_rows] = True
    rows = torch.arange(layout.dense_rows, layout.n_blocks).unsqueeze(1).expand_as(layout.index)  # (n_rows, K)
    mask[rows[layout.valid], layout.index[layout.valid]] = True
    if causal:
        mask &= torch.ones_like(mask).tril()
    return mask


def _keep_mask(layout: BlockLayout, *, seq_len: int, block: int, causal: bool) -> torch.Tensor:
    """Which gathered keys each query keeps: (n_rows, 1, 1, K*block), or (n_rows, 1, block, K*block) when causal."""
    n_rows, slots = layout.index.shape
    offsets = torch.arange(block)
    key_pos = (layout.index.unsqueeze(2) * block + offsets).reshape(n_rows, slots * block)  # (n_rows, K*block)
    keep = layout.valid.repeat_interleave(block, dim=1) & (key_pos < seq_len)  # (n_rows, K*block)
    if not causal:
        return keep.view(n_rows, 1, 1, slots * block)  # (n_rows, 1, 1, K*block)
    query_pos = (torch.arange(layout.dense_rows, layout.n_blocks).unsqueeze(1) * block + offsets).unsqueeze(2)
    keep = keep.unsqueeze(1) & (key_pos.unsqueeze(1) <= query_pos)  # (n_rows, block, K*block)
    return keep.unsqueeze(1)  # (n_rows, 1, block, K*block)


def _chunks(
    layout: BlockLayout, *, rows: int, block: int, head_dim: int, device: str | torch.device
) -> list[tuple[int, int, int]]:
    """(start, stop, width): consecutive layout rows computed together, and the slots their widest row uses.

    A chunk gathers about ``blocks.chunk_elements(device)`` key (or value) elements, then is trimmed to its
    widest row.
    """
    n_rows, slots = layout.index.shape
    step = max(1, blocks.chunk_elements(device) // (rows * slots * block * head_dim))
    used = layout.valid.sum(dim=1)  # (n_rows,)
    return [
        (start, min(start + step, n_rows), max(1, int(used[start : start + step].max())))
        for start in range(0, n_rows, step)
    ]


@dataclasses.dataclass(frozen=True)
class _Chunk:
    """Query blocks [start, stop) computed together, with the key blocks they read."""

    start: int
    stop: int
    index: torch.Tensor | None  # ((stop - start) * width,) key block of each slot, row by row; None: every block
    keep: torch.Tensor | None  # (stop - start, 1, 1|block, width*block) kept keys; dense: (1, padded) or None


@register("sparse")
class SparseAttention(AttentionModule):
    """Block-sparse attention (bigbird, fixed or strided layout), exact for its block mask."""

    Config = SparseConfig
    family = "sparse"
    paper = "https://arxiv.org/abs/1904.10509"
    time_complexity = "O(n K b d)"  # K kept blocks of b positions per query block (bigbird: K constant)
    memory_complexity = "O(n K b)"
    exact = False  # an approximation of full attention (exact for its own block mask)
    supports_causal = True
    config: SparseConfig

    def __init__(self, config: SparseConfig, *, seq_len: int, heads: int, head_dim: int) -> None:
        super().__init__(config, seq_len=seq_len, heads=heads, head_dim=head_dim)
        # (seq_len, causal, batch*heads, head_dim, device) -> (layout, chunks), on the device
        self._plans: dict[tuple, tuple[BlockLayout, list[_Chunk]]] = {}

    def _plan(self, seq_len: int, causal: bool, rows: int, head_dim: int, device: torch.device):
        key = (seq_len, causal, rows, head_dim, device)
        if key not in self._plans:
            block = self.config.block_size
            layout = block_layout(self.config, seq_len=seq_len, causal=causal)
            keep = _keep_mask(layout, seq_len=seq_len, block=block, causal=causal)  # (n_rows, 1, 1|block, K*block)
            chunks = []
            if layout.dense_rows:  # the global query blocks attend to every key (but the padding)
                padded = layout.n_blocks * block
                pad_keep = (torch.arange(padded) < seq_len).view(1, padded) if padded > seq_len else None
                chunks.append(_Chunk(0, layout.dense_rows, None, None if pad_keep is None else pad_keep.to(device)))
            for start, stop, width in _chunks(layout, rows=rows, block=block, head_dim=head_dim, device=device):
                index = layout.index[start:stop, :width].flatten()  # ((stop - start) * width,)
                chunk_keep = keep[start:stop, :, :, : width * block].contiguous()  # (stop - start, 1, ., width*block)
                offset = layout.dense_rows
                chunks.append(_Chunk(offset + start, offset + stop, index.to(device), chunk_keep.to(device)))
            self._plans[key] = (layout, chunks)
        return self._plans[key]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
        check_qkv(q, k, v)
        batch, heads, seq_len, head_dim = q.shape
        rows = batch * heads
        block = self.config.block_size
        kernel = self.config.kernel
        layout, chunks = self._plan(seq_len, causal, rows, head_dim, q.device)
        n_blocks = layout.n_blocks
        q_blocks = pad_seq(q, block).reshape(rows, n_blocks, block, head_dim)  # (batch*heads, n_blocks, block, d)
        k_blocks = pad_seq(k, block).reshape(rows, n_blocks, block, head_dim)  # (batch*heads, n_blocks, block, d)
        v_blocks = pad_seq(v, block).reshape(rows, n_blocks, block, head_dim)  # (batch*heads, n_blocks, block, d)
        # per chunk: its query blocks, and its kept key and value blocks (every block for the dense rows)
        reads = [
            (
                Span(1, chunk.start, chunk.stop - chunk.start),
                *(2 * [Span(1, 0, n_blocks) if chunk.index is None else Rows(1, chunk.index)]),
            )
            for chunk in chunks
        ]

        def attend(number: int, q_part, k_part, v_part):  # q_part (b*h, m, block, d) -> (b*h, m, block, d)
            chunk = chunks[number]
            m = chunk.stop - chunk.start
            if chunk.index is None:  # dense rows: k_part and v_part are every block
                dense = blocks.attend(  # 4-d: PyTorch's fused CPU kernel takes no 3-d inputs
                    q_part.reshape(rows, 1, m * block, head_dim),  # (batch*heads, 1, m*block, d)
                    k_part.reshape(rows, 1, n_blocks * block, head_dim),  # (batch*heads, 1, padded_len, d)
                    v_part.reshape(rows, 1, n_blocks * block, head_dim),
                    chunk.keep,
                    kernel=kernel,
                )  # (batch*heads, 1, m*block, head_dim)
                return (dense.view(rows, m, block, head_dim),)
            kept = (rows, m, k_part.shape[1] // m * block, head_dim)
            part = blocks.attend(
                q_part.transpose(0, 1),  # (m, batch*heads, block, d)
                k_part.view(kept).transpose(0, 1),  # (m, batch*heads, width*block, d)
                v_part.view(kept).transpose(0, 1),
                chunk.keep,
                kernel=kernel,
            )  # (m, batch*heads, block, head_dim)
            return (part.transpose(0, 1),)  # (batch*heads, m, block, head_dim)

        if needs_grad(q, k, v):  # one node whose backward costs O(a chunk) per chunk (see chunked)
            out = chunked(attend, reads, q_blocks, k_blocks, v_blocks, dim=1)[0]  # (b*h, n_blocks, block, d)
        else:  # each chunk written straight into the output
            out = q.new_empty(rows, n_blocks, block, head_dim)  # (batch*heads, n_blocks, block, head_dim)
            for number, (chunk, chunk_reads) in enumerate(zip(chunks, reads, strict=True)):
                parts = [read.take(x) for read, x in zip(chunk_reads, (q_blocks, k_blocks, v_blocks), strict=True)]
                out[:, chunk.start : chunk.stop] = attend(number, *parts)[0]
        return out.view(batch, heads, n_blocks * block, head_dim)[:, :, :seq_len]  # (batch, heads, seq_len, d)

    @classmethod
    def config_error(cls, config):
        return (
            super().config_error(config)
            or choice_error(config, "layout", LAYOUTS)
            or int_error(config, "block_size", minimum=1)
            or int_error(config, "window_blocks", minimum=0)
            or int_error(config, "global_blocks", minimum=0)
            or int_error(config, "random_blocks", minimum=0)
            or int_error(config, "stride", minimum=1, optional=True)
            or int_error(config, "summary_blocks", minimum=1)
            or int_error(config, "seed", minimum=0, maximum=2**64 - 1)  # torch.Generator's range
            or choice_error(config, "kernel", blocks.KERNELS)
        )

    @classmethod
    def flops(cls, config, *, batch, heads, seq_len, head_dim, causal):
        # Q K^T and P V over every gathered slot (unused slots, padding and the masked diagonal half included),
        # plus the dense global rows; counted with the CPU's chunks (flops takes no device: a chunk is trimmed to
        # its widest row, so larger chunks may compute a few more unused slots)
        layout = block_layout(config, seq_len=seq_len, causal=causal)
        block = config.block_size
        chunks = _chunks(layout, rows=batch * heads, block=block, head_dim=head_dim, device="cpu")
        sparse = sum((stop - start) * width for start, stop, width in chunks) * block * block
        dense = min(layout.dense_rows * block, seq_len) * seq_len
        return 4.0 * batch * heads * (sparse + dense) * head_dim

    @classmethod
    def memory_bytes(cls, config, *, batch, heads, seq_len, head_dim, itemsize, causal, device="cpu", dtype=None):
        layout = block_layout(config, seq_len=seq_len, causal=causal)
        n_rows, slots = layout.index.shape
        block = config.block_size
        rows = batch * heads
        padded = layout.n_blocks * block
        chunks = _chunks(layout, rows=rows, block=block, head_dim=head_dim, device=device)  # as forward cuts them
        chunk_keys = max(((stop - start) * width * block for start, stop, width in chunks), default=0)
        dense_scores = min(layout.dense_rows * block, seq_len) * seq_len
        # padded q, k, v; the output and (under autograd) its parts; the gathered blocks of one chunk
        total = rows * (3 * padded + 3 * padded + 2 * chunk_keys) * head_dim * itemsize
        total += n_rows * (block if causal else 1) * slots * block  # the bool keep mask (cached in the module)
        if config.kernel == "matmul" or not blocks.sdpa_is_fused(device, dtype, itemsize=itemsize):
            # scores, exponentials and probabilities of one chunk and of the dense rows; matmul's copies
            # (also "sdpa" where PyTorch falls back to its math path, which writes the scores out)
            total += 3 * rows * (chunk_keys * block + dense_scores) * itemsize
            total += 2 * rows * chunk_keys * head_dim * itemsize
        else:
            # the fused kernel's per-thread tiles and its float copy of the mask, generously
            total += rows * (chunk_keys * block + dense_scores) * itemsize
        return float(total)
