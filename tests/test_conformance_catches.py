"""The conformance checks fail, as they should, on deliberately broken implementations.

Each broken module below is handed to the same check functions the suite runs
on every registered implementation; each must raise.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import conformance
from attention_impls import AttentionModule, EmptyConfig, ImplSpec
from attention_impls.full import full_attention


def _spec(cls: type[AttentionModule]) -> ImplSpec:
    return ImplSpec(name=cls.__name__.lower(), module_cls=cls, config=EmptyConfig(), source="tests", origin=__file__)


class _Base(AttentionModule):
    family = "broken"
    paper = "https://example.org"
    time_complexity = "O(n^2 d)"
    memory_complexity = "O(n^2)"

    @classmethod
    def flops(cls, config, *, batch, heads, seq_len, head_dim, causal):
        return 4.0 * batch * heads * seq_len * seq_len * head_dim

    @classmethod
    def memory_bytes(cls, config, *, batch, heads, seq_len, head_dim, itemsize, causal):
        return 3.0 * batch * heads * seq_len * seq_len * itemsize


class LeaksFuture(_Base):
    """Ignores causal=True: every position sees the whole sequence."""

    def forward(self, q, k, v, *, causal=False):
        return full_attention(q, k, v, causal=False)


class LeaksOneStep(_Base):
    """Causal mask off by one: position i also sees i + 1."""

    def forward(self, q, k, v, *, causal=False):
        if not causal:
            return full_attention(q, k, v)
        n = q.shape[2]
        keep = torch.ones(n, n, dtype=torch.bool).tril(diagonal=1)
        scores = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~keep, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v


class Unstable(_Base):
    """Softmax without subtracting the row maximum: overflows for large inputs."""

    def forward(self, q, k, v, *, causal=False):
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if causal:
            n = q.shape[2]
            scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        weights = scores.exp()
        return (weights / weights.sum(-1, keepdim=True)) @ v


class WrongScale(_Base):
    """Forgets the 1/sqrt(d) scale but claims to be exact."""

    def forward(self, q, k, v, *, causal=False):
        return full_attention(q * math.sqrt(q.shape[-1]), k, v, causal=causal)


class SlightlyOff(_Base):
    """Float32 internally: close, but not exact in float64."""

    def forward(self, q, k, v, *, causal=False):
        return full_attention(q.float(), k.float(), v.float(), causal=causal).to(q.dtype)


class WrongShape(_Base):
    """Returns (batch, seq_len, heads, head_dim)."""

    def forward(self, q, k, v, *, causal=False):
        return full_attention(q, k, v, causal=causal).transpose(1, 2).contiguous()


class WrongDtype(_Base):
    """Always returns float32."""

    def forward(self, q, k, v, *, causal=False):
        return full_attention(q, k, v, causal=causal).float()


class NoGradient(_Base):
    """Detaches its inputs: no gradient reaches q, k, v."""

    def forward(self, q, k, v, *, causal=False):
        return full_attention(q.detach(), k.detach(), v.detach(), causal=causal)


class Nondeterministic(_Base):
    """Noise from the OS, not from torch's seeded RNG."""

    def forward(self, q, k, v, *, causal=False):
        noise = int.from_bytes(os.urandom(2), "little") * 1e-9
        return full_attention(q, k, v, causal=causal) + noise


class SilentlyNotCausal(_Base):
    """Claims no causal support yet accepts causal=True without a word."""

    supports_causal = False

    def forward(self, q, k, v, *, causal=False):
        return full_attention(q, k, v)


class NoMetadata(_Base):
    paper = ""

    def forward(self, q, k, v, *, causal=False):
        return full_attention(q, k, v, causal=causal)


CASES = [
    (LeaksFuture, lambda s: conformance.check_causal(s, seq_len=127)),
    (LeaksOneStep, lambda s: conformance.check_causal(s, seq_len=127)),
    (Unstable, conformance.check_finite_large_inputs),
    (WrongScale, lambda s: conformance.check_against_reference(s, seq_len=127, causal=False)),
    (SlightlyOff, lambda s: conformance.check_against_reference(s, seq_len=127, causal=True)),
    (WrongShape, lambda s: conformance.check_shape_dtype_device(s, causal=False)),
    (WrongDtype, lambda s: conformance.check_shape_dtype_device(s, causal=False)),
    (NoGradient, lambda s: conformance.check_gradients(s, seq_len=31, causal=False)),
    (Nondeterministic, lambda s: conformance.check_deterministic(s, seq_len=31)),
    (SilentlyNotCausal, lambda s: conformance.check_causal(s, seq_len=31)),
    (NoMetadata, conformance.check_metadata),
]


@pytest.mark.parametrize(("broken", "check"), CASES, ids=[c[0].__name__ for c in CASES])
def test_check_fails_on_broken_implementation(broken, check) -> None:
    with pytest.raises(AssertionError):
        check(_spec(broken))


def test_checks_pass_on_a_correct_implementation() -> None:
    """The same checks on a correct module built the same way: the failures above are the bugs'."""

    class Correct(_Base):
        def forward(self, q, k, v, *, causal=False):
            return full_attention(q, k, v, causal=causal)

    spec = _spec(Correct)
    for _, check in CASES:
        check(spec)
