"""Deliberately faulty attention implementations, registered only where a test imports this module.

The sweep tests make the runner's workers import it through ATTNBENCH_IMPORT, so
each fault happens for real inside a worker process.
"""

from __future__ import annotations

import os
import signal
import time

import torch
from cli_helpers import HANG_MARKER_ENV

from attention_impls import AttentionModule, register
from attention_impls.full import FullAttention, full_attention


class _Fault(AttentionModule):
    family = "fault"
    paper = "https://example.org/faults"
    time_complexity = "O(n^2 d)"
    memory_complexity = "O(n^2)"
    flops = FullAttention.flops

    @classmethod
    def memory_bytes(cls, config, *, batch, heads, seq_len, head_dim, itemsize, causal):
        return 1024.0  # deliberately tiny: the budget check must not stop the fault from happening


@register("fault_raise")
class Raises(_Fault):
    def forward(self, q, k, v, *, causal=False):
        raise ValueError("deliberate failure in forward")


@register("fault_hang")
class Hangs(_Fault):
    def forward(self, q, k, v, *, causal=False):
        marker = os.environ.get(HANG_MARKER_ENV)
        if marker:
            with open(marker, "w") as file:
                file.write(str(os.getpid()))
        time.sleep(3600)
        return q


@register("fault_hog")
class Hogs(_Fault):
    """Asks the allocator for a petabyte: far beyond any budget and any machine."""

    def forward(self, q, k, v, *, causal=False):
        hog = torch.empty(2**50, dtype=torch.uint8)
        return full_attention(q, k, v, causal=causal) + hog[:1].float()


@register("fault_abort")
class Aborts(_Fault):
    def forward(self, q, k, v, *, causal=False):
        os.abort()


@register("fault_sigkill")
class KilledFromOutside(_Fault):
    """SIGKILL, as ``kill -9`` sends it (and as the out-of-memory killer does, which the runner tells apart)."""

    def forward(self, q, k, v, *, causal=False):
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)
        return q
