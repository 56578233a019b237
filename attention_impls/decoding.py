"""Token-by-token decoding: the cache an implementation keeps between steps, and the key/value cache most use.

A decode step produces the attention output of one new token against every token before it (the last row of
the causal forward). What it needs of the past is the implementation's cache: softmax attention keeps every
key and value (a KV cache, O(n) bytes and O(n) work per step), sliding windows keep the last ``window + 1``
(a ring buffer, O(w)), linear attention keeps its running sums (O(d^2), whatever n). This module registers
nothing.

The cache is written ahead, as serving engines do: buffers for ``capacity`` tokens are allocated when it is
filled (``prefill``), and a step writes the new token into the slot after the ones it holds (a KV cache:
beyond its ``length``) or over the one its window has left behind (a ring). Either way the tokens the new
token attends to are untouched, so a step called again with the same cache and token gives the same output:
that is what a decode case times. Decoding goes on from the cache a step returns; an older one may have lost
a token to the ring.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

__all__ = ["DecodeCache", "KVCacheDecoding", "kv_append", "kv_prefill"]


@dataclasses.dataclass(frozen=True)
class DecodeCache:
    """What a decoding implementation keeps between steps."""

    length: int  # tokens it holds
    capacity: int  # tokens it has room for
    tensors: dict[str, torch.Tensor]  # its buffers, by name (the KV cache's "k" and "v")

    def check_room(self) -> None:
        """ValueError unless one more token fits: call before a step writes into the buffers."""
        if self.length >= self.capacity:
            raise ValueError(f"the cache is full ({self.capacity} tokens)")

    def nbytes(self) -> int:
        """Bytes of its buffers (what a decode case records as ``cache_bytes``)."""
        return sum(t.nelement() * t.element_size() for t in self.tensors.values())


def kv_prefill(k: torch.Tensor, v: torch.Tensor, *, capacity: int) -> DecodeCache:
    """A KV cache holding ``k``, ``v`` (batch, kv_heads, length, head_dim), with buffers for ``capacity`` tokens."""
    batch, kv_heads, length, dim = k.shape
    if not length <= capacity:
        raise ValueError(f"a cache for {capacity} tokens can not hold {length}")
    buffers = {}
    for name, x in (("k", k), ("v", v)):
        buffer = x.new_empty(batch, kv_heads, capacity, dim)  # (batch, kv_heads, capacity, head_dim)
        buffer[:, :, :length] = x
        buffers[name] = buffer
    return DecodeCache(length=length, capacity=capacity, tensors=buffers)


def kv_append(cache: DecodeCache, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, DecodeCache]:
    """Write the new token's k, v (batch, kv_heads, 1, head_dim) after the cached ones.

    Returns the keys and values of every token, the new one last (views (batch, kv_heads, length + 1,
    head_dim)), and the cache holding it.
    """
    cache.check_room()
    slot = cache.length
    keys, values = cache.tensors["k"], cache.tensors["v"]
    keys[:, :, slot : slot + 1] = k
    values[:, :, slot : slot + 1] = v
    grown = dataclasses.replace(cache, length=slot + 1)
    return keys[:, :, : slot + 1], values[:, :, : slot + 1], grown


class KVCacheDecoding:
    """Decoding for softmax attention over every token: a KV cache, O(n d) per step and in memory.

    Put it before ``AttentionModule`` among the bases and give the class ``attend_cache(q, keys, values)``: the
    new token's attention over all keys and values (no mask: it sees every one).
    """

    supports_decode: ClassVar[bool] = True
    decode_complexity: ClassVar[str] = "O(n d)"  # a step's time and its cache's bytes

    def prefill(self, k: torch.Tensor, v: torch.Tensor, *, capacity: int) -> DecodeCache:
        return kv_prefill(k, v, capacity=capacity)

    def decode_step(self, q, k, v, cache):
        keys, values, cache = kv_append(cache, k, v)  # (batch, kv_heads, length, head_dim) each
        return self.attend_cache(q, keys, values), cache  # (batch, heads, 1, head_dim)

    @classmethod
    def decode_flops(cls, config, *, batch, heads, kv_heads, seq_len, head_dim):
        return 4.0 * batch * heads * seq_len * head_dim  # q k^T and p v over seq_len keys

    @classmethod
    def cache_bytes(cls, config, *, batch, heads, kv_heads, seq_len, head_dim, itemsize):
        return 2.0 * batch * kv_heads * seq_len * head_dim * itemsize  # every key and value
