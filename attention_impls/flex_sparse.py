"""Block-sparse attention as a FlexAttention block mask: ``sparse``'s layouts in PyTorch's fused kernel.

Papers: Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences", https://arxiv.org/abs/2007.14062
(the default ``bigbird`` layout); Child et al. 2019, "Generating Long Sequences with Sparse Transformers",
https://arxiv.org/abs/1904.10509 (``fixed``, ``strided``); FlexAttention: Dong et al. 2024,
https://arxiv.org/abs/2412.05496

The layout is ``sparse``'s, from the same hyperparameters (``attention_impls.sparse.block_mask``): query
block ``i`` sees key block ``j`` where the layout says so, and every key of it (only ``key <= query`` inside
the diagonal block when causal). The FlexAttention block mask uses ``sparse``'s blocks as its own: the
layout's blocks are full, the causal diagonal ones partial, where the compiled kernel's ``mask_mod`` keeps
``key <= query``; PyTorch's uncompiled path applies ``mask_mod`` to every score, so there it reads the layout
too. Time O(n K b d) for K key blocks of b positions per
query block, memory O(n d) plus the layout's O((n / b)^2) block tables.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from attention_impls import flex
from attention_impls.base import check_qkv, choice_error
from attention_impls.registry import register
from attention_impls.sparse import SparseAttention, SparseConfig
from attention_impls.sparse import block_mask as layout_mask

__all__ = ["FlexSparseAttention", "FlexSparseConfig", "layout_blocks"]


@dataclasses.dataclass(frozen=True)
class FlexSparseConfig(SparseConfig):
    """Hyperparameters of block-sparse FlexAttention: ``sparse``'s layout (``SparseConfig``, its defaults), and
    the kernel."""

    kernel: str = "compiled"  # "compiled": torch.compile(flex_attention); "eager": PyTorch's reference path

    def sparse_config(self) -> SparseConfig:
        """The same layout as a ``sparse`` config."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(SparseConfig) if f.name != "kernel"}
        return SparseConfig(**fields)


def layout_blocks(config: FlexSparseConfig, *, seq_len: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, blocks) bool tables: the layout's kept blocks, and those kept whole (all but the causal
    diagonal)."""
    kept = layout_mask(config.sparse_config(), seq_len=seq_len, causal=causal)  # (n_blocks, n_blocks)
    whole = kept & ~torch.eye(kept.shape[0], dtype=torch.bool) if causal else kept
    return kept, whole


@register("flex_sparse")
class FlexSparseAttention(flex.FlexModule):
    """Block-sparse attention (sparse's layouts) as a FlexAttention block mask (approximate, O(n K b d))."""

    Config = FlexSparseConfig
    family = "sparse"
    paper = "https://arxiv.org/abs/2007.14062"
    time_complexity = "O(n K b d)"
    memory_complexity = "O(n d)"
    exact = False
    supports_causal = True
    supports_grouped_heads = True  # enable_gqa: key/value heads read by their group, never repeated
    config: FlexSparseConfig

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
        check_qkv(q, k, v, grouped=True)
        seq_len, block = q.shape[2], self.config.block_size

        def build():
            kept, whole = layout_blocks(self.config, seq_len=seq_len, causal=causal)
            if self.config.kernel == "compiled":
                # evaluated on the partial blocks only, the causal diagonal ones: the causal order is all it needs
                # (a mask_mod that reads the layout, a captured tensor, fails this torch's CPU compiler)
                def mask_mod(b, h, q_idx, kv_idx):
                    return kv_idx <= q_idx
            else:
                layout = kept.to(q.device)  # (n_blocks, n_blocks): the uncompiled path masks every score with it

                def mask_mod(b, h, q_idx, kv_idx):
                    keep = layout[q_idx // block, kv_idx // block]
                    return keep & (kv_idx <= q_idx) if causal else keep

            return flex.block_mask(kept, whole, mask_mod, q_len=seq_len, kv_len=seq_len, block=block, device=q.device)

        return self._attend(q, k, v, (seq_len, causal, q.device), build)  # (batch, heads, seq_len, head_dim)

    @classmethod
    def config_error(cls, config):
        return choice_error(config, "kernel", flex.KERNELS) or SparseAttention.config_error(config.sparse_config())

    @classmethod
    def flops(cls, config, *, batch, heads, seq_len, head_dim, causal):
        # Q K^T and P V over the pairs of the kept blocks (the causal diagonal blocks computed whole)
        kept, _ = layout_blocks(config, seq_len=seq_len, causal=causal)
        pairs = flex.kept_block_pairs(kept, q_len=seq_len, kv_len=seq_len, block=config.block_size)
        return 4.0 * batch * heads * pairs * head_dim

    @classmethod
    def memory_bytes(cls, config, *, batch, heads, seq_len, head_dim, itemsize, causal):
        n_blocks = math.ceil(seq_len / config.block_size)
        # the output; the layout (bool) and the block mask's four index tables (and their transposes), int32
        return float(batch * heads * seq_len * head_dim * itemsize + n_blocks * n_blocks * (1 + 8 * 4))
