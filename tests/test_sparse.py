"""Block-sparse attention equals exact attention under the dense mask equivalent to its block layout."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attention_impls.sparse as sparse
from attention_impls import blocks as blocks_module
from attention_impls import get
from attention_impls.sparse import SparseAttention, SparseConfig, block_layout, block_mask
from conformance import make_qkv
from reference import masked_reference, reference_attention, rel_error

TOL = 1e-10
LENGTHS = (1, 3, 127, 200, 1000)
LAYOUTS = ("bigbird", "fixed", "strided")


def token_mask(config: SparseConfig, seq_len: int, *, causal: bool) -> torch.Tensor:
    """The (seq_len, seq_len) bool mask equivalent to the layout: every pair inside a kept block (causal: j <= i)."""
    blocks = block_mask(config, seq_len=seq_len, causal=causal)
    size = config.block_size
    allowed = blocks.repeat_interleave(size, dim=0).repeat_interleave(size, dim=1)[:seq_len, :seq_len]
    if causal:
        allowed = allowed & torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    return allowed


def run(config: SparseConfig, q, k, v, *, causal: bool) -> torch.Tensor:
    module = SparseAttention(config, seq_len=q.shape[2], heads=q.shape[1], head_dim=q.shape[3])
    return module(q, k, v, causal=causal)


@pytest.fixture
def small_chunks(monkeypatch):
    """Force many chunks of query blocks, so chunking and per-chunk trimming are exercised."""
    monkeypatch.setattr(blocks_module, "CHUNK_ELEMENTS", 1)


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_len", LENGTHS)
def test_every_block_kept_equals_full_attention(seq_len, causal, kernel):
    q, k, v = make_qkv(seq_len)
    for config in (
        SparseConfig(layout="dense", block_size=16, kernel=kernel),
        SparseConfig(layout="bigbird", block_size=64, window_blocks=1000, kernel=kernel),
    ):
        out = run(config, q, k, v, causal=causal)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert rel_error(out, reference_attention(q, k, v, causal=causal)) <= TOL, config


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_len", LENGTHS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_equal_attention_under_their_dense_mask(layout, seq_len, causal, kernel):
    q, k, v = make_qkv(seq_len)
    for block_size in (16, 64):
        config = SparseConfig(layout=layout, block_size=block_size, kernel=kernel)
        out = run(config, q, k, v, causal=causal)
        exact = masked_reference(q, k, v, token_mask(config, seq_len, causal=causal))
        assert rel_error(out, exact) <= TOL, f"block_size={block_size}"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "config",
    [
        SparseConfig(block_size=8, window_blocks=2, global_blocks=3, random_blocks=4, seed=5),
        SparseConfig(block_size=8, window_blocks=0, global_blocks=0, random_blocks=1),
        SparseConfig(layout="fixed", block_size=8, stride=5, summary_blocks=2),
        SparseConfig(layout="strided", block_size=8, stride=3),
        SparseConfig(layout="strided", block_size=1, stride=1),
    ],
)
def test_other_settings_and_many_chunks(config, causal, small_chunks):
    for seq_len in (9, 333):
        q, k, v = make_qkv(seq_len, seed=seq_len)
        out = run(config, q, k, v, causal=causal)
        exact = masked_reference(q, k, v, token_mask(config, seq_len, causal=causal))
        assert rel_error(out, exact) <= TOL, f"seq_len={seq_len}"


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradients_match_the_masked_reference(layout, causal, kernel, small_chunks):
    seq_len = 203
    config = SparseConfig(layout=layout, block_size=16, kernel=kernel)
    q, k, v = make_qkv(seq_len, requires_grad=True)
    weights = torch.linspace(-1, 1, q.numel(), dtype=q.dtype).view_as(q)
    out = run(config, q, k, v, causal=causal)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    exact = masked_reference(q, k, v, token_mask(config, seq_len, causal=causal))
    exact_grads = torch.autograd.grad((exact * weights).sum(), (q, k, v))
    for name, grad, exact_grad in zip("qkv", grads, exact_grads, strict=True):
        assert torch.isfinite(grad).all(), f"non-finite gradient for {name}"
        assert rel_error(grad, exact_grad) <= 1e-9, f"gradient for {name}"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_large_inputs_and_gradients_finite(layout, causal):
    q, k, v = make_qkv(200, dtype=torch.float32, scale=1e3, requires_grad=True)
    out = run(SparseConfig(layout=layout, block_size=16), q, k, v, causal=causal)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.sum().backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_causal_ignores_the_future(layout):
    seq_len = 150
    config = SparseConfig(layout=layout, block_size=8)
    q, k, v = make_qkv(seq_len)
    base = run(config, q, k, v, causal=True)
    for t in (0, 40, 97, seq_len - 2):
        changed = [x.clone() for x in (q, k, v)]
        for x in changed:
            x[:, :, t + 1 :] = torch.randn_like(x[:, :, t + 1 :]) * 3
        out = run(config, *changed, causal=True)
        assert torch.equal(out[:, :, : t + 1], base[:, :, : t + 1]), f"t={t}"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", [*LAYOUTS, "dense"])
def test_layout_structure(layout, causal):
    config = SparseConfig(layout=layout, block_size=4)
    built = block_layout(config, seq_len=4 * 97, causal=causal)
    rows = torch.arange(built.dense_rows, built.n_blocks).unsqueeze(1)
    for row, index, valid in zip(rows.squeeze(1).tolist(), built.index, built.valid, strict=True):
        kept = index[valid].tolist()
        assert len(kept) == len(set(kept)), f"duplicate key blocks in row {row}"
        assert row in kept, f"row {row} does not keep its own block"
        assert all(0 <= j < built.n_blocks for j in kept)
        if causal:
            assert all(j <= row for j in kept), f"row {row} keeps a future block"
    assert built.index.dtype == torch.long and built.valid.dtype == torch.bool


def test_bigbird_pattern():
    config = SparseConfig(block_size=1, window_blocks=1, global_blocks=2, random_blocks=3, seed=1)
    n = 40
    mask = block_mask(config, seq_len=n, causal=False)
    assert mask[:2].all() and mask[:, :2].all(), "global blocks attend to and are attended by everything"
    for i in range(2, n):
        window = {j for j in (i - 1, i, i + 1) if 0 <= j < n}
        kept = set(torch.nonzero(mask[i]).flatten().tolist())
        assert window | {0, 1} <= kept
        assert len(kept - window - {0, 1}) == 3, f"row {i}: three random blocks"
    causal = block_mask(config, seq_len=n, causal=True)
    assert not causal.triu(1).any()
    for i in range(8, n):  # enough candidates before the window: three random blocks there
        assert int(causal[i].sum()) == 2 + 2 + 3
    # the layout is fixed by the seed, not by torch's global RNG
    torch.manual_seed(123)
    sparse._cached_layout.cache_clear()
    assert torch.equal(mask, block_mask(dataclasses.replace(config), seq_len=n, causal=False))
    assert not torch.equal(mask, block_mask(dataclasses.replace(config, seed=2), seq_len=n, causal=False))


def test_fixed_and_strided_patterns():
    fixed = block_mask(SparseConfig(layout="fixed", block_size=1, stride=4, summary_blocks=1), seq_len=12, causal=True)
    for i in range(12):
        expected = {j for j in range(i + 1) if j // 4 == i // 4 or j % 4 == 3}
        assert set(torch.nonzero(fixed[i]).flatten().tolist()) == expected, f"fixed row {i}"
    strided = block_mask(SparseConfig(layout="strided", block_size=1, stride=3), seq_len=12, causal=False)
    for i in range(12):
        expected = {j for j in range(12) if abs(i - j) < 3 or (i - j) % 3 == 0}
        assert set(torch.nonzero(strided[i]).flatten().tolist()) == expected, f"strided row {i}"
    # default stride round(sqrt(n_blocks)) = 10: the widest row (99) keeps 90..99 and 89, 79, ..., 9
    assert block_layout(SparseConfig(layout="strided", block_size=1), seq_len=100, causal=True).index.shape[1] == 10 + 9


def test_deterministic_and_plan_cached():
    q, k, v = make_qkv(300, dtype=torch.float32)
    module = SparseAttention(SparseConfig(), seq_len=300, heads=2, head_dim=16)
    first = module(q, k, v)
    assert torch.equal(first, module(q, k, v))
    assert len(module._plans) == 1


def test_registry_metadata_flops_and_memory():
    spec = get("sparse")
    assert spec.family == "sparse" and not spec.exact and spec.supports_causal
    assert spec.paper.startswith("https://arxiv.org/")
    assert spec.params()["layout"] == "bigbird"
    # every block kept: the same work as full attention
    dense = spec.with_params(layout="dense")
    assert dense.flops(batch=1, heads=2, seq_len=1024, head_dim=16) == get("full").flops(
        batch=1, heads=2, seq_len=1024, head_dim=16
    )
    # bigbird, non-causal: 2 dense global rows of 64 + 62 blocks of 64 queries against 8 blocks of 64 keys
    n = 4096
    expected = 4.0 * 8 * (2 * 64 * n + 62 * 64 * 8 * 64) * 64
    assert spec.flops(batch=1, heads=8, seq_len=n, head_dim=64) == expected
    # linear in n (no n^2 term)
    flops_n = spec.flops(batch=1, heads=8, seq_len=n, head_dim=64)
    ratio = spec.flops(batch=1, heads=8, seq_len=8 * n, head_dim=64) / flops_n
    assert 7.5 < ratio < 8.5
    small = spec.memory_bytes(batch=1, heads=8, seq_len=n, head_dim=64, itemsize=4)
    large = spec.memory_bytes(batch=1, heads=8, seq_len=8 * n, head_dim=64, itemsize=4)
    assert small > 0 and large < 8.5 * small


def test_bad_config_is_rejected_clearly():
    reason = SparseAttention.unsupported_reason(
        SparseConfig(layout="butterfly"), seq_len=8, head_dim=16, causal=False, device="cpu", dtype=torch.float32
    )
    assert "layout" in reason
    with pytest.raises(ValueError, match="block_size"):
        SparseAttention(SparseConfig(block_size=0), seq_len=8, heads=1, head_dim=4)


@pytest.mark.parametrize("seq_len", [128, 130])
@pytest.mark.parametrize("causal", [False, True])
def test_non_contiguous_inputs(causal, seq_len):
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in make_qkv(seq_len))  # (b, h, n, d) views
    assert not q.is_contiguous()
    config = SparseConfig(block_size=8)
    out = run(config, q, k, v, causal=causal)
    assert rel_error(out, masked_reference(q, k, v, token_mask(config, seq_len, causal=causal))) <= TOL
