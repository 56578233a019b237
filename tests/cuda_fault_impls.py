"""A deliberately faulty CUDA implementation, registered only where a test imports this module.

``tests/test_cuda.py`` makes the sweep's workers import it through ATTNBENCH_IMPORT (as the sweep tests do
with ``fault_impls``), so the device-side assert happens for real inside a worker process.
"""

from __future__ import annotations

import torch
from fault_impls import _Fault

from attention_impls import register


@register("fault_device_assert")
class DeviceAssert(_Fault):
    """Indexes a CUDA tensor out of range: the indexing kernel's device-side assert fires, and the context is broken."""

    def forward(self, q, k, v, *, causal=False):
        index = torch.tensor([10], device=q.device)
        _ = torch.zeros(4, device=q.device)[index]  # out of range: checked on the device, not the host
        if q.device.type == "cuda":
            torch.cuda.synchronize(q.device)  # the assert surfaces here (CUDA errors are asynchronous)
        return q
