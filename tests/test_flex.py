"""FlexAttention implementations (attention_impls/flex*.py): their block tables against the masks they stand for,
the conformance suite and float64 agreement with ``local`` and ``sparse`` on PyTorch's uncompiled FlexAttention,
the compiled kernel against them in float32, and the cases they refuse."""

from __future__ import annotations

import conformance_shapes
import pytest
import torch

import conformance
from attention_impls import UnsupportedCase, get
from attention_impls.flex import kept_block_pairs
from attention_impls.flex_local import band_blocks
from attention_impls.flex_sparse import FlexSparseConfig, layout_blocks
from attention_impls.sparse import block_mask as sparse_block_mask
from reference import rel_error

EAGER = {"flex_local": {"window": 40, "block_size": 32}, "flex_sparse": {"block_size": 32}}
TWINS = {"flex_local": "local", "flex_sparse": "sparse"}


def _eager(name: str):
    return get(name, {**EAGER[name], "kernel": "eager"})


def _tables_from(mask: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether any / every pair of each block pair is kept, from a (q_len, kv_len) bool mask."""
    q_len, kv_len = mask.shape
    q_blocks, kv_blocks = -(-q_len // block), -(-kv_len // block)
    any_kept = torch.zeros(q_blocks, kv_blocks, dtype=torch.bool)
    all_kept = torch.zeros_like(any_kept)
    for i in range(q_blocks):
        for j in range(kv_blocks):
            tile = mask[i * block : (i + 1) * block, j * block : (j + 1) * block]
            any_kept[i, j], all_kept[i, j] = tile.any(), tile.all()
    return any_kept, all_kept


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    ("q_len", "kv_len", "window", "block"), [(100, 100, 10, 16), (37, 100, 5, 8), (64, 64, 0, 16), (50, 130, 40, 32)]
)
def test_band_tables_are_the_bands(q_len: int, kv_len: int, window: int, block: int, causal: bool) -> None:
    position = torch.arange(q_len).unsqueeze(1) + (kv_len - q_len)  # (q_len, 1): the last query on the last key
    distance = position - torch.arange(kv_len)  # (q_len, kv_len)
    mask = (distance.abs() <= window) & ((distance >= 0) if causal else True)
    tables = band_blocks(q_len=q_len, kv_len=kv_len, window=window, block=block, causal=causal)
    for table, expected in zip(tables, _tables_from(mask, block), strict=True):
        assert torch.equal(table, expected)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("layout", "seq_len"), [("bigbird", 300), ("fixed", 500), ("strided", 130)])
def test_layout_tables_are_the_layouts(layout: str, seq_len: int, causal: bool) -> None:
    config = FlexSparseConfig(layout=layout, block_size=16)
    blocks = sparse_block_mask(config.sparse_config(), seq_len=seq_len, causal=causal)  # (n_blocks, n_blocks)
    mask = blocks.repeat_interleave(16, 0).repeat_interleave(16, 1)[:seq_len, :seq_len]  # (seq_len, seq_len)
    if causal:
        mask &= torch.ones_like(mask).tril()
    tables = layout_blocks(config, seq_len=seq_len, causal=causal)
    for table, expected in zip(tables, _tables_from(mask, 16), strict=True):
        assert torch.equal(table, expected)


@pytest.mark.parametrize("name", sorted(EAGER))
def test_conformance_on_the_uncompiled_kernel(name: str) -> None:
    """The conformance suite's float64 checks (FlexAttention has no CPU backward: gradients are not checked)."""
    spec = _eager(name)
    for causal in (False, True):
        conformance.check_shape_dtype_device(spec, causal=causal)
        for seq_len in (1, 3, 127, 1000):
            conformance.check_against_reference(spec, seq_len=seq_len, causal=causal)
        conformance_shapes.check_grouped_heads(spec, causal=causal)
        conformance_shapes.check_cross_lengths(spec, causal=causal)
    for seq_len in (3, 127, 300):
        conformance.check_causal(spec, seq_len=seq_len)
    conformance.check_finite_large_inputs(spec)
    conformance.check_deterministic(spec, seq_len=257)
    conformance.check_metadata(spec)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", sorted(EAGER))
def test_same_attention_as_its_twin_in_float64(name: str, causal: bool) -> None:
    """The uncompiled kernel applies the mask_mod to every score: exactly local's band, sparse's layout."""
    for q_len, seq_len, heads, kv_heads in ((1000, 1000, 4, 2), (127, 127, 2, 2), (37, 300, 2, 1)):
        if name == "flex_sparse" and q_len != seq_len:
            continue  # sparse has no cross lengths
        gen = torch.Generator().manual_seed(seq_len)
        q = torch.randn(2, heads, q_len, 16, generator=gen, dtype=torch.float64)
        k, v = (torch.randn(2, kv_heads, seq_len, 16, generator=gen, dtype=torch.float64) for _ in range(2))
        shape = {"seq_len": seq_len, "heads": heads, "head_dim": 16, "q_len": q_len, "kv_heads": kv_heads}
        ours = _eager(name).build(**shape, dtype=torch.float64)(q, k, v, causal=causal)
        twin = get(TWINS[name], EAGER[name])
        if not twin.supports_grouped_heads:  # sparse: its heads read the key/value head repeated
            k, v = (x.repeat_interleave(heads // kv_heads, dim=1) for x in (k, v))
            shape["kv_heads"] = heads
        twin = twin.build(**shape, dtype=torch.float64)(q, k, v, causal=causal)
        assert rel_error(ours, twin) <= 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", sorted(EAGER))
def test_compiled_kernel_agrees_with_its_twin_in_float32(name: str, causal: bool) -> None:
    """The compiled kernel visits only the block tables' blocks and skips the mask in full ones: the same
    attention, to float32 rounding (grouped heads, a length no block divides)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 1000, 64, generator=gen)
    k, v = (torch.randn(1, 2, 1000, 64, generator=gen) for _ in range(2))
    shape = {"seq_len": 1000, "heads": 4, "head_dim": 64, "kv_heads": 2}
    ours = get(name).build(**shape)(q, k, v, causal=causal)
    twin = get(TWINS[name])
    if not twin.supports_grouped_heads:  # sparse: its heads read the key/value head repeated
        k, v = (x.repeat_interleave(2, dim=1) for x in (k, v))
        shape["kv_heads"] = 4
    twin = twin.build(**shape)(q, k, v, causal=causal)
    assert rel_error(ours, twin) <= 1e-5


@pytest.mark.parametrize("name", sorted(EAGER))
def test_refusals_are_one_line(name: str) -> None:
    spec = get(name)
    reason = spec.unsupported_reason(seq_len=64, head_dim=16, causal=False, dtype=torch.float64)
    assert reason == "compiled FlexAttention on the CPU takes float32, float16 and bfloat16, not float64"
    assert spec.unsupported_reason(seq_len=64, head_dim=16, causal=False, dtype=torch.float32) is None
    module = spec.build(seq_len=64, heads=2, head_dim=16)
    q, k, v = (torch.randn(1, 2, 64, 16, requires_grad=True) for _ in range(3))
    with pytest.raises(UnsupportedCase, match=r"^FlexAttention has no backward on the CPU \(torch "):
        module(q, k, v)


@pytest.mark.parametrize("causal", [False, True])
def test_flops_count_the_kept_blocks_only(causal: bool) -> None:
    """flex_local at 4096 tokens: 4 b h d times the pairs of the band's blocks, a small part of full's."""
    spec = get("flex_local")
    window, block = spec.params()["window"], spec.params()["block_size"]
    any_kept, _ = band_blocks(q_len=4096, kv_len=4096, window=window, block=block, causal=causal)
    pairs = kept_block_pairs(any_kept, q_len=4096, kv_len=4096, block=block)
    assert pairs == int(any_kept.sum()) * block * block  # 4096 is a whole number of blocks
    flops = spec.flops(batch=1, heads=8, seq_len=4096, head_dim=64, causal=causal)
    assert flops == 4.0 * 8 * pairs * 64
    assert flops < 0.2 * get("full").flops(batch=1, heads=8, seq_len=4096, head_dim=64, causal=causal)
