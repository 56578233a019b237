"""Sliding-window (local) attention: each query sees the keys within ``window`` positions.

Paper: Beltagy, Peters and Cohan 2020, "Longformer: The Long-Document Transformer" (sliding window attention),
https://arxiv.org/abs/2004.05150 ; also the 1D local attention of Parmar et al. 2018, "Image Transformer",
https://arxiv.org/abs/1802.05751

Query ``i`` attends to key ``j`` when ``|i - j| <= window`` (and ``j <= i`` when causal):

    out_i = softmax_j(q_i k_j^T / sqrt(d) over the band) v

Computed blockwise in O(n w d) time and O(n w) memory at most: the sequence is cut into query blocks of
``block_size`` positions; block ``b`` attends to the ``block_size + 2 window`` keys starting at
``b * block_size - window`` (``block_size + window`` when causal). Those key windows are overlapping
strided *views* of the keys and values (``unfold``): nothing is gathered or copied. The exact band mask is
the same (block_size x span) pattern for every block; only the few blocks whose window overhangs an end
of the sequence get a mask of their own, and a short zero-padded copy of the keys there. With ``kernel="sdpa"`` each block batch goes through PyTorch's
fused ``scaled_dot_product_attention`` (tiled, no score matrix stored); ``kernel="matmul"`` writes the
scores out and applies the masked softmax explicitly (the plain reference path).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from attention_impls import blocks
from attention_impls.base import (
    AttentionModule,
    UnsupportedCase,
    check_qkv,
    choice_error,
    group_queries,
    int_error,
    needs_grad,
    ungroup_queries,
)
from attention_impls.chunked import Span, chunked
from attention_impls.decoding import DecodeCache
from attention_impls.registry import register

_MORE_QUERIES = "local aligns the queries with the last keys: it needs q_len <= seq_len"


@dataclasses.dataclass(frozen=True)
class LocalConfig:
    """Hyperparameters of sliding-window attention."""

    # keys within this many positions on each side are attended: |i - j| <= window (only j <= i when causal);
    # each query sees 2 * window + 1 keys (window + 1 when causal)
    window: int = 128
    # query positions per block; None picks window / 2 clamped to [16, 256] (each query block computes
    # block_size + 2 * window keys, so smaller blocks waste less on the band's corners but batch less work)
    block_size: int | None = None
    # "sdpa": fused torch scaled_dot_product_attention per block batch; "matmul": explicit scores + masked softmax
    kernel: str = "sdpa"


def auto_block_size(window: int) -> int:
    """The block size used when ``block_size`` is None: window / 2, clamped to [16, 256]."""
    return max(16, min(256, (window + 1) // 2))


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """How the queries are cut into blocks and the keys into windows.

    Query ``i`` sits at key position ``i + offset`` (offset = kv_len - q_len: the last query on the last key, as
    for causal cross-attention; 0 for self-attention).
    """

    q_len: int  # the queries' true length
    kv_len: int  # the keys' true length
    offset: int  # kv_len - q_len >= 0
    window: int  # effective window (clamped to kv_len - 1)
    block: int  # query block length
    n_blocks: int  # ceil(q_len / block)
    ahead: int  # keys after the query block in its window: window, or 0 when causal
    span: int  # keys per query block: block + window + ahead
    interior: tuple[int, int]  # [first, end) of the blocks whose queries and key windows lie inside
    causal: bool


def _geometry(config: LocalConfig, *, q_len: int, kv_len: int, causal: bool) -> _Geometry:
    window = min(config.window, kv_len - 1)
    block = min(config.block_size or auto_block_size(config.window), q_len)
    n_blocks = math.ceil(q_len / block)
    ahead = 0 if causal else window
    offset = kv_len - q_len
    first = min(n_blocks, max(0, math.ceil((window - offset) / block)))  # blocks before reach back before key 0
    end = max(0, (q_len - block - ahead) // block + 1)  # blocks from it on reach past the last key (or query)
    return _Geometry(
        q_len=q_len,
        kv_len=kv_len,
        offset=offset,
        window=window,
        block=block,
        n_blocks=n_blocks,
        ahead=ahead,
        span=block + window + ahead,
        interior=(first, max(first, end)),
        causal=causal,
    )


def _band_keep(geo: _Geometry, edges: torch.Tensor | None, *, group: int) -> torch.Tensor:
    """Which keys of a block's window each of its query rows attends to (a group's heads' rows side by side).

    ``edges`` None: the pattern shared by interior blocks, (group * block, span). Otherwise the query block
    indices of edge blocks: (len(edges), 1, group * block, span), where keys outside [0, kv_len) are dropped
    for valid queries (padded queries keep them: their rows are discarded, and never empty).
    """
    rows = torch.arange(geo.block).unsqueeze(1)  # (block, 1)
    cols = torch.arange(geo.span).unsqueeze(0)  # (1, span)
    delta = cols - geo.window - rows  # key position - query position, (block, span)
    keep = (delta >= -geo.window) & (delta <= (0 if geo.causal else geo.window))  # (block, span)
    if edges is None:
        return keep.repeat(group, 1)  # (group * block, span)
    start = edges.view(-1, 1, 1) * geo.block  # (n_edge, 1, 1)
    query_pos = start + rows  # (n_edge, block, 1)
    key_pos = start + geo.offset - geo.window + cols  # (n_edge, 1, span)
    inside = (key_pos >= 0) & (key_pos < geo.kv_len)  # (n_edge, 1, span)
    keep = keep & (inside | (query_pos >= geo.q_len))  # (n_edge, block, span)
    return keep.repeat(1, group, 1).unsqueeze(1)  # (n_edge, 1, group * block, span)


def _query_blocks(q: torch.Tensor, geo: _Geometry, start: int, stop: int, *, kv_heads: int) -> torch.Tensor:
    """Query blocks [start, stop): (stop - start, batch * kv_heads, group * block, head_dim), each key/value
    head's group of query heads side by side; a view unless padded or grouped."""
    batch, heads, q_len, head_dim = q.shape
    group, blocks_ = heads // kv_heads, stop - start
    rows = q[:, :, start * geo.block : min(q_len, stop * geo.block)]  # (batch, heads, <= blocks*block, d)
    if stop * geo.block > q_len:
        rows = F.pad(rows, (0, 0, 0, stop * geo.block - q_len))  # (batch, heads, blocks*block, d)
    rows = rows.reshape(batch, kv_heads, group, blocks_, geo.block, head_dim)  # (b, kv_heads, group, blocks, block, d)
    rows = rows.permute(3, 0, 1, 2, 4, 5)  # (blocks, batch, kv_heads, group, block, head_dim)
    return rows.reshape(blocks_, batch * kv_heads, group * geo.block, head_dim)  # (blocks, b*kv_heads, g*block, d)


def _stretch(geo: _Geometry, start: int, stop: int) -> tuple[int, int]:
    """[lo, hi): the key positions the windows of query blocks [start, stop) cover (may pass either end)."""
    return start * geo.block + geo.offset - geo.window, stop * geo.block + geo.offset + geo.ahead


def _windows(stretch: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """(batch, kv_heads, hi - lo, head_dim) keys of consecutive blocks' windows -> (blocks, b*kv_heads, span, d)."""
    batch, kv_heads, _, head_dim = stretch.shape
    windows = blocks.unfold(stretch, 2, geo.span, geo.block)  # (batch, kv_heads, blocks, head_dim, span), a view
    windows = windows.permute(2, 0, 1, 4, 3)  # (blocks, batch, kv_heads, span, head_dim)
    return windows.reshape(windows.shape[0], batch * kv_heads, geo.span, head_dim)  # (blocks, b*kv_heads, span, d)


def _attend_ranges(q, k, v, geo: _Geometry, ranges, *, kv_heads: int, kernel: str) -> torch.Tensor:
    """Every range's blocks attended: (batch * kv_heads, n_blocks, group * block, head_dim).

    A range of query blocks reads its queries and the stretch of keys and values its windows cover (the windows
    are overlapping strided views of it; an edge range pads the short stretch beyond either end). Without
    autograd each range is written straight into the output; under it, the ranges are one ``chunked`` node,
    whose backward costs O(a range) per range.
    """
    reads, pads = [], []
    for start, stop, _ in ranges:
        queries = Span(2, start * geo.block, min(geo.q_len, stop * geo.block) - start * geo.block)
        lo, hi = _stretch(geo, start, stop)
        first, last = max(0, lo), min(geo.kv_len, hi)
        keys = Span(2, first, last - first)  # the keys inside the sequence
        reads.append((queries, keys, keys))
        pads.append((0, 0, first - lo, hi - last))

    def attend(number: int, q_part, k_part, v_part):  # -> (batch*kv_heads, blocks, group*block, head_dim)
        start, stop, keep = ranges[number]
        if any(pads[number]):
            k_part, v_part = F.pad(k_part, pads[number]), F.pad(v_part, pads[number])  # (b, kvh, hi - lo, d)
        q_blocks = _query_blocks(q_part, geo, 0, stop - start, kv_heads=kv_heads)  # (blocks, b*kvh, g*block, d)
        part = blocks.attend(q_blocks, _windows(k_part, geo), _windows(v_part, geo), keep, kernel=kernel)
        return (part.transpose(0, 1),)

    if needs_grad(q, k, v):
        return chunked(attend, reads, q, k, v, dim=1)[0]
    batch, heads, _, head_dim = q.shape
    out = q.new_empty(batch * kv_heads, geo.n_blocks, heads // kv_heads * geo.block, head_dim)
    for number, ((start, stop, _), range_reads) in enumerate(zip(ranges, reads, strict=True)):
        out[:, start:stop] = attend(number, *(read.take(x) for read, x in zip(range_reads, (q, k, v), strict=True)))[0]
    return out


@register("local")
class LocalAttention(AttentionModule):
    """Sliding-window attention, exact for its band mask, computed blockwise in O(n w d)."""

    Config = LocalConfig
    family = "local"
    paper = "https://arxiv.org/abs/2004.05150"
    time_complexity = "O(n w d)"
    memory_complexity = "O(n w)"
    exact = False  # an approximation of full attention (exact for its own band mask)
    supports_causal = True
    supports_grouped_heads = True  # a window of keys serves its group of query heads
    supports_cross = True  # the queries aligned with the last keys (q_len <= seq_len)
    supports_decode = True  # a ring of the last window + 1 keys and values: O(w) per step, whatever the context
    decode_complexity = "O(w d)"  # a step's time and its cache's bytes
    config: LocalConfig

    def __init__(
        self,
        config: LocalConfig,
        *,
        seq_len: int,
        heads: int,
        head_dim: int,
        q_len: int | None = None,
        kv_heads: int | None = None,
    ) -> None:
        super().__init__(config, seq_len=seq_len, heads=heads, head_dim=head_dim, q_len=q_len, kv_heads=kv_heads)
        # (q_len, kv_len, causal, group, device) -> (geometry, interior keep (group*block, span),
        # edge keep (n_edge, 1, group*block, span))
        self._masks: dict[tuple, tuple[_Geometry, torch.Tensor, torch.Tensor]] = {}

    def _cached_masks(self, q_len: int, kv_len: int, causal: bool, group: int, device: torch.device):
        key = (q_len, kv_len, causal, group, device)
        if key not in self._masks:
            geo = _geometry(self.config, q_len=q_len, kv_len=kv_len, causal=causal)
            first, end = geo.interior
            edges = [b for b in range(geo.n_blocks) if not first <= b < end]
            edge_keep = _band_keep(geo, torch.tensor(edges, dtype=torch.long), group=group)
            self._masks[key] = (geo, _band_keep(geo, None, group=group).to(device), edge_keep.to(device))
        return self._masks[key]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
        check_qkv(q, k, v, grouped=True, cross=True)
        batch, heads, q_len, head_dim = q.shape
        kv_heads, kv_len = k.shape[1], k.shape[2]
        if q_len > kv_len:
            raise UnsupportedCase(_MORE_QUERIES)
        group = heads // kv_heads
        geo, interior_keep, edge_keep = self._cached_masks(q_len, kv_len, causal, group, q.device)
        rows = batch * kv_heads
        first, end = geo.interior
        if first < end:
            # edge blocks [0, first) and [end, n_blocks) have masks of their own; the interior goes in chunks
            step = max(1, blocks.chunk_elements(q.device) // (rows * group * geo.block * head_dim))
            ranges = [(0, first, edge_keep[:first])]
            ranges += [(start, min(start + step, end), interior_keep) for start in range(first, end, step)]
            ranges.append((end, geo.n_blocks, edge_keep[first:]))
        else:  # a short sequence: every block overhangs an end
            ranges = [(0, geo.n_blocks, edge_keep)]
        ranges = [(start, stop, keep) for start, stop, keep in ranges if start < stop]
        out = _attend_ranges(
            q, k, v, geo, ranges, kv_heads=kv_heads, kernel=self.config.kernel
        )  # (b*kvh, nb, g*blk, d)
        out = out.reshape(batch, kv_heads, geo.n_blocks, group, geo.block, head_dim)  # (b, kvh, nb, g, block, d)
        out = out.transpose(2, 3).reshape(batch, heads, geo.n_blocks * geo.block, head_dim)  # (b, h, padded, d)
        return out[:, :, :q_len]  # (batch, heads, q_len, head_dim)

    def prefill(self, k: torch.Tensor, v: torch.Tensor, *, capacity: int) -> DecodeCache:
        # a ring of window + 1 slots: position p in slot p % slots, the oldest overwritten by the newest
        length = k.shape[2]
        slots = min(self.config.window + 1, capacity)
        keep = list(range(max(0, length - slots), length))
        ring = {}
        for name, x in (("k", k), ("v", v)):
            buffer = x.new_zeros(*x.shape[:2], slots, x.shape[3])  # (batch, kv_heads, slots, head_dim)
            buffer[:, :, [p % slots for p in keep]] = x[:, :, keep]
            ring[name] = buffer
        return DecodeCache(length=length, capacity=capacity, tensors=ring)

    def decode_step(self, q, k, v, cache):
        cache.check_room()
        keys, values = cache.tensors["k"], cache.tensors["v"]  # (batch, kv_heads, slots, head_dim)
        slots = keys.shape[2]
        slot = cache.length % slots  # the oldest token's slot: out of the new token's window
        keys[:, :, slot : slot + 1] = k
        values[:, :, slot : slot + 1] = v
        held = min(cache.length + 1, slots)  # slots [0, held) hold the window (softmax ignores their order)
        rows = group_queries(q, k.shape[1])  # (batch, kv_heads, group, head_dim)
        out = blocks.attend(rows, keys[:, :, :held], values[:, :, :held], None, kernel=self.config.kernel)
        return ungroup_queries(out, q.shape[1]), dataclasses.replace(cache, length=cache.length + 1)

    @classmethod
    def shape_problem(cls, config, *, q_len, seq_len, heads, kv_heads, causal, decode):
        return _MORE_QUERIES if q_len > seq_len else None

    @classmethod
    def config_error(cls, config):
        return (
            super().config_error(config)
            or int_error(config, "window", minimum=0)
            or int_error(config, "block_size", minimum=1, optional=True)
            or choice_error(config, "kernel", blocks.KERNELS)
        )

    @classmethod
    def flops(cls, config, *, batch, heads, seq_len, head_dim, causal, q_len=None):
        # Q K^T and P V over every block's whole key window (band corners, padding and edges included)
        geo = _geometry(config, q_len=q_len or seq_len, kv_len=seq_len, causal=causal)
        return 4.0 * batch * heads * geo.n_blocks * geo.block * geo.span * head_dim

    @classmethod
    def memory_bytes(
        cls, config, *, batch, heads, seq_len, head_dim, itemsize, causal, device="cpu", dtype=None, q_len=None
    ):
        # an upper bound over every chunk size (all blocks at once), so the device's chunk size does not enter;
        # the device and dtype do where "sdpa" falls back to PyTorch's math path, which writes the scores out;
        # grouped heads need less (their windows are shared): this bounds them too
        geo = _geometry(config, q_len=q_len or seq_len, kv_len=seq_len, causal=causal)
        rows = batch * heads
        padded = geo.n_blocks * geo.block
        # the block outputs and the output they are copied into (the windows are views; edges copy a little)
        total = rows * (2 * padded + 6 * (geo.span + geo.window + geo.block)) * head_dim * itemsize
        total += (geo.block * geo.span) * (1 + geo.n_blocks - (geo.interior[1] - geo.interior[0]))  # bool masks
        # an upper bound: all blocks' scores (alive together under autograd; one chunk's worth without it)
        scores = rows * padded * geo.span * itemsize
        if config.kernel == "matmul" or not blocks.sdpa_is_fused(device, dtype, itemsize=itemsize):
            # scores, exponentials, probabilities; matmul copies the strided key and value windows
            total += 3 * scores + 2 * rows * geo.n_blocks * geo.span * head_dim * itemsize
        else:
            total += scores / 4  # the fused kernel's per-thread tiles and its float copy of the mask, generously
        return float(total)

    @classmethod
    def decode_flops(cls, config, *, batch, heads, kv_heads, seq_len, head_dim):
        return 4.0 * batch * heads * min(config.window + 1, seq_len) * head_dim  # the window's keys only

    @classmethod
    def cache_bytes(cls, config, *, batch, heads, kv_heads, seq_len, head_dim, itemsize):
        return 2.0 * batch * kv_heads * min(config.window + 1, seq_len) * head_dim * itemsize  # the window
