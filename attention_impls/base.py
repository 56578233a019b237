"""The contract every attention implementation follows (docs/ARCHITECTURE.md, the contract section).

An implementation is an ``nn.Module`` subclass of :class:`AttentionModule` with

* class attributes for its metadata (family, paper, complexity, exactness,
  causal support) and its ``Config`` dataclass of hyperparameters;
* ``__init__(config, *, seq_len, heads, head_dim, q_len=None, kv_heads=None)``: build for these shapes
  (learned or random projections live in the module); ``seq_len`` is the key/value length (the context),
  ``q_len`` the query length (None: the same) and ``kv_heads`` the key/value heads (None: ``heads``); the
  base class raises ValueError first when ``config_error`` or ``config_problem`` (below) finds a problem;
* ``forward(q, k, v, *, causal=False)`` on ``q`` of ``(batch, heads, q_len, head_dim)`` and ``k``, ``v`` of
  ``(batch, kv_heads, seq_len, head_dim)``, returning ``q``'s shape. Query head ``h`` reads key/value head
  ``h // (heads // kv_heads)`` (grouped-query attention; PyTorch's ``enable_gqa``), and with ``causal`` query
  ``i`` sees key ``j`` when ``j <= i + seq_len - q_len`` (the last query is aligned with the last key, as
  FlashAttention and PyTorch's lower-right causal bias do). What a class runs beyond self-attention with as
  many key/value heads as query heads, it declares: ``supports_grouped_heads``, ``supports_cross`` (q_len !=
  seq_len) and ``supports_decode`` (``prefill`` and ``decode_step``, ``attention_impls.decoding``); a case
  needing what it does not declare is skipped with the reason;
* ``flops(...)`` and ``memory_bytes(...)``: what one forward really computes
  and roughly how many bytes it allocates, for roofline figures and budgets; ``memory_bytes`` may also
  declare the keywords ``device`` (the device type, ``"cpu"``, ``"cuda"``, ``"mps"``) and ``dtype`` (its
  name, ``"float32"``, or None) when its estimate depends on them: ``ImplSpec.memory_bytes`` passes each one
  only to an estimate whose signature names it, so an estimate written before they existed keeps working;
  both (and the constructor) get ``q_len`` and ``kv_heads`` the same way, only for a case that has them;
* decoding (``supports_decode``): ``prefill``, ``decode_step``, ``decode_flops``, ``cache_bytes`` and
  ``decode_complexity`` (below and ``attention_impls.decoding``);
* ``config_error(config)``: ``None`` or what is wrong with a hyperparameter whatever the sequence length
  (a size below its minimum, an unknown layout, a NaN); ``get(name, params)`` refuses such a config at once;
* ``config_problem(config, *, seq_len)``: the same for problems that depend on the length (the case is
  recorded as skipped), and ``unsupported_reason(...)``: ``None`` or the one-line reason a case can not run.

It is registered with :func:`attention_impls.registry.register` in a module of the ``attention_impls``
package (every module there is imported when the registry is first used) or of a plugin.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from attention_impls.decoding import DecodeCache

__all__ = [
    "AttentionModule",
    "EmptyConfig",
    "UnsupportedCase",
    "causal_keep",
    "check_qkv",
    "choice_error",
    "group_queries",
    "int_error",
    "masked_softmax",
    "needs_grad",
    "pad_seq",
    "ungroup_queries",
]


class UnsupportedCase(ValueError):
    """A case this implementation can not run (a clear, one-line reason)."""


@dataclasses.dataclass(frozen=True)
class EmptyConfig:
    """For implementations without hyperparameters."""


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grouped: bool = False, cross: bool = False) -> None:
    """Raise a clear error unless q is (batch, heads, q_len, head_dim) and k, v (batch, kv_heads, seq_len, head_dim).

    Without ``grouped`` the key/value heads must equal the query heads, without ``cross`` the lengths must be
    equal: an implementation passes what it supports.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be (batch, heads, seq_len, head_dim); got shape {tuple(t.shape)}")
    shapes = f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q, k, v must share batch and head_dim, and k and v their shape; got {shapes}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"the query heads must be a multiple of the key/value heads; got {shapes}")
    if not grouped and q.shape[1] != k.shape[1]:
        raise UnsupportedCase(f"grouped key/value heads are not supported; got {shapes}")
    if not cross and q.shape[2] != k.shape[2]:
        raise UnsupportedCase(f"queries and keys of different lengths are not supported; got {shapes}")
    if q.shape[2] < 1 or k.shape[2] < 1:
        raise ValueError("seq_len must be at least 1")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError("q, k, v must share dtype and device")


def group_queries(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(batch, heads, q_len, d) -> (batch, kv_heads, group * q_len, d): each key/value head's queries as rows.

    Query head h belongs to key/value head h // group (group = heads // kv_heads), so the group's heads are
    adjacent and the reshape is a view of a contiguous q: one product per key/value head, keys never repeated.
    """
    batch, heads, q_len, dim = q.shape
    return q.reshape(batch, kv_heads, (heads // kv_heads) * q_len, dim)  # (batch, kv_heads, group*q_len, d)


def ungroup_queries(out: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`group_queries`: (batch, kv_heads, group * q_len, d) -> (batch, heads, q_len, d)."""
    batch, kv_heads, rows, dim = out.shape
    return out.reshape(batch, heads, rows * kv_heads // heads, dim)  # (batch, heads, q_len, d)


def causal_keep(q_len: int, kv_len: int, device: torch.device | str) -> torch.Tensor:
    """(q_len, kv_len) bool: query i sees key j when j <= i + kv_len - q_len (the last query on the last key)."""
    rows = torch.arange(q_len, device=device).unsqueeze(1) + (kv_len - q_len)  # (q_len, 1)
    cols = torch.arange(kv_len, device=device).unsqueeze(0)  # (1, kv_len)
    return cols <= rows


def int_error(
    config: Any, name: str, *, minimum: int, maximum: int | None = None, optional: bool = False
) -> str | None:
    """What is wrong with the integer hyperparameter ``name`` (None also allowed when ``optional``), or None."""
    value = getattr(config, name)
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{name} must be an integer{' or None' if optional else ''}, got {value!r}"
    if value < minimum:
        return f"{name} must be at least {minimum}, got {value}"
    if maximum is not None and value > maximum:
        return f"{name} must be at most {maximum}, got {value}"
    return None


def choice_error(config: Any, name: str, choices: Iterable[str]) -> str | None:
    """What is wrong with the hyperparameter ``name`` unless it is one of ``choices``, or None."""
    value, allowed = getattr(config, name), tuple(choices)
    if not isinstance(value, str) or value not in allowed:
        return f"{name} must be one of {', '.join(allowed)}, got {value!r}"
    return None


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will record an operation on ``tensors`` (grad mode on and one of them requires grad).

    Blockwise implementations ask this to choose between writing each block into one output buffer (no
    autograd) and concatenating the blocks (with autograd, where writing many slices of one buffer would
    copy the whole gradient once per slice in backward).
    """
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def pad_seq(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad dim 2 (seq_len) of a (batch, heads, seq_len, dim) tensor up to a multiple."""
    seq_len = x.shape[2]
    padded_len = math.ceil(seq_len / multiple) * multiple
    if padded_len == seq_len:
        return x
    return nn.functional.pad(x, (0, 0, 0, padded_len - seq_len))  # (batch, heads, padded_len, dim)


class AttentionModule(nn.Module):
    """Base class of every registered implementation; see the module docstring."""

    # --- metadata, set by each subclass ---------------------------------
    Config: ClassVar[type] = EmptyConfig
    family: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    time_complexity: ClassVar[str] = ""
    memory_complexity: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    supports_causal: ClassVar[bool] = True
    # shared query-key attention (Reformer): the exact reference ties k to q
    shared_qk: ClassVar[bool] = False
    # residual kind used in the layer-stack scope when none is asked for ("standard" or "reversible")
    default_residual: ClassVar[str] = "standard"
    # what it runs beyond self-attention with as many key/value heads as query heads (the module docstring)
    supports_grouped_heads: ClassVar[bool] = False  # kv_heads < heads
    supports_cross: ClassVar[bool] = False  # q_len != seq_len
    supports_decode: ClassVar[bool] = False  # prefill and decode_step
    # a decode step's time and its cache's size in n, the context ("O(n d)" for a KV cache); with supports_decode
    decode_complexity: ClassVar[str] = ""

    def __init__(
        self,
        config: Any,
        *,
        seq_len: int,
        heads: int,
        head_dim: int,
        q_len: int | None = None,
        kv_heads: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} expects a {self.Config.__name__}, got {type(config).__name__}")
        problem = self.config_error(config) or self.config_problem(config, seq_len=seq_len)
        if problem is not None:
            raise ValueError(f"{type(self).__name__}: {problem}")
        self.config = config
        self.seq_len = seq_len  # the key/value length
        self.heads = heads
        self.head_dim = head_dim
        self.q_len = seq_len if q_len is None else q_len
        self.kv_heads = heads if kv_heads is None else kv_heads

    # --- the contract -----------------------------------------------------
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def reject_causal(self, causal: bool) -> None:
        """Call first in forward: a causal request to an implementation without causal support fails clearly."""
        if causal and not self.supports_causal:
            raise UnsupportedCase(f"{type(self).__name__} does not support causal masking")

    def prefill(self, k: torch.Tensor, v: torch.Tensor, *, capacity: int) -> DecodeCache:
        """The decoding cache after the tokens ``k``, ``v`` (batch, kv_heads, length, head_dim), with room for
        ``capacity`` tokens in all (``length`` may be 0). Only for ``supports_decode``; not timed."""
        raise UnsupportedCase(f"{type(self).__name__} does not support decoding")

    def decode_step(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: DecodeCache
    ) -> tuple[torch.Tensor, DecodeCache]:
        """One new token: q (batch, heads, 1, head_dim), k and v (batch, kv_heads, 1, head_dim).

        Returns its output (batch, heads, 1, head_dim), attending to every token the cache holds and itself (the
        last row of the causal forward over them all), and the cache holding it too. It may write into the
        cache's buffers (beyond what ``cache`` holds, or over what the new token's window has left); called again
        with the same ``cache`` and token it returns the same output (a decode case times repeated calls).
        Decoding goes on from the returned cache.
        """
        raise UnsupportedCase(f"{type(self).__name__} does not support decoding")

    @classmethod
    def shape_problem(
        cls, config: Any, *, q_len: int, seq_len: int, heads: int, kv_heads: int, causal: bool, decode: bool
    ) -> str | None:
        """None when a supported kind of case (grouped heads, cross lengths, decoding) makes sense for this
        config at these shapes; otherwise why not. Called only for what the class declares it supports."""
        return None

    @classmethod
    def decode_flops(cls, config: Any, *, batch: int, heads: int, kv_heads: int, seq_len: int, head_dim: int) -> float:
        """Floating-point operations of one decode step against ``seq_len`` tokens (the new one included)."""
        raise NotImplementedError

    @classmethod
    def cache_bytes(
        cls, config: Any, *, batch: int, heads: int, kv_heads: int, seq_len: int, head_dim: int, itemsize: int
    ) -> float:
        """Bytes of the decoding cache holding ``seq_len`` tokens (its estimate, for budgets)."""
        raise NotImplementedError

    @classmethod
    def unsupported_reason(
        cls, config: Any, *, seq_len: int, head_dim: int, causal: bool, device: str, dtype: torch.dtype
    ) -> str | None:
        """None when the case can run; otherwise one line saying why not."""
        if seq_len < 1:
            return f"seq_len must be >= 1, got {seq_len}"
        if causal and not cls.supports_causal:
            return f"{cls.__name__} does not support causal masking"
        return cls.config_error(config) or cls.config_problem(config, seq_len=seq_len)

    @classmethod
    def config_error(cls, config: Any) -> str | None:
        """None when every hyperparameter is valid at any length; otherwise one line about the first bad one.

        The line starts with the hyperparameter's name (``"k must be at least 1, got 0"``): the registry
        prefixes the implementation's name (``linformer.k ...``) and raises a ConfigError from ``get(name,
        params)`` and ``ImplSpec.with_params``, before any estimate or build. This default rejects NaN and
        infinite floats in any field; an override checks each of its hyperparameters after calling it.
        """
        for field in dataclasses.fields(config):
            value = getattr(config, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                return f"{field.name} must be a finite number, got {value}"
        return None

    @classmethod
    def config_problem(cls, config: Any, *, seq_len: int) -> str | None:
        """None when the (valid) hyperparameters make sense for ``seq_len``; otherwise why not (a skipped case)."""
        return None

    @classmethod
    def flops(cls, config: Any, *, batch: int, heads: int, seq_len: int, head_dim: int, causal: bool) -> float:
        """Floating-point operations (2 x multiply-adds) of one forward call."""
        raise NotImplementedError

    @classmethod
    def memory_bytes(
        cls,
        config: Any,
        *,
        batch: int,
        heads: int,
        seq_len: int,
        head_dim: int,
        itemsize: int,
        causal: bool,
        device: str = "cpu",
        dtype: str | None = None,
    ) -> float:
        """Rough upper estimate of the bytes one forward allocates beyond its inputs (for budgets).

        ``device`` is the device type the case runs on (``"cpu"``, ``"cuda"``, ``"mps"``) and ``dtype`` the
        name of its dtype (``"float16"``; None when the caller only knows ``itemsize``), for estimates whose
        kernels differ by device or dtype (a fused kernel here, a materialized score matrix there; a chunk size
        per device). Both are optional in an override: ``ImplSpec.memory_bytes`` passes each only to an
        estimate whose signature declares it (one without them gets the CPU's estimate everywhere).
        """
        raise NotImplementedError


def masked_softmax(scores: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Numerically stable softmax over the last dim where ``keep`` is False is excluded.

    The row maximum is subtracted before exponentiating; a row with no kept
    entry yields zeros, not NaN.
    """
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)  # exp(-inf) = 0 for excluded entries
    denom = weights.sum(dim=-1, keepdim=True)
    return weights / torch.where(denom > 0, denom, torch.ones_like(denom))
