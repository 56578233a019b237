"""LSH attention with shared query-key vectors (the Reformer).

Paper: Kitaev, Kaiser, Levskaya 2020, "Reformer: The Efficient Transformer", https://arxiv.org/abs/2001.04451

Keys are the queries normalized to unit length (``k`` is ignored), scores are
``q_i . q_j / (|q_j| sqrt(d))``, and a position attends to itself only when no
other position is allowed -- exactly ``tests/reference.py`` with ``shared_qk``.
Instead of all ``n`` keys, each query sees a few candidates found by hashing:

1. **Hash** (angular LSH, Andoni et al. 2015): project onto a random rotation
   ``R`` of shape ``(d, b/2)`` and take ``argmax([xR, -xR])``: one of ``b``
   buckets, once per round with fresh rotations (``n_hashes`` rounds). Past
   ``lsh.MAX_SINGLE_ROTATION`` buckets the hash is factorized (as trax does):
   ``b = b1 * b2`` from two independent rotations, which keeps hashing at
   ``O(n d sqrt(b))`` instead of ``O(n d b)`` -- quadratic when ``b ~ n``.
2. **Sort** the positions of every round by (bucket, position) and cut them
   into chunks of ``bucket_size``; a query attends to the keys of its own chunk
   and of the chunk before it (look-one-back), so each round costs
   ``O(n * bucket_size * d)``; no ``n x n`` matrix is ever formed.
3. **Combine the rounds**: each round gives an output ``o_r`` and the
   logsumexp ``l_r`` of its scores; the result is ``sum_r softmax_r(l_r) o_r``,
   i.e. softmax attention over the multiset union of the rounds' candidates.
   Like reformer-pytorch's default (``allow_duplicate_attention=True``) and
   unlike the paper, a key found in several rounds is *not* discounted: it
   weighs once per round that finds it. Keys found by many rounds are the
   most similar ones, so the bias is towards the exact attention's mass.

Causal masking and the chunk layout
-----------------------------------
With the paper's layout (sort, then cut into chunks across bucket boundaries)
causal masking by position is not enough: the chunk a query lands in depends
on how many positions sort before it, and that depends on the *future*
positions' hashes. Changing ``q`` after ``t`` then moves chunk boundaries and
changes which past keys a query at ``<= t`` sees: the future leaks into the
past. Under ``causal=True`` this module therefore lays chunks out **within
buckets**: every bucket starts a new chunk, a query sees its own chunk and the
previous chunk *of the same bucket*, and a key is a candidate only if it is in
the query's bucket and not later than the query. A query's candidates are then
the up to ``2 * bucket_size`` latest earlier positions of its bucket, which
depend only on positions ``<= `` the query: no leakage, exactly. The price is
padding (partly filled chunks): up to ``n / bucket_size + n_buckets`` chunks are
computed instead of ``n / bucket_size``; the automatic ``n_buckets`` is halved
under ``causal=True`` (buckets of two chunks on average, see ``lsh.auto_n_buckets``).
Non-causal attention uses the paper's cyclic layout, which is what
reformer-pytorch and trax compute.

The self-mask follows the paper: the score of a position with itself is
replaced by ``SELF_SCORE`` (very negative), masked keys by a far more negative
value, so self gets weight only where nothing else is a candidate in any
round. This assumes real scores are far above ``SELF_SCORE`` (|q| well below
``1e5 * sqrt(d)`` in float32/64). On the CPU, where ``exp`` is ~20x slower on
arguments whose result underflows, shifted scores are clamped at
``EXP_FLOOR_CPU`` (-80 in float32) before ``exp`` and masked keys are then set
to exactly 0; self (and any real score more than 80 below the row maximum)
keeps a weight of at most ``exp(-80) ~ 2e-35`` of the largest.

Layout of the computation: every row of chunks (one per batch, head and round)
gets one extra chunk in front (a copy of its last chunk for the cyclic
look-back, or an empty one); the window of chunk ``g`` (chunks ``g - 1`` and
``g``) is then a strided ``unfold`` view of the gathered keys and values, so
``Q K^T`` and ``P V`` are two batched matmuls over all chunks with no per-window
copy. On the CPU the chunks are processed ``BLOCK_SLOTS`` query slots at a
time, so that the gathered rows and scores of a step stay in cache; peak
memory under ``no_grad`` is then ``O(n d r)``, not ``O(n c r)``.

Rotations are drawn at construction from torch's RNG (the module keeps a seed
and derives the rotations for any ``n_buckets`` from it), so the same torch
seed gives the same module and the same output, and forward draws no random
numbers (safe to recompute, e.g. in a reversible stack). The paper re-draws
them at every step; build a new module for that.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from attention_impls import blocks
from attention_impls.base import AttentionModule, check_qkv, int_error, needs_grad
from attention_impls.chunked import Rows, chunked
from attention_impls.lsh import auto_n_buckets, bucket_factors
from attention_impls.registry import register

__all__ = ["ReformerAttention", "ReformerConfig"]

SELF_SCORE = -1e5  # a position's score with itself: used only when nothing else is a candidate
BLOCK_SLOTS = 4096  # query slots per step on the CPU: a step's scores and gathered rows stay in cache
BLOCK_SLOTS_ACCELERATOR = 2**22  # on GPUs, few large steps (launch overhead; memory is the bound)
EXP_FLOOR_CPU = {torch.float32: -80.0, torch.float64: -700.0}  # see forward: the CPU's exp is slow on underflow


@dataclasses.dataclass(frozen=True)
class ReformerConfig:
    """Hyperparameters of LSH attention."""

    bucket_size: int = 64  # chunk length: each query sees its chunk and the previous one (<= 2 * bucket_size keys)
    n_hashes: int = 4  # hashing rounds; more rounds, more candidates (cost grows linearly)
    n_buckets: int | None = None  # buckets per round (1 or even); None: auto_n_buckets, ~seq_len / bucket_size


@dataclasses.dataclass(frozen=True)
class _ScoreRules:
    """What a block's scores become before ``exp``: see the module docstring's self-mask and CPU floor."""

    self_score: float  # a position's score with itself
    mask_value: float  # a masked key's score (far below self_score)
    exp_floor: float | None  # shifted scores are clamped here before exp (the CPU's exp is slow on underflow)


def _block_weights(
    queries: torch.Tensor, keys_t: torch.Tensor, mask: torch.Tensor | None, rules: _ScoreRules
) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(scores - row max) of a block of query chunks over their windows, and the row max (no autograd).

    queries (m, chunk, head_dim), keys_t (m, head_dim, 2 * chunk), mask (m, 1 | chunk, 2 * chunk) or None ->
    weights (m, chunk, 2 * chunk), row max (m, chunk, 1). The normalization is left to the combination of the
    rounds.
    """
    chunk = queries.shape[1]
    scores = torch.bmm(queries, keys_t)  # (m, chunk, 2 * chunk)
    # a query's own key sits in the second half of its window, at its own row
    scores.diagonal(offset=chunk, dim1=1, dim2=2).fill_(rules.self_score)
    if mask is not None:
        scores.masked_fill_(mask, rules.mask_value)
    block_max = scores.amax(dim=-1, keepdim=True)  # (m, chunk, 1)
    shifted = scores.sub_(block_max)  # (m, chunk, 2 * chunk)
    if mask is None or rules.exp_floor is None:
        return shifted.exp_(), block_max  # masked entries: exp(mask_value - row_max) = 0
    # the CPU's exp is ~20x slower where its result underflows (masked entries): clamp first, then zero the
    # masked entries exactly (no weight may depend on a masked key)
    return shifted.clamp_min_(rules.exp_floor).exp_().masked_fill_(mask, 0.0), block_max


class _LSHBlock(torch.autograd.Function):
    """A block's unnormalized output W V, row max and denominator W 1, W = exp(S - max), with its backward
    written out: four products and one product of W with its gradient, instead of autograd's record of the
    in-place steps (a third fewer operations on the (m, chunk, 2 chunk) scores).

    Backward: dW = dOut V^T + dDenominator; dS = dW * W (the max is detached: the result does not depend on
    it); the self score is a constant, so its dS is zero; masked keys have W = 0, so theirs is too. A shifted
    score clamped at the CPU's floor has W = exp(floor) (2e-35 in float32, 1e-304 in float64) next to a row
    maximum of W = 1: its gradient, exactly zero through the clamp, is that small here.
    """

    @staticmethod
    def forward(ctx, queries, keys_t, values, mask, rules: _ScoreRules):
        weights, block_max = _block_weights(queries, keys_t, mask, rules)
        ctx.save_for_backward(queries, keys_t, values, weights)
        ctx.mark_non_differentiable(block_max)
        # (m, chunk, head_dim), (m, chunk), (m, chunk)
        return torch.bmm(weights, values), block_max.view(block_max.shape[:2]), weights.sum(dim=-1)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, _d_max, d_denom):
        queries, keys_t, values, weights = ctx.saved_tensors
        chunk = queries.shape[1]
        d_weights = torch.bmm(d_out, values.transpose(1, 2))  # (m, chunk, 2 * chunk)
        if d_denom is not None:
            d_weights.add_(d_denom.unsqueeze(-1))
        d_scores = d_weights.mul_(weights)  # (m, chunk, 2 * chunk)
        d_scores.diagonal(offset=chunk, dim1=1, dim2=2).zero_()  # the self score is a constant
        d_queries = torch.bmm(d_scores, keys_t.transpose(1, 2))  # (m, chunk, head_dim)
        d_keys_t = torch.bmm(queries.transpose(1, 2), d_scores)  # (m, head_dim, 2 * chunk)
        d_values = torch.bmm(weights.transpose(1, 2), d_out)  # (m, 2 * chunk, head_dim)
        return d_queries, d_keys_t, d_values, None, None


@register("reformer")
class ReformerAttention(AttentionModule):
    """LSH attention over shared query-key vectors (approximate, O(n * bucket_size * n_hashes))."""

    Config = ReformerConfig
    family = "reformer"
    paper = "https://arxiv.org/abs/2001.04451"
    time_complexity = "O(n c r d)"  # c = bucket_size, r = n_hashes
    memory_complexity = "O(n c r)"
    exact = False
    supports_causal = True
    shared_qk = True
    default_residual = "reversible"  # the Reformer is a reversible network
    config: ReformerConfig

    def __init__(self, config: ReformerConfig, *, seq_len: int, heads: int, head_dim: int) -> None:
        super().__init__(config, seq_len=seq_len, heads=heads, head_dim=head_dim)
        # all randomness is drawn here, from torch's RNG; forward draws none
        self.hash_seed = int(torch.randint(0, 2**62, (1,)).item())
        self._rotation_cache: dict[tuple, torch.Tensor] = {}

    @classmethod
    def config_error(cls, config):
        n_buckets = config.n_buckets  # argmax over [xR, -xR] hashes into an even number of buckets
        odd = isinstance(n_buckets, int) and n_buckets > 1 and n_buckets % 2
        return (
            super().config_error(config)
            or int_error(config, "bucket_size", minimum=1)
            or int_error(config, "n_hashes", minimum=1)
            or int_error(config, "n_buckets", minimum=1, optional=True)
            or (f"n_buckets must be None, 1 or an even number, got {n_buckets}" if odd else None)
        )

    def extra_repr(self) -> str:
        cfg = self.config
        sizes = f"bucket_size={cfg.bucket_size}, n_hashes={cfg.n_hashes}, n_buckets={cfg.n_buckets}"
        return f"{sizes}, seed={self.hash_seed}"

    # --- hashing ----------------------------------------------------------
    def n_buckets_for(self, seq_len: int, *, causal: bool) -> int:
        cfg = self.config
        if cfg.n_buckets is not None:
            return cfg.n_buckets
        return auto_n_buckets(seq_len, cfg.bucket_size, causal=causal)

    def rotations(self, n_buckets: int, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(head_dim, n_hashes * sum(f // 2)) random rotations, the same for every call with these arguments."""
        key = (n_buckets, str(device), dtype)
        if key not in self._rotation_cache:
            halves = sum(f // 2 for f in bucket_factors(n_buckets))
            gen = torch.Generator().manual_seed(self.hash_seed)
            # drawn in float64 on the CPU, so float32 and float64 modules (and devices) hash alike
            rot = torch.randn((self.head_dim, self.config.n_hashes * halves), generator=gen, dtype=torch.float64)
            self._rotation_cache[key] = rot.to(device=device, dtype=dtype)  # (head_dim, n_hashes * halves)
        return self._rotation_cache[key]

    @torch.no_grad()
    def hash_buckets(self, q: torch.Tensor, n_buckets: int) -> torch.Tensor:
        """(batch, heads, n_hashes, seq_len) bucket of every position in every round (int64)."""
        batch, heads, seq_len, _ = q.shape
        n_hashes = self.config.n_hashes
        factors = bucket_factors(n_buckets)
        if not factors:
            return torch.zeros((batch, heads, n_hashes, seq_len), dtype=torch.long, device=q.device)
        halves = sum(f // 2 for f in factors)
        rot = self.rotations(n_buckets, device=q.device, dtype=q.dtype)
        projected = torch.matmul(q.detach(), rot)  # (batch, heads, seq_len, n_hashes * halves)
        projected = projected.view(batch, heads, seq_len, n_hashes, halves)  # (batch, heads, seq_len, rounds, halves)
        buckets = torch.zeros((batch, heads, seq_len, n_hashes), dtype=torch.long, device=q.device)
        start = 0
        for factor in factors:
            part = projected[..., start : start + factor // 2]  # (batch, heads, seq_len, rounds, factor / 2)
            # argmax([x, -x]) without building it: the largest entry, or factor/2 + the smallest one
            top, top_index = part.max(dim=-1)  # (batch, heads, seq_len, rounds)
            bottom, bottom_index = part.min(dim=-1)
            index = torch.where(top >= -bottom, top_index, bottom_index + factor // 2)
            buckets = buckets * factor + index
            start += factor // 2
        return buckets.transpose(2, 3).contiguous()  # (batch, heads, rounds, seq_len)

    # --- chunk layouts ----------------------------------------------------
    @staticmethod
    def sorted_layout(buckets: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's layout: positions sorted by (bucket, position), cut into chunks across buckets.

        Returns ``slot_pos`` (batch, heads, rounds, n_chunks * chunk): the position in each slot, ``seq_len``
        for padding; and ``slot_of`` (batch, heads, rounds, seq_len): the slot of each position.
        """
        seq_len = buckets.shape[-1]
        n_slots = math.ceil(seq_len / chunk) * chunk
        perm = torch.sort(buckets, dim=-1, stable=True).indices  # (batch, heads, rounds, seq_len)
        slot_pos = nn.functional.pad(perm, (0, n_slots - seq_len), value=seq_len)  # (batch, heads, rounds, n_slots)
        ticker = torch.arange(seq_len, device=buckets.device).expand_as(perm)
        slot_of = torch.empty_like(perm).scatter_(-1, perm, ticker)  # (batch, heads, rounds, seq_len)
        return slot_pos, slot_of

    @staticmethod
    def bucket_aligned_layout(
        buckets: torch.Tensor, chunk: int, n_buckets: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The causal layout: every bucket starts a new chunk, so no chunk mixes buckets.

        Returns ``slot_pos`` and ``slot_of`` as :meth:`sorted_layout` does (empty slots hold ``seq_len``), and
        ``chunk_bucket`` (batch, heads, rounds, n_chunks): the bucket of each chunk, -1 for an empty one.

        ``(seq_len + n_buckets * (chunk - 1)) // chunk`` chunks hold any hash; on the CPU only as many as the
        fullest row needs are laid out (about 1.25 n / chunk when buckets average two chunks), elsewhere the
        bound is kept (no device-to-host synchronization, static shapes).
        """
        seq_len = buckets.shape[-1]
        sorted_buckets, perm = torch.sort(buckets, dim=-1, stable=True)  # (batch, heads, rounds, seq_len)
        counts = torch.zeros((*buckets.shape[:-1], n_buckets), dtype=torch.long, device=buckets.device)
        counts.scatter_add_(-1, buckets, torch.ones_like(buckets))  # (batch, heads, rounds, n_buckets)
        bucket_start = counts.cumsum(-1) - counts  # first sorted index of each bucket
        chunks_per_bucket = (counts + chunk - 1) // chunk
        if buckets.device.type == "cpu":
            n_chunks = int(chunks_per_bucket.sum(-1).max())
        else:
            n_chunks = (seq_len + n_buckets * (chunk - 1)) // chunk
        chunk_start = chunks_per_bucket.cumsum(-1) - chunks_per_bucket  # first chunk of each bucket
        ticker = torch.arange(seq_len, device=buckets.device).expand_as(perm)
        rank = ticker - bucket_start.gather(-1, sorted_buckets)  # rank of each sorted position within its bucket
        slot = chunk_start.gather(-1, sorted_buckets) * chunk + rank  # (batch, heads, rounds, seq_len)
        slot_shape = (*buckets.shape[:-1], n_chunks * chunk)
        slot_pos = torch.full(slot_shape, seq_len, dtype=torch.long, device=buckets.device)
        slot_pos.scatter_(-1, slot, perm)  # (batch, heads, rounds, n_chunks * chunk)
        slot_of = torch.empty_like(perm).scatter_(-1, perm, slot)  # (batch, heads, rounds, seq_len)
        slot_bucket = torch.full(slot_shape, -1, dtype=torch.long, device=buckets.device)
        slot_bucket.scatter_(-1, slot, sorted_buckets)  # (batch, heads, rounds, n_chunks * chunk)
        # a non-empty chunk's first slot is always filled: chunks fill from rank k * chunk on
        slot_bucket = slot_bucket.view(*buckets.shape[:-1], n_chunks, chunk)  # (batch, heads, rounds, n_chunks, c)
        chunk_bucket = slot_bucket[..., 0]  # (batch, heads, rounds, n_chunks)
        return slot_pos, slot_of, chunk_bucket

    # --- the forward --------------------------------------------------------
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
        check_qkv(q, k, v)
        self.reject_causal(causal)
        batch, heads, seq_len, head_dim = q.shape
        n_hashes = self.config.n_hashes
        chunk = self.config.bucket_size
        n_buckets = self.n_buckets_for(seq_len, causal=causal)
        rows = batch * heads * n_hashes  # one row of chunks per (batch, head, round)
        dtype = q.dtype
        mask_value = -0.5 * torch.finfo(dtype).max
        self_score = max(SELF_SCORE, -0.1 * torch.finfo(dtype).max)

        with torch.no_grad():
            buckets = self.hash_buckets(q, n_buckets)  # (batch, heads, rounds, seq_len)
            if causal:
                slot_pos, slot_of, chunk_bucket = self.bucket_aligned_layout(buckets, chunk, n_buckets)
            else:
                slot_pos, slot_of = self.sorted_layout(buckets, chunk)
            n_chunks = slot_pos.shape[-1] // chunk
            # one extra chunk in front of every row's chunks (see the module docstring): flattened, the window
            # of chunk g is the slots of chunks g - 1 and g, a strided view (unfold)
            slot_pos = slot_pos.view(rows, n_chunks, chunk)  # (rows, n_chunks, chunk)
            # cyclic look-back (chunk 0 sees the last chunk), or nothing before chunk 0
            cyclic = not causal and n_chunks > 1
            front = slot_pos[:, -1:] if cyclic else torch.full_like(slot_pos[:, :1], seq_len)
            slot_pos = torch.cat([front, slot_pos], dim=1)  # (rows, n_chunks + 1, chunk)
            groups = rows * (n_chunks + 1)  # chunks, front chunks included; chunk g > 0 is a query chunk
            table_offsets = torch.arange(batch * heads, device=q.device).repeat_interleave(n_hashes) * seq_len
            if causal:
                # a key is a candidate when its chunk holds the query's bucket: the own chunk, or the previous
                # chunk when it is the same bucket's; empty slots have bucket -1, front chunks -2
                chunk_bucket = chunk_bucket.reshape(rows, n_chunks)
                chunk_bucket = torch.cat([torch.full_like(chunk_bucket[:, :1], -2), chunk_bucket], dim=1)
                chunk_bucket = chunk_bucket.view(groups, 1)  # (groups, 1)
                empty = slot_pos.view(groups, chunk) == seq_len  # (groups, chunk)
                slot_bucket = chunk_bucket.expand(groups, chunk).masked_fill(empty, -1)  # (groups, chunk)
                key_bucket = slot_bucket.reshape(-1).unfold(0, 2 * chunk, chunk)  # (groups - 1, 2 * chunk)
                key_masked = key_bucket != chunk_bucket[1:]
            elif seq_len % chunk or n_chunks == 1:
                key_masked = slot_pos.view(-1).unfold(0, 2 * chunk, chunk) == seq_len  # padding or empty front
            else:
                key_masked = None  # every slot holds a position: nothing to mask
            later = None
            if causal:
                # in a bucket-aligned chunk slots are in position order: later slots are later positions
                later = torch.ones(chunk, 2 * chunk, dtype=torch.bool, device=q.device).triu_(chunk + 1)

        # gathered per block from three (batch * heads * seq_len, head_dim) tables: q, q / (|q| sqrt(d)), v.
        # Empty slots read position 0 of their (batch, head): a key there is masked, a query discarded.
        scale = 1.0 / math.sqrt(head_dim)
        q_rows = q.reshape(batch * heads * seq_len, head_dim)  # (batch * heads * seq_len, head_dim)
        k_rows = q_rows * (scale / q_rows.norm(dim=-1, keepdim=True).clamp_min(1e-30))
        v_rows = v.reshape(batch * heads * seq_len, head_dim)
        with torch.no_grad():
            gather_index = (slot_pos.clamp_max(seq_len - 1) + table_offsets.view(rows, 1, 1)).view(-1)

        # exp's floor on the CPU: results stay normal numbers (exp(-80) ~ 2e-35, exp(-700) ~ 1e-304)
        exp_floor = EXP_FLOOR_CPU.get(dtype) if q.device.type == "cpu" else None
        recording = needs_grad(q, v)

        # query chunks 1 .. groups - 1, a block of them at a time: the block's working set stays in cache
        step = max(1, (BLOCK_SLOTS if q.device.type == "cpu" else BLOCK_SLOTS_ACCELERATOR) // chunk)
        spans = [(first, min(groups, first + step)) for first in range(1, groups, step)]  # query chunks [first, last)

        def block_mask(first: int, last: int) -> torch.Tensor | None:  # keys query chunks [first, last) skip
            mask = None if key_masked is None else key_masked[first - 1 : last - 1].unsqueeze(1)  # (m, 1, 2c)
            if later is not None:
                mask = later if mask is None else mask | later  # (m, chunk, 2 * chunk)
            return mask

        scores_to = _ScoreRules(self_score=self_score, mask_value=mask_value, exp_floor=exp_floor)
        # each block reads the rows of its query chunks and of their windows (chunks first - 1 .. last - 1)
        reads = []
        for first, last in spans:
            index = gather_index[(first - 1) * chunk : last * chunk]
            reads.append((Rows(0, index[chunk:]), Rows(0, index), Rows(0, index)))

        def windows(number: int, q_part, k_part, v_part):
            """A block's queries (m, chunk, d), keys (m, d, 2 chunk), values (m, 2 chunk, d) and mask."""
            keys_t = blocks.unfold(k_part, 0, 2 * chunk, chunk)  # (m, head_dim, 2 * chunk)
            values = blocks.unfold(v_part, 0, 2 * chunk, chunk).transpose(1, 2)  # (m, 2 * chunk, head_dim)
            return q_part.view(-1, chunk, head_dim), keys_t, values, block_mask(*spans[number])

        if recording:
            # one node whose backward costs O(a block) per block (chunked); per block: (m, chunk, head_dim)
            # unnormalized, (m, chunk) row max, (m, chunk) denominator
            def attend(number: int, *parts):
                return _LSHBlock.apply(*windows(number, *parts), scores_to)

            out, row_max, denom = chunked(attend, reads, q_rows, k_rows, v_rows)
        else:  # written in place: no list of blocks, no concatenated copy
            out = q.new_empty((groups - 1, chunk, head_dim))  # (query chunks, chunk, head_dim): unnormalized
            row_max = q.new_empty((groups - 1, chunk))  # (query chunks, chunk)
            denom = q.new_empty((groups - 1, chunk))
            for number, ((first, last), block_reads) in enumerate(zip(spans, reads, strict=True)):
                parts = (read.take(x) for read, x in zip(block_reads, (q_rows, k_rows, v_rows), strict=True))
                queries, keys_t, values, mask = windows(number, *parts)
                weights, block_max = _block_weights(queries, keys_t, mask, scores_to)
                torch.sum(weights, dim=-1, out=denom[first - 1 : last - 1])
                row_max[first - 1 : last - 1] = block_max.view(-1, chunk)
                torch.bmm(weights, values, out=out[first - 1 : last - 1])
        out = out.view(-1, head_dim)  # ((groups - 1) * chunk, head_dim)

        # back to positions: query chunk g is block row g - 1, and row r's chunks start at r * (n_chunks + 1)
        with torch.no_grad():
            row_starts = torch.arange(rows, device=q.device).view(batch, heads, n_hashes, 1) * ((n_chunks + 1) * chunk)
            unsort = slot_of + row_starts  # (batch, heads, rounds, seq_len)
        row_max = row_max.view(-1).index_select(0, unsort.view(-1)).view(batch, heads, n_hashes, seq_len)
        denom = denom.view(-1).index_select(0, unsort.view(-1)).view(batch, heads, n_hashes, seq_len)

        if recording:  # every round's rows in one gather: its backward is one scatter, not one per round
            rounds_out = out.index_select(0, unsort.view(-1)).view(batch, heads, n_hashes, seq_len, head_dim)
            round_outputs = rounds_out.unbind(2)  # rounds x (batch, heads, seq_len, head_dim), unnormalized
        else:
            gathered = out.new_empty((batch * heads * seq_len, head_dim))  # reused per round

        def round_output(round_: int) -> torch.Tensor:  # (batch, heads, seq_len, head_dim), unnormalized
            if recording:
                return round_outputs[round_]
            index = unsort[:, :, round_].reshape(-1)  # (batch * heads * seq_len)
            return torch.index_select(out, 0, index, out=gathered).view(batch, heads, seq_len, head_dim)

        if n_hashes == 1:
            return round_output(0) / denom[:, :, 0, :, None]  # (batch, heads, seq_len, head_dim)
        # Round r weighs softmax_r(lse_r), lse_r = row_max_r + log(denom_r), and its output is out_r / denom_r:
        # out_r is scaled by exp(row_max_r - top) / sum_r' exp(row_max_r' - top) denom_r' for any top. With
        # top = the largest row_max no logsumexp of huge values (SELF_SCORE) loses precision. row_max is
        # detached: the result does not depend on it.
        scaled = torch.exp(row_max - row_max.amax(dim=2, keepdim=True))  # (batch, heads, rounds, seq_len)
        coef = scaled / (scaled * denom).sum(dim=2, keepdim=True)  # (batch, heads, rounds, seq_len)
        result = round_output(0) * coef[:, :, 0, :, None]  # (batch, heads, seq_len, head_dim)
        for round_ in range(1, n_hashes):
            result.addcmul_(round_output(round_), coef[:, :, round_, :, None])
        return result

    # --- cost model -------------------------------------------------------
    @classmethod
    def _slots(cls, config: ReformerConfig, *, seq_len: int, causal: bool) -> tuple[int, int, int]:
        """(n_buckets, n_chunks, window) of one round at this length."""
        chunk = config.bucket_size
        n_buckets = config.n_buckets
        if n_buckets is None:
            n_buckets = auto_n_buckets(seq_len, chunk, causal=causal)
        # causal: bucket-aligned chunks, up to n / c + n_buckets of them (an upper bound: on the CPU only
        # those the hashes fill are computed, about 1.25 n / c with the automatic n_buckets)
        n_chunks = (seq_len + n_buckets * (chunk - 1)) // chunk if causal else math.ceil(seq_len / chunk)
        return n_buckets, n_chunks, 2 * chunk

    @classmethod
    def flops(cls, config, *, batch, heads, seq_len, head_dim, causal):
        n_buckets, n_chunks, window = cls._slots(config, seq_len=seq_len, causal=causal)
        halves = sum(f // 2 for f in bucket_factors(n_buckets))
        hashing = 2.0 * seq_len * head_dim * halves * config.n_hashes
        # Q K^T and P V over the window (own chunk + previous chunk) of every slot, masked slots included;
        # each row of chunks also computes one discarded front chunk
        attention = 4.0 * (n_chunks + 1) * config.bucket_size * window * head_dim * config.n_hashes
        return batch * heads * (hashing + attention)

    @classmethod
    def memory_bytes(cls, config, *, batch, heads, seq_len, head_dim, itemsize, causal):
        # An upper estimate for a forward that autograd records: every block's scores are kept (several
        # copies: shifted, clamped, exponentiated, masked), with the gathered q, k, v and the outputs. Under
        # no_grad only one block's scores live at a time and the peak is ~3-7x lower.
        n_buckets, n_chunks, window = cls._slots(config, seq_len=seq_len, causal=causal)
        slots = batch * heads * config.n_hashes * (n_chunks + 1) * config.bucket_size
        scores = slots * window * (4 * itemsize + 2)  # float copies, masks and autograd bookkeeping per score
        gathered = slots * 3 * head_dim * itemsize  # q, k, v rows of every slot
        outputs = slots * (head_dim + 2) * itemsize  # unnormalized output, row max, denominator
        indices = 6.0 * slots * 8 + batch * heads * config.n_hashes * n_buckets * 8 * 3
        positions = batch * heads * seq_len * head_dim * itemsize * (config.n_hashes + 3)  # unsorting, combining
        return scores + gathered + outputs + indices + positions
