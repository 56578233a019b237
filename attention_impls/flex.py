"""FlexAttention plumbing shared by ``flex_local`` and ``flex_sparse``; registers nothing.

PyTorch's FlexAttention (``torch.nn.attention.flex_attention``, https://pytorch.org/blog/flexattention/)
takes a mask as a function of positions (``mask_mod``) and a ``BlockMask``: for each block of queries, the key
blocks it visits, split into *partial* blocks (the kernel evaluates ``mask_mod`` on each pair) and *full*
blocks (every pair kept, no mask evaluated). Blocks in neither list are skipped, so the work is that of the
kept blocks. Compiled (``torch.compile``), it is one fused kernel (Triton on CUDA, C++ on the CPU); called
without compilation it runs PyTorch's reference path, which writes out every score and applies ``mask_mod`` to
each: O(n^2) time and memory whatever the mask, so it serves checks only (``kernel="eager"``).

The block mask is built here from block-level truth tables (for each query block and key block: does any
pair survive the mask, do all), so building it costs O(blocks^2) and never evaluates the mask per pair
(``create_block_mask`` does, O(n^2), or compiles a kernel for it). It is cached in the module per shape, as a
model builds it once per batch shape for all its layers. On the CPU, this torch's compiled FlexAttention takes
float32, float16 and bfloat16 and has no backward; those cases are refused with the reason.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch

from attention_impls.base import AttentionModule, UnsupportedCase, needs_grad

__all__ = [
    "KERNELS",
    "FlexModule",
    "attend",
    "backward_unsupported_reason",
    "block_mask",
    "flex_unsupported_reason",
    "kept_block_pairs",
]

# "compiled": torch.compile(flex_attention), the fused kernel; "eager": PyTorch's uncompiled reference path
KERNELS = ("compiled", "eager")
_CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _flex_module():
    try:
        from torch.nn.attention import flex_attention
    except ImportError:  # torch < 2.5
        return None
    return flex_attention


def flex_unsupported_reason(*, kernel: str, device: str, dtype: torch.dtype) -> str | None:
    """Why FlexAttention can not run a case on ``device`` in ``dtype`` with ``kernel``; None when it can."""
    if _flex_module() is None:
        return f"torch {torch.__version__} has no FlexAttention (torch.nn.attention.flex_attention, torch >= 2.5)"
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        return f"FlexAttention runs on the CPU and CUDA, not on {kind}"
    if kernel == "compiled" and kind == "cpu" and dtype not in _CPU_DTYPES:
        return f"compiled FlexAttention on the CPU takes float32, float16 and bfloat16, not {str(dtype)[6:]}"
    return None


def backward_unsupported_reason(device: torch.device) -> str | None:
    """Why FlexAttention can not take gradients on ``device``; None when it can."""
    if device.type == "cpu":
        return f"FlexAttention has no backward on the CPU (torch {torch.__version__})"
    return None


@functools.cache
def _compiled() -> Callable[..., torch.Tensor]:
    return torch.compile(_flex_module().flex_attention)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, *, kernel: str) -> torch.Tensor:
    """flex_attention over ``mask`` (a BlockMask); q (batch, heads, q_len, d), k and v (batch, kv_heads, kv_len,
    d), grouped heads read their key/value head (``enable_gqa``)."""
    grouped = q.shape[1] != k.shape[1]
    if kernel == "compiled":
        return _compiled()(q, k, v, block_mask=mask, enable_gqa=grouped)
    with warnings.catch_warnings():  # "flex_attention called without torch.compile": meant, for checks
        warnings.simplefilter("ignore", UserWarning)
        return _flex_module().flex_attention(q, k, v, block_mask=mask, enable_gqa=grouped)


def block_mask(
    any_kept: torch.Tensor,
    all_kept: torch.Tensor,
    mask_mod: Callable,
    *,
    q_len: int,
    kv_len: int,
    block: int,
    device: torch.device,
):
    """A BlockMask from block-level truth tables, (q_blocks, kv_blocks) bool each: ``any_kept`` where some pair
    of the two blocks survives ``mask_mod``, ``all_kept`` where every pair does (full blocks: no mask
    evaluated). Shared by every batch and head."""
    partial = any_kept & ~all_kept  # (q_blocks, kv_blocks)

    def lists(kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = kept.sum(dim=-1, dtype=torch.int32)  # (q_blocks,)
        # each row's kept blocks first, in order (a stable sort of the flags, descending)
        indices = torch.argsort(kept.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return counts[None, None].to(device), indices[None, None].to(device)  # (1, 1, q_blocks[, kv_blocks])

    (counts, indices), (full_counts, full_indices) = lists(partial), lists(all_kept)
    return _flex_module().BlockMask.from_kv_blocks(
        counts, indices, full_counts, full_indices, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(q_len, kv_len)
    )


def kept_block_pairs(any_kept: torch.Tensor, *, q_len: int, kv_len: int, block: int) -> int:
    """Query-key pairs inside the kept blocks (the last blocks cut at the lengths): what the kernel computes."""
    q_sizes = (q_len - torch.arange(any_kept.shape[0]) * block).clamp(max=block)  # (q_blocks,)
    kv_sizes = (kv_len - torch.arange(any_kept.shape[1]) * block).clamp(max=block)  # (kv_blocks,)
    return int((any_kept * q_sizes[:, None] * kv_sizes[None, :]).sum())


class FlexModule(AttentionModule):
    """What the FlexAttention implementations share: the refusals, and a cache of block masks per shape.

    A subclass's config has a ``kernel`` field (one of ``KERNELS``); its forward calls ``_attend`` with a key
    naming the shape and a function that builds the block mask for it."""

    def __init__(self, config, **shape) -> None:
        super().__init__(config, **shape)
        self._masks: dict[tuple, object] = {}  # (shape..., device) -> BlockMask

    def _attend(self, q, k, v, key: tuple, build: Callable[[], object]) -> torch.Tensor:
        reason = flex_unsupported_reason(kernel=self.config.kernel, device=str(q.device), dtype=q.dtype)
        if reason is None and needs_grad(q, k, v):
            reason = backward_unsupported_reason(q.device)
        if reason is not None:
            raise UnsupportedCase(reason)
        if key not in self._masks:
            self._masks[key] = build()
        return attend(q, k, v, self._masks[key], kernel=self.config.kernel)

    @classmethod
    def unsupported_reason(cls, config, *, seq_len, head_dim, causal, device, dtype):
        return super().unsupported_reason(
            config, seq_len=seq_len, head_dim=head_dim, causal=causal, device=device, dtype=dtype
        ) or flex_unsupported_reason(kernel=config.kernel, device=device, dtype=dtype)
