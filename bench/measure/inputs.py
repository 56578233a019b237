"""Input families: queries, keys and values with the structure each approximate mechanism bets on.

Exact attention on random inputs has no structure for a mechanism to exploit, so an approximation's error
there says little about real models. Each family (named and described in bench.families) models one kind
of structure real attention has; ``family_inputs`` draws it with the timed inputs' shapes, dtype and device.

Every structured family builds unit query and key directions and scales them so that a query and a key
pointing the same way score ``beta`` (``q.k / sqrt(d)``; with shared query-key, where the keys are the
queries normalized, only the queries are scaled). Values come from the same per-token latent as the keys
(plus noise), so the exact output carries that structure and has a norm worth comparing against.

Positions: key j sits at position j; query i at i + kv_len - q_len (the causal alignment), so in
self-attention query i and key i are the same token. With grouped heads, the query heads of a group read
one key/value head and share its latent.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from bench.families import CLUSTERS, FAMILIES, LOCAL_WIDTH, LOW_RANK, PEAKED_SCORE_STD

NOISE = 0.3  # structured families: norm of the noise added to each unit direction (each token's own content)
VALUE_NOISE = 0.5  # structured families: noise on the values, against unit-variance structure
# score of an aligned query and key (q.k / sqrt(d) for unit directions scaled by _scaled), per family
LOCAL_BETA, LOW_RANK_BETA, CLUSTERED_BETA = 16.0, 8.0, 12.0


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What a family draws: q (batch, heads, q_len, d), k and v (batch, kv_heads, kv_len, d or dv)."""

    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Shapes:
        return cls(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3])

    @property
    def tokens(self) -> int:
        """Positions min(0, kv_len - q_len) .. kv_len - 1: every key's and every query's."""
        return max(self.q_len, self.kv_len)

    def split(self, per_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, kv_heads, tokens, ...) -> the queries' rows repeated over each group's heads, and the keys' rows."""
        first_key = self.tokens - self.kv_len
        keys = per_token[:, :, first_key:]
        queries = per_token[:, :, self.tokens - self.q_len :].repeat_interleave(self.heads // self.kv_heads, dim=1)
        return queries, keys


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """x with each row (last dimension) scaled to length 1."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def _noisy(direction: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A unit direction plus noise of norm ~NOISE, normalized again."""
    noise = torch.randn(direction.shape, generator=gen, dtype=direction.dtype) / math.sqrt(direction.shape[-1])
    return unit_rows(direction + NOISE * noise)


def _scaled(q_dir, k_dir, beta: float, *, shared_qk: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit rows scaled so that aligned q and k score beta = q.k / sqrt(d) (shared: q.(q/|q|) / sqrt(d))."""
    d = q_dir.shape[-1]
    if shared_qk:
        return q_dir * (beta * math.sqrt(d)), k_dir
    factor = math.sqrt(beta * math.sqrt(d))
    return q_dir * factor, k_dir * factor


def _values(structure: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-token values: structure (unit variance per element) plus VALUE_NOISE of white noise."""
    return structure + VALUE_NOISE * torch.randn(structure.shape, generator=gen, dtype=structure.dtype)


def _fourier(shapes: Shapes, dim: int, gen: torch.Generator) -> torch.Tensor:
    """(batch, kv_heads, tokens, dim) random Fourier features of position, each row of norm 1.

    Frequencies ~ N(0, 1 / LOCAL_WIDTH^2): the rows' dot product is the mean of cos(w (i - j)) over the
    frequencies, about exp(-(i - j)^2 / (2 LOCAL_WIDTH^2)) (a Gaussian kernel of the distance).
    """
    pairs = (dim + 1) // 2
    freqs = torch.randn(shapes.batch, shapes.kv_heads, 1, pairs, generator=gen, dtype=torch.float64) / LOCAL_WIDTH
    phase = 2 * math.pi * torch.rand(shapes.batch, shapes.kv_heads, 1, pairs, generator=gen, dtype=torch.float64)
    pos = torch.arange(shapes.tokens, dtype=torch.float64).view(1, 1, -1, 1)
    angle = pos * freqs + phase  # (batch, kv_heads, tokens, pairs)
    return torch.cat([angle.cos(), angle.sin()], dim=-1)[..., :dim] / math.sqrt(pairs)


def peaked_scale(head_dim: int, *, shared_qk: bool) -> float:
    """The factor on standard-normal q and k that gives scores q.k/sqrt(d) a spread of PEAKED_SCORE_STD.

    Separate keys: q.k/sqrt(d) with q, k ~ N(0, s^2) has standard deviation s^2. Shared query-key (the keys
    are the queries normalized to unit length): q_i.q_j/|q_j|/sqrt(d) has standard deviation s/sqrt(d), so
    random inputs give nearly uniform attention there and need a larger factor to peak.
    """
    if shared_qk:
        return PEAKED_SCORE_STD * math.sqrt(head_dim)
    return math.sqrt(PEAKED_SCORE_STD)


def _random(q, k, v, gen: torch.Generator, *, shared_qk: bool):
    """The timed inputs as they are."""
    return q, k, v


def _peaked(q, k, v, gen: torch.Generator, *, shared_qk: bool):
    """The timed q and k scaled by peaked_scale."""
    scale = peaked_scale(q.shape[-1], shared_qk=shared_qk)
    return q * scale, k * scale, v


def _local(q, k, v, gen: torch.Generator, *, shared_qk: bool):
    """Position-coded tokens: q and k agree when near; values drift smoothly along the sequence."""
    shapes = Shapes.of(q, k, v)
    q_code, k_code = shapes.split(_fourier(shapes, shapes.head_dim, gen))
    value_code = _fourier(shapes, shapes.value_dim, gen) * math.sqrt((shapes.value_dim + 1) // 2)
    q, k = _scaled(_noisy(q_code, gen), _noisy(k_code, gen), LOCAL_BETA, shared_qk=shared_qk)
    return q, k, _values(shapes.split(value_code)[1], gen)


def _orthonormal(shapes: Shapes, dim: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    """(batch, kv_heads, dim, rank): a random orthonormal basis per key/value head."""
    gauss = torch.randn(shapes.batch, shapes.kv_heads, dim, rank, generator=gen, dtype=torch.float64)
    return torch.linalg.qr(gauss).Q


def _low_rank(q, k, v, gen: torch.Generator, *, shared_qk: bool):
    """Queries and keys in a LOW_RANK-dimensional subspace per head; values a linear image of the keys' latent."""
    shapes = Shapes.of(q, k, v)
    latent = torch.randn(shapes.batch, shapes.kv_heads, shapes.tokens, LOW_RANK, generator=gen, dtype=torch.float64)
    basis = _orthonormal(shapes, shapes.head_dim, LOW_RANK, gen)
    q_lat, k_lat = shapes.split(latent @ basis.transpose(-2, -1))
    value_basis = _orthonormal(shapes, shapes.value_dim, LOW_RANK, gen) * math.sqrt(shapes.value_dim / LOW_RANK)
    q, k = _scaled(unit_rows(q_lat), unit_rows(k_lat), LOW_RANK_BETA, shared_qk=shared_qk)
    return q, k, _values(shapes.split(latent @ value_basis.transpose(-2, -1))[1], gen)


def _clustered(q, k, v, gen: torch.Generator, *, shared_qk: bool):
    """Each token belongs to one of CLUSTERS centres (anywhere in the sequence); its value is its cluster's."""
    shapes = Shapes.of(q, k, v)
    size = (shapes.batch, shapes.kv_heads, CLUSTERS)
    centres = unit_rows(torch.randn(*size, shapes.head_dim, generator=gen, dtype=torch.float64))
    value_centres = torch.randn(*size, shapes.value_dim, generator=gen, dtype=torch.float64)
    member = torch.randint(0, CLUSTERS, (shapes.batch, shapes.kv_heads, shapes.tokens), generator=gen)

    def of(table):  # (batch, kv_heads, CLUSTERS, dim) -> (batch, kv_heads, tokens, dim), each token's centre
        return table.gather(2, member.unsqueeze(-1).expand(-1, -1, -1, table.shape[-1]))

    q_centre, k_centre = shapes.split(of(centres))
    q, k = _scaled(_noisy(q_centre, gen), _noisy(k_centre, gen), CLUSTERED_BETA, shared_qk=shared_qk)
    return q, k, _values(shapes.split(of(value_centres))[1], gen)


# (timed q, k, v, generator, shared_qk=) -> the family's q, k, v (the structured ones: float64 on the CPU)
Draw = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
DRAWS: dict[str, Draw] = {
    "random": _random,
    "peaked": _peaked,
    "local": _local,
    "low_rank": _low_rank,
    "clustered": _clustered,
}
assert tuple(DRAWS) == tuple(FAMILIES), "every family of bench.families is drawn here, in its order"


def family_inputs(family: str, q, k, v, *, shared_qk: bool, seed: int):
    """The family's q, k, v with the shapes, dtype and device of the timed q, k, v."""
    drawn = DRAWS[family](q, k, v, torch.Generator().manual_seed(seed), shared_qk=shared_qk)
    return tuple(x.to(device=q.device, dtype=q.dtype) for x in drawn)
