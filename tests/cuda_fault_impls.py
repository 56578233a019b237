"""A deliberately faulty CUDA implementation, registered only where a test imports this module.

``tests/test_cuda.py`` makes the sweep's workers import it through ATTNBENCH_IMPORT (as the sweep tests do
with ``fault_impls``), so the device-side assert happens for real inside a worker process.
"""

from __future__ import annotations

import torch

from attention_impls import AttentionModule, register
from attention_impls.full import FullAttention


@register("fault_device_assert")
class DeviceAssert(AttentionModule):
    """Indexes a CUDA tensor out of range: the indexing kernel's device-side assert fires, and the context is broken."""

    family = "fault"
    paper = "https://example.org/faults"
    time_complexity = "O(n^2 d)"
    memory_complexity = "O(n^2)"
    flops = FullAttention.flops

    @classmethod
    def memory_bytes(cls, config, *, batch, heads, seq_len, head_dim, itemsize, causal):
        return 1024.0  # deliberately tiny: the budget check must not stop the fault from happening

    def forward(self, q, k, v, *, causal=False):
        index = torch.tensor([10], device=q.device)
        _ = torch.zeros(4, device=q.device)[index]  # out of range: checked on the device, not the host
        if q.device.type == "cuda":
            torch.cuda.synchronize(q.device)  # the assert surfaces here (CUDA errors are asynchronous)
        return q
