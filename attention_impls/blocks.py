"""Softmax attention over batches of blocks: the one kernel the blockwise mechanisms (local, sparse) share.

Both cut the sequence into query blocks, give each block its keys (a window, or gathered key blocks) and
attend all blocks of a chunk in one batched call, through one of ``KERNELS``. It also holds the per-device
facts the chunked mechanisms (local, sparse, linear) and their memory estimates share: the device type of a
tensor or a case (``device_type``), how large a chunk is on it (``chunk_elements``, ``device_value``) and
whether PyTorch's ``scaled_dot_product_attention`` runs a fused kernel there (``sdpa_is_fused``). This
module registers nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attention_impls.base import masked_softmax

__all__ = [
    "ACCELERATOR_CHUNK_ELEMENTS",
    "CHUNK_ELEMENTS",
    "KERNELS",
    "attend",
    "chunk_elements",
    "device_type",
    "device_value",
    "sdpa_is_fused",
    "unfold",
]

# "sdpa": PyTorch's fused scaled_dot_product_attention (tiled, no score matrix stored);
# "matmul": the scores written out and the masked softmax applied explicitly (the plain reference path)
KERNELS = ("sdpa", "matmul")
# Elements of one batched call's keys (or values, or output) per chunk of blocks, on the CPU (and on any
# device type without an entry below). Chunks keep each call's working set in cache and in reused heap memory
# (a fresh allocation of tens to hundreds of MB costs more in page faults than the work itself), and are still
# large enough to batch well: 4 MiB per tensor in float32 (measured: 2^19..2^20 best on CPU).
CHUNK_ELEMENTS = 1 << 20
# The same on accelerators, where the CPU's value makes the work launch-bound: each chunk is a handful of
# kernel launches (gathers, the attention call, a copy into the output) of a few microseconds each whatever its
# size, and at the CPU's value sparse attention at 16K tokens (8 heads of 64) runs 64 chunks per forward.
# 2^26 elements (256 MiB per tensor in float32) hold in one chunk local's queries of 8 heads of 64 at 128K
# positions, or sparse's gathered keys (8 key blocks per query block) at 16K: few launches. A chunk's
# temporaries stay a bounded fraction of a GPU's memory: a few tensors of this size, plus, on the math path,
# scores span / head_dim times one (about 1.25 GiB in float32 at local's defaults); sparse's memory estimate
# counts them with this same value (local's bounds every chunk size). MPS shares the machine's memory (8 GB and
# up): a value four times smaller.
ACCELERATOR_CHUNK_ELEMENTS = {"cuda": 1 << 26, "mps": 1 << 24}


def device_type(device: str | torch.device) -> str:
    """The device type: ``"cpu"``, ``"cuda"``, ``"mps"`` ... of ``"cuda:1"``, ``torch.device("mps")`` and the like."""
    return torch.device(device).type


def device_value(cpu_value: int, accelerators: dict[str, int], device: str | torch.device) -> int:
    """A size tuned per device type: ``accelerators[type]``, or ``cpu_value`` for the CPU and unlisted types.

    The CPU's value is passed in (read at call time from its module constant), not copied into the table, so
    it has one home and a test may shrink it.
    """
    return accelerators.get(device_type(device), cpu_value)


def chunk_elements(device: str | torch.device) -> int:
    """Elements of keys (or values, or output) per chunk of blocks on ``device`` (its type decides)."""
    return device_value(CHUNK_ELEMENTS, ACCELERATOR_CHUNK_ELEMENTS, device)


def sdpa_is_fused(device: str | torch.device, dtype: str | None, *, itemsize: int) -> bool:
    """Whether ``F.scaled_dot_product_attention`` runs a fused kernel (no n x n scores) on this device and dtype.

    CPU: a fused flash kernel for float32, float64, bfloat16 and float16. CUDA: flash or memory-efficient
    kernels for float16, bfloat16 and float32, but none for float64, which falls back to the math path
    (scores, softmax and product written out). MPS: the scores are written out for every dtype. ``dtype`` is
    the dtype's name (``"float64"``); None judges by ``itemsize`` (8 bytes: float64).
    """
    kind = device_type(device)
    if kind == "mps":
        return False
    if kind == "cuda":
        return (dtype or ("float64" if itemsize == 8 else "")) != "float64"
    return True


class _Unfold(torch.autograd.Function):
    """``x.unfold(dim, size, step)`` (a view) whose backward adds the windows' gradients back into ``x``'s
    positions in ceil(size / step) strided adds, each as large as the gradient's share of one step of every
    window (aten's ``unfold_backward`` took 15% of ``local``'s training step at 16K tokens)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, size: int, step: int) -> torch.Tensor:
        ctx.shape, ctx.dim, ctx.size, ctx.step = x.shape, dim, size, step
        return x.unfold(dim, size, step)  # (..., n_windows at dim, ..., size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dim, size, step = ctx.dim, ctx.size, ctx.step
        n_windows, pieces = grad.shape[dim], math.ceil(size / step)
        padded = list(ctx.shape)
        padded[dim] = max(padded[dim], (n_windows + pieces - 1) * step)  # every piece's span fits
        total = grad.new_zeros(padded)  # x's layout, a little longer along dim
        for piece in range(pieces):
            width = min(step, size - piece * step)
            # positions window * step + piece * step + [0, width) of every window
            target = total.narrow(dim, piece * step, n_windows * step).unflatten(dim, (n_windows, step))
            target = target.narrow(dim + 1, 0, width)  # (..., n_windows, width, ...)
            target.add_(grad.narrow(-1, piece * step, width).movedim(-1, dim + 1))
        return total.narrow(dim, 0, ctx.shape[dim]), None, None, None


def unfold(x: torch.Tensor, dim: int, size: int, step: int) -> torch.Tensor:
    """``x.unfold(dim, size, step)``: windows of ``size`` along ``dim`` every ``step`` positions (a view), with
    a backward that costs the windows' size (see ``_Unfold``). ``dim`` must be non-negative."""
    if x.requires_grad and torch.is_grad_enabled():
        return _Unfold.apply(x, dim, size, step)
    return x.unfold(dim, size, step)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None, *, kernel: str):
    """Softmax attention of each block; ``keep`` (True: attended) broadcastable to the scores, or None.

    q (..., m, d), k and v (..., s, d), keep (..., m, s) after broadcasting; returns (..., m, d).
    """
    if kernel == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (..., m, d)
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (..., m, s)
    return torch.matmul(masked_softmax(scores, keep), v)  # (..., m, d)
