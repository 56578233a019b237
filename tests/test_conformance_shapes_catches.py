"""The grouped-heads, cross-length and decoding checks fail, as they should, on deliberately broken
implementations, and pass on the correct one built the same way."""

from __future__ import annotations

import conformance_shapes
import pytest
import torch

from attention_impls import AttentionModule, EmptyConfig, ImplSpec
from attention_impls.decoding import KVCacheDecoding, kv_append
from attention_impls.full import full_attention


def _spec(cls: type[AttentionModule]) -> ImplSpec:
    return ImplSpec(name=cls.__name__.lower(), module_cls=cls, config=EmptyConfig(), source="tests", origin=__file__)


class Correct(KVCacheDecoding, AttentionModule):
    """Full attention with grouped heads, cross lengths and a KV cache, as the built-in ``full``."""

    family = "broken"
    paper = "https://example.org"
    time_complexity = "O(n^2 d)"
    memory_complexity = "O(n^2)"
    supports_grouped_heads = True
    supports_cross = True

    def forward(self, q, k, v, *, causal=False):
        return full_attention(q, k, v, causal=causal)

    @staticmethod
    def attend_cache(q, keys, values):
        return full_attention(q, keys, values)


class DecodeOffByOne(Correct):
    """The step attends to the cached tokens but not to the new one itself (one position short)."""

    def decode_step(self, q, k, v, cache):
        keys, values, grown = kv_append(cache, k, v)
        if cache.length == 0:
            return full_attention(q, keys, values), grown
        return full_attention(q, keys[:, :, :-1], values[:, :, :-1]), grown


class DecodeSeesStaleSlot(Correct):
    """The step reads one slot past the new token (the buffer's next, unwritten position)."""

    def decode_step(self, q, k, v, cache):
        _, _, grown = kv_append(cache, k, v)
        end = min(cache.length + 2, cache.capacity)
        return full_attention(q, grown.tensors["k"][:, :, :end], grown.tensors["v"][:, :, :end]), grown


class WrongHeadMapping(Correct):
    """Query head h reads key/value head h % kv_heads instead of h // group."""

    def forward(self, q, k, v, *, causal=False):
        repeats = q.shape[1] // k.shape[1]
        return full_attention(q, k.repeat(1, repeats, 1, 1), v.repeat(1, repeats, 1, 1), causal=causal)


class UpperLeftCausal(Correct):
    """Causal cross-attention aligned at the first key (PyTorch's is_causal) instead of the last."""

    def forward(self, q, k, v, *, causal=False):
        if not causal:
            return full_attention(q, k, v)
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        scores = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).masked_fill(~keep, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v


class ClaimsNothing(AttentionModule):
    """Self-attention only; its forward would silently accept grouped heads and cross lengths."""

    family = "broken"
    paper = "https://example.org"
    time_complexity = "O(n^2 d)"
    memory_complexity = "O(n^2)"

    def forward(self, q, k, v, *, causal=False):
        return full_attention(q, k, v, causal=causal)


CHECKS = {
    "decode": conformance_shapes.check_decode,
    "grouped": lambda spec: conformance_shapes.check_grouped_heads(spec, causal=True),
    "cross": lambda spec: conformance_shapes.check_cross_lengths(spec, causal=True),
}
BROKEN = [
    (DecodeOffByOne, "decode"),
    (DecodeSeesStaleSlot, "decode"),
    (WrongHeadMapping, "grouped"),
    (UpperLeftCausal, "cross"),
]


@pytest.mark.parametrize(("broken", "check"), BROKEN, ids=[b[0].__name__ for b in BROKEN])
def test_check_fails_on_broken_implementation(broken, check) -> None:
    with pytest.raises(AssertionError):
        CHECKS[check](_spec(broken))


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_checks_pass_on_the_correct_implementation(check) -> None:
    CHECKS[check](_spec(Correct))


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_an_implementation_claiming_nothing_is_refused_by_the_registry(check) -> None:
    CHECKS[check](_spec(ClaimsNothing))  # the checks pass: each case is refused with a reason
    spec = _spec(ClaimsNothing)
    reason = spec.unsupported_reason(seq_len=64, head_dim=16, causal=True, heads=4, kv_heads=2)
    assert reason == "claimsnothing does not support grouped key/value heads (kv_heads < heads)"
