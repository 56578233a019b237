"""Linformer: keys and values projected along the sequence to a fixed length k.

Paper: Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity",
https://arxiv.org/abs/2006.04768

    out = softmax(Q (E K)^T / sqrt(d)) (F V)

E and F are (k x seq_len) matrices, so the score matrix is (seq_len x k):
O(n k d) time. The queries are processed a block of rows at a time, so the
scores never exist whole and the only allocation growing with n is the
output: memory O(n d) (the paper's O(n k) holds the whole score matrix).

E and F are parameters of the module, built for one ``seq_len`` and shared by
all heads (the paper's layerwise/headwise sharing is a training matter; here
one module is one layer). With ``share_kv`` one matrix serves as both E and F
(the paper's key-value sharing). When seq_len < k the projected length is
seq_len.

Initialization (untrained; the benchmark measures a freshly built module):

* ``"mean"`` (default): segment-mean pooling. Row r of E averages the
  positions of the r-th of k contiguous segments of (almost) equal length
  (position p belongs to segment floor(p k / n)). Each projected key/value is
  then a local average, so the values' mean survives the projection and the
  output approximates exact attention at coarser resolution; a zero-mean
  random E would project the mean away (on inputs with v ~ N(1, 1) the
  relative error against exact attention exceeds 1). When k >= seq_len it is
  the identity, so short sequences are exact. Deterministic.
* ``"random"``: i.i.d. uniform(-1/sqrt(k), 1/sqrt(k)), as in the reference
  implementation by lucidrains (https://github.com/lucidrains/linformer);
  a randomly initialized model's starting point, drawn from torch's RNG.
* ``"identity"``: E = F = I; requires k >= seq_len. Makes the module equal to
  full attention (a test of the plumbing).

The causal mask is not supported: a projected key mixes positions from the
whole sequence, so no query can be kept from seeing the future.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from attention_impls.base import (
    AttentionModule,
    check_qkv,
    choice_error,
    group_queries,
    int_error,
    needs_grad,
    ungroup_queries,
)
from attention_impls.registry import register

__all__ = ["INITS", "LinformerAttention", "LinformerConfig", "linformer_attention", "make_projection"]

INITS = ("mean", "random", "identity")
# score entries (batch x heads x query rows x k) computed at once: bounds the temporaries
_SCORES_BLOCK = 1 << 21


@dataclasses.dataclass(frozen=True)
class LinformerConfig:
    """Hyperparameters of Linformer attention."""

    k: int = 256  # projected length of keys and values (min(k, seq_len) is used)
    share_kv: bool = False  # one projection for keys and values (F = E), else separate E and F
    init: str = "mean"  # projection init: "mean" (segment pooling), "random" (uniform) or "identity" (k >= seq_len)


def make_projection(init: str, *, k: int, seq_len: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A (k, seq_len) projection along the sequence, initialized as ``init`` (see the module docstring)."""
    assert 1 <= k <= seq_len, f"projected length must be in [1, seq_len={seq_len}], got {k}"
    if init == "mean":
        segment = torch.arange(seq_len) * k // seq_len  # (seq_len,) segment of each position, 0..k-1
        member = nn.functional.one_hot(segment, k).t().to(torch.float64)  # (k, seq_len)
        return member / member.sum(dim=1, keepdim=True)  # (k, seq_len) rows average their segment
    if init == "random":
        bound = 1.0 / math.sqrt(k)
        return torch.empty(k, seq_len, dtype=torch.float64).uniform_(-bound, bound, generator=generator)
    if init == "identity":
        assert k == seq_len, f"identity projection needs k == seq_len, got k={k}, seq_len={seq_len}"
        return torch.eye(seq_len, dtype=torch.float64)  # (seq_len, seq_len)
    raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")


def _project(proj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """E X for every (batch, head): proj (k, seq_len), x (batch, kv_heads, seq_len, d) -> (batch, kv_heads, k, d).

    Without autograd, E expanded over (batch, kv_heads) (a stride-0 view): one batched product without copies
    (a plain 2-D E makes torch.matmul fold the batch into a transposed copy of X, 3x slower at long lengths).
    Under autograd, one product of E with every head's columns side by side, (seq_len, batch * kv_heads * d):
    E's gradient is then one product too, where the expanded E's is a (batch * kv_heads, k, seq_len) product
    summed afterwards (a view of x when its heads are interleaved, as a projection's output is).
    """
    batch, kv_heads, seq_len, dim = x.shape
    if not needs_grad(proj, x):
        return torch.matmul(proj.expand(batch, kv_heads, *proj.shape), x)  # (batch, kv_heads, k, d)
    columns = x.permute(2, 0, 1, 3).reshape(seq_len, batch * kv_heads * dim)  # (seq_len, batch * kv_heads * d)
    projected = (proj @ columns).view(proj.shape[0], batch, kv_heads, dim)  # (k, batch, kv_heads, d)
    return projected.permute(1, 2, 0, 3)  # (batch, kv_heads, k, d)


def linformer_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, proj_k: torch.Tensor, proj_v: torch.Tensor
) -> torch.Tensor:
    """softmax(Q (E K)^T / sqrt(d)) (F V); q (batch, heads, q_len, d), k and v (batch, kv_heads, seq_len, d);
    E, F are (k, seq_len).

    Keys and values are projected once per key/value head and read by its group of query heads, their rows
    side by side (``group_queries``). The query rows are taken a block at a time (about ``_SCORES_BLOCK``
    score entries), each block's result written straight into the output: the scores never exist whole.
    """
    assert proj_k.shape[-1] == k.shape[2], f"proj_k is {tuple(proj_k.shape)}, keys have seq_len {k.shape[2]}"
    assert proj_v.shape[-1] == v.shape[2], f"proj_v is {tuple(proj_v.shape)}, values have seq_len {v.shape[2]}"
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    scale = 1.0 / math.sqrt(dim)
    keys_t = _project(proj_k, k).transpose(-2, -1) * scale  # (batch, kv_heads, head_dim, k), scaled
    values = _project(proj_v, v)  # (batch, kv_heads, k, head_dim)
    q_rows = group_queries(q, kv_heads)  # (batch, kv_heads, group * q_len, head_dim)
    n_rows = q_rows.shape[2]
    rows = max(1, _SCORES_BLOCK // (batch * kv_heads * keys_t.shape[-1]))
    if rows >= n_rows:
        probs = torch.softmax(torch.matmul(q_rows, keys_t), dim=-1)  # (batch, kv_heads, group * q_len, k)
        return ungroup_queries(torch.matmul(probs, values), heads)  # (batch, heads, q_len, head_dim)
    if needs_grad(q, keys_t, values):
        # split and concatenated: their backward is one concatenation and one split (slices of q and writes
        # into one output would each cost a gradient the size of the whole in backward)
        parts = [torch.softmax(part @ keys_t, dim=-1) @ values for part in q_rows.split(rows, dim=2)]
        return ungroup_queries(torch.cat(parts, dim=2), heads)  # (batch, heads, q_len, head_dim)
    out = q.new_empty(batch, kv_heads, n_rows, values.shape[-1])  # (batch, kv_heads, group * q_len, head_dim)
    for start in range(0, n_rows, rows):
        scores = torch.matmul(q_rows[:, :, start : start + rows], keys_t)  # (batch, kv_heads, rows, k)
        probs = torch.softmax(scores, dim=-1)  # (batch, kv_heads, rows, k)
        torch.matmul(probs, values, out=out[:, :, start : start + rows])  # (batch, kv_heads, rows, head_dim)
    return ungroup_queries(out, heads)  # (batch, heads, q_len, head_dim)


@register("linformer")
class LinformerAttention(AttentionModule):
    """Softmax attention over k sequence-projected keys and values (approximate, O(n k d), no causal mask)."""

    Config = LinformerConfig
    family = "linformer"
    paper = "https://arxiv.org/abs/2006.04768"
    time_complexity = "O(n k d)"
    memory_complexity = "O(n d)"
    exact = False
    supports_causal = False
    supports_grouped_heads = True  # keys and values projected once per key/value head
    supports_cross = True  # any number of queries over the projected keys (E and F span the keys' length)

    def __init__(
        self,
        config: LinformerConfig,
        *,
        seq_len: int,
        heads: int,
        head_dim: int,
        q_len: int | None = None,
        kv_heads: int | None = None,
    ) -> None:
        super().__init__(config, seq_len=seq_len, heads=heads, head_dim=head_dim, q_len=q_len, kv_heads=kv_heads)
        assert seq_len >= 1, f"seq_len must be >= 1, got {seq_len}"
        self.k_eff = min(config.k, seq_len)
        dtype = torch.get_default_dtype()
        self.proj_k = nn.Parameter(make_projection(config.init, k=self.k_eff, seq_len=seq_len).to(dtype))
        if config.share_kv:
            self.proj_v = None
        else:
            self.proj_v = nn.Parameter(make_projection(config.init, k=self.k_eff, seq_len=seq_len).to(dtype))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
        self.reject_causal(causal)
        check_qkv(q, k, v, grouped=True, cross=True)
        if k.shape[2] != self.seq_len:
            raise ValueError(
                f"linformer module was built for seq_len={self.seq_len} but got seq_len={k.shape[2]}: "
                f"its projections are ({self.k_eff}, {self.seq_len}); build a module for this length"
            )
        proj_k = self.proj_k.to(dtype=q.dtype, device=q.device)  # no copy when they already match
        proj_v = proj_k if self.proj_v is None else self.proj_v.to(dtype=q.dtype, device=q.device)
        return linformer_attention(q, k, v, proj_k=proj_k, proj_v=proj_v)

    @classmethod
    def config_error(cls, config):
        share_kv = config.share_kv
        return (
            super().config_error(config)
            or int_error(config, "k", minimum=1)
            or (None if isinstance(share_kv, bool) else f"share_kv must be true or false, got {share_kv!r}")
            or choice_error(config, "init", INITS)
        )

    @classmethod
    def config_problem(cls, config, *, seq_len):
        if config.init == "identity" and config.k < seq_len:
            return f"init='identity' needs k >= seq_len, got k={config.k} < seq_len={seq_len}"
        return None

    @classmethod
    def flops(cls, config, *, batch, heads, seq_len, head_dim, causal, q_len=None, kv_heads=None):
        k_eff, q_len, kv_heads = min(config.k, seq_len), q_len or seq_len, kv_heads or heads
        # E K and F V per key/value head, each k n d multiply-adds; then Q K'^T and P V' per query head, each
        # k q_len d; the softmax's exp/sum/divide ~ 3 q_len k
        projections = 4.0 * k_eff * seq_len * head_dim
        return batch * (kv_heads * projections + heads * (4.0 * k_eff * q_len * head_dim + 3.0 * q_len * k_eff))

    @classmethod
    def memory_bytes(cls, config, *, batch, heads, seq_len, head_dim, itemsize, causal, q_len=None):
        k_eff, q_len = min(config.k, seq_len), q_len or seq_len
        rows = min(q_len, max(1, _SCORES_BLOCK // (batch * heads * k_eff)))
        # projected keys (and their scaled copy) and values; a block's scores and probabilities; the output
        elements = 3.0 * k_eff * head_dim + 2.0 * rows * k_eff + q_len * head_dim
        # plus E and F cast to the input's dtype when the module's differs
        return batch * heads * elements * itemsize + 2.0 * k_eff * seq_len * itemsize
