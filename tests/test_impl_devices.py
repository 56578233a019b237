"""Per-device behaviour of the implementations: chunk sizes, half-precision sums and memory estimates.

Everything here runs on the CPU: the device a forward reads is its input's, and the device an estimate reads is
the ``device`` keyword, so the CUDA and MPS answers are checked without either. One test needs CUDA and skips
without it.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import ClassVar

import pytest
import torch

import attention_impls.linear as linear_module
from attention_impls import blocks, get
from attention_impls.base import AttentionModule, EmptyConfig
from attention_impls.linear import LinearAttention, LinearConfig, linear_attention
from attention_impls.local import LocalAttention, LocalConfig
from attention_impls.registry import ImplSpec
from attention_impls.sparse import SparseAttention, SparseConfig, _chunks, block_layout
from bench.cases import Case
from bench.measure.plan import estimate_bytes

SHAPE = {"batch": 1, "heads": 8, "head_dim": 64}  # the default case shape


# --- 1. chunk sizes per device type -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ("cpu", 1 << 20),
        (torch.device("cpu"), 1 << 20),
        ("cuda", 1 << 26),
        ("cuda:1", 1 << 26),
        (torch.device("cuda", 0), 1 << 26),
        ("mps", 1 << 24),
        ("meta", 1 << 20),  # a device type without an entry: the CPU's value
    ],
)
def test_chunk_elements_per_device_type(device, expected):
    assert blocks.chunk_elements(device) == expected
    assert blocks.CHUNK_ELEMENTS == 1 << 20  # the CPU's value is unchanged (CPU timings stay comparable)


def test_linear_block_sizes_per_device_type():
    shape = (1, 8, 1 << 20, 64)
    positions = {
        (device, causal): linear_module.block_positions(shape, chunk=64, causal=causal, device=device)
        for device in ("cpu", "cuda:0", "mps")
        for causal in (False, True)
    }
    # the CPU: 1024 positions (512 causal) at b=1, h=8, d=64
    assert positions["cpu", False] == 1024 and positions["cpu", True] == 512
    assert positions["cuda:0", False] == 1 << 17 and positions["cuda:0", True] == 1 << 16
    assert positions["mps", False] == 1 << 15 and positions["mps", True] == 1 << 14


def test_sparse_at_16k_tokens_is_one_chunk_on_cuda_64_on_cpu():
    config = SparseConfig()
    layout = block_layout(config, seq_len=16384, causal=False)
    cut = {
        device: _chunks(layout, rows=8, block=config.block_size, head_dim=64, device=device)
        for device in ("cpu", "cuda", "mps")
    }
    assert len(cut["cpu"]) == 64
    assert len(cut["cuda"]) == 1
    assert 1 < len(cut["mps"]) < 64


def _count_attend_calls(monkeypatch, module, q, k, v) -> tuple[int, torch.Tensor]:
    """How many batched attention calls (one per chunk, plus edges or dense rows) one forward makes; its output."""
    calls = []
    attend = blocks.attend

    def counting(*args, **kwargs):
        calls.append(1)
        return attend(*args, **kwargs)

    monkeypatch.setattr(blocks, "attend", counting)
    out = module(q, k, v)
    monkeypatch.setattr(blocks, "attend", attend)
    return len(calls), out


@pytest.mark.parametrize("impl", ["local", "sparse"])
def test_forward_reads_the_chunk_size_of_its_inputs_device(monkeypatch, impl):
    """The chunk size comes from the input tensor's device type, looked up at call time."""
    seq_len, heads, head_dim = 2048, 2, 16
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq_len, head_dim, generator=gen) for _ in range(3))
    module = get(impl).build(seq_len=seq_len, heads=heads, head_dim=head_dim)
    calls_cpu, out_cpu = _count_attend_calls(monkeypatch, module, q, k, v)
    # give the CPU device type a tiny chunk in the accelerators' table: a fresh module cuts many more chunks
    monkeypatch.setitem(blocks.ACCELERATOR_CHUNK_ELEMENTS, "cpu", 1)
    module = get(impl).build(seq_len=seq_len, heads=heads, head_dim=head_dim)
    calls_tiny, out_tiny = _count_attend_calls(monkeypatch, module, q, k, v)
    assert calls_tiny > calls_cpu
    torch.testing.assert_close(out_tiny, out_cpu, rtol=1e-5, atol=1e-6)


def test_linear_forward_reads_the_block_size_of_its_inputs_device(monkeypatch):
    calls = []
    elu = linear_module.FEATURE_MAPS["elu"]

    def counting(x):
        calls.append(x.shape[2])
        return elu(x)

    monkeypatch.setitem(linear_module.FEATURE_MAPS, "elu", counting)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4096, 16, generator=gen) for _ in range(3))
    expected = linear_attention(q, k, v)
    assert len(calls) == 2  # phi(K) and phi(Q), one block each (4096 positions fit the CPU's block)
    calls.clear()
    monkeypatch.setitem(linear_module._ACCELERATOR_BLOCK_ELEMENTS, "cpu", 2 * 16 * 512)
    out = linear_attention(q, k, v)
    assert calls == [512] * 16  # eight blocks of 512 positions for phi(K), eight for phi(Q)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["local", "sparse", "linear"])
def test_cuda_forward_uses_few_chunks_and_matches_the_cpu(monkeypatch, impl):
    seq_len, heads, head_dim = 16384, 8, 64
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq_len, head_dim, generator=gen) for _ in range(3))
    spec = get(impl)
    expected = spec.build(seq_len=seq_len, heads=heads, head_dim=head_dim)(q, k, v)
    module = spec.build(seq_len=seq_len, heads=heads, head_dim=head_dim, device="cuda")
    if impl != "linear":
        calls, out = _count_attend_calls(monkeypatch, module, q.cuda(), k.cuda(), v.cuda())
        assert calls <= 3  # the interior in one chunk (local: plus the two edge ranges)
    else:
        out = module(q.cuda(), k.cuda(), v.cuda())
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-3, atol=1e-4)


# --- 2. linear attention's sums in float32 for half-precision inputs -----------------------------------------


def _growing_inputs(seq_len: int, heads: int = 1, head_dim: int = 4):
    """All-positive keys and values (values drifting upwards along the sequence), so the sums grow with n."""
    gen = torch.Generator().manual_seed(0)
    shape = (1, heads, seq_len, head_dim)
    q = torch.randn(shape, generator=gen, dtype=torch.float64)
    k = torch.rand(shape, generator=gen, dtype=torch.float64)
    v = torch.rand(shape, generator=gen, dtype=torch.float64)
    v = v + torch.linspace(0, 4, seq_len, dtype=torch.float64).view(1, 1, seq_len, 1)
    return q, k, v


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_float16_sums_do_not_overflow_at_70k_tokens(causal):
    """70000 positions of z = sum phi(k_j) > 65504, float16's largest number: the sums must be float32."""
    q, k, v = _growing_inputs(70000)
    ref = linear_attention(q, k, v, causal=causal)  # float64
    half = [x.to(torch.float16) for x in (q, k, v)]
    out = LinearAttention(LinearConfig(), seq_len=70000, heads=1, head_dim=4)(*half, causal=causal)
    assert out.dtype == torch.float16
    assert torch.isfinite(out).all()
    assert _rel_error(out, ref) <= 2e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_half_precision_sums_keep_their_precision_across_blocks(monkeypatch, dtype, causal):
    """A sequence over many vectorized steps (on a GPU, or with more heads, a step holds fewer positions).

    A bfloat16 running sum stops growing once each step's contribution is below its 8-bit precision (relative
    error above 0.1 here); float16 overflows. The inputs alone in these dtypes give about 1e-5, the output's
    rounding about 2e-3 (bfloat16).
    """
    monkeypatch.setattr(linear_module, "_BLOCK_ELEMENTS", 4 * 256)  # 256 positions per step at h=1, d=4
    monkeypatch.setattr(linear_module, "_CAUSAL_BLOCK_ELEMENTS", 4 * 256)
    q, k, v = _growing_inputs(70000)
    ref = linear_attention(q, k, v, causal=causal)
    out = linear_attention(*(x.to(dtype) for x in (q, k, v)), causal=causal)
    assert out.dtype == dtype
    assert _rel_error(out, ref) <= 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_half_precision_gradients_are_finite_and_in_the_input_dtype(dtype, causal):
    q, k, v = (x.to(dtype).requires_grad_() for x in _growing_inputs(300, heads=2, head_dim=8))
    out = linear_attention(q, k, v, causal=causal, chunk_size=16)
    assert out.dtype == dtype
    out.float().sum().backward()
    for x in (q, k, v):
        assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()


# --- 3. memory estimates that follow the device and dtype ----------------------------------------------------


def _growth(spec: ImplSpec, *, itemsize: int, device, dtype) -> float:
    """How the estimate grows from n to 2n: about 2 for O(n), 4 for O(n^2)."""
    keywords = {"device": device, "dtype": dtype}
    small = spec.memory_bytes(**SHAPE, seq_len=8192, itemsize=itemsize, **keywords)
    large = spec.memory_bytes(**SHAPE, seq_len=16384, itemsize=itemsize, **keywords)
    return large / small


@pytest.mark.parametrize(
    ("device", "dtype", "itemsize", "quadratic"),
    [
        ("cpu", None, 4, False),
        ("cpu", "float64", 8, False),  # torch's CPU flash kernel takes float64
        ("cpu", "bfloat16", 2, False),
        ("cuda", "float32", 4, False),  # memory-efficient kernel
        ("cuda", "float16", 2, False),
        ("cuda:1", torch.bfloat16, 2, False),
        ("cuda", "float64", 8, True),  # no fused kernel for float64 on CUDA: the math path
        ("cuda", torch.float64, 8, True),
        ("cuda", None, 8, True),  # no dtype name: 8 bytes is float64
        ("mps", "float32", 4, True),  # MPS writes the scores out
        ("mps", "float16", 2, True),
    ],
)
def test_sdpa_estimate_is_quadratic_where_torch_falls_back_to_the_math_path(device, dtype, itemsize, quadratic):
    growth = _growth(get("sdpa"), itemsize=itemsize, device=device, dtype=dtype)
    if quadratic:
        assert 3.9 < growth <= 4.0
        full = get("full").memory_bytes(**SHAPE, seq_len=16384, itemsize=itemsize)
        sdpa = get("sdpa").memory_bytes(**SHAPE, seq_len=16384, itemsize=itemsize, device=device, dtype=dtype)
        assert sdpa == pytest.approx(full, rel=0.01)  # what full attention writes out
    else:
        assert 1.9 < growth <= 2.0


def test_sdpa_estimate_without_device_is_the_cpus():
    spec = get("sdpa")
    shape = {**SHAPE, "seq_len": 4096, "itemsize": 4}
    assert spec.memory_bytes(**shape) == spec.memory_bytes(**shape, device="cpu", dtype="float32")
    assert spec.memory_bytes(**shape) < spec.memory_bytes(**shape, device="mps")


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_sparse_estimate_follows_the_devices_chunks(causal):
    spec = get("sparse")
    shape = {**SHAPE, "seq_len": 16384, "itemsize": 4, "causal": causal}
    cpu, cuda, mps = (spec.memory_bytes(**shape, device=device) for device in ("cpu", "cuda", "mps"))
    assert spec.memory_bytes(**shape) == cpu  # the default is the CPU's
    assert cpu < cuda  # one chunk holding every query block's gathered keys, against 1/64 of them
    # the difference is exactly the larger chunk's gathered keys and its scores (fused kernel, generously)
    layout = block_layout(SparseConfig(), seq_len=16384, causal=causal)
    block = SparseConfig().block_size

    def chunk_keys(device):
        cut = _chunks(layout, rows=8, block=block, head_dim=64, device=device)
        return max((stop - start) * width * block for start, stop, width in cut)

    grown = chunk_keys("cuda") - chunk_keys("cpu")
    assert cuda - cpu == pytest.approx(8 * grown * (2 * 64 + block) * 4)
    # MPS: its chunk is between the two, but "sdpa" writes the chunk's scores out there (three of them)
    assert mps > cpu
    matmul = spec.with_params(kernel="matmul").memory_bytes(**shape, device="mps")
    assert mps == matmul


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_linear_estimate_follows_the_devices_blocks(causal):
    config = LinearConfig()
    shape = {**SHAPE, "seq_len": 1 << 17, "itemsize": 4, "causal": causal}
    estimate = {
        device: LinearAttention.memory_bytes(config, **shape, device=device) for device in ("cpu", "cuda", "mps")
    }
    assert LinearAttention.memory_bytes(config, **shape) == estimate["cpu"]
    assert estimate["cpu"] < estimate["mps"] < estimate["cuda"]
    # the output (n d) is common; the rest is one step's temporaries, proportional to the step's positions
    output = 8 * (1 << 17) * 64 * 4
    cpu_steps = linear_module.block_positions((1, 8, 1 << 17, 64), chunk=64, causal=causal, device="cpu")
    cuda_steps = linear_module.block_positions((1, 8, 1 << 17, 64), chunk=64, causal=causal, device="cuda")
    ratio = (estimate["cuda"] - output) / (estimate["cpu"] - output)
    assert ratio == pytest.approx(cuda_steps / cpu_steps, rel=0.05)


def test_linear_estimate_counts_float32_sums_for_half_inputs():
    config = LinearConfig()
    for causal in (False, True):
        shape = {**SHAPE, "seq_len": 4096, "causal": causal}
        half = LinearAttention.memory_bytes(config, **shape, itemsize=2)
        single = LinearAttention.memory_bytes(config, **shape, itemsize=4)
        output = 8 * 4096 * 64
        # the half-precision output is half the size, but its temporaries are not half those of float32
        assert half - output * 2 > (single - output * 4) / 2


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_local_estimate_bounds_every_chunk_size_and_follows_the_math_path(causal):
    """local's estimate counts every block's scores at once (alive together under autograd), a bound over every
    chunk size: the device's chunk does not change it. The device does where "sdpa" writes scores out."""
    spec = get("local")
    shape = {**SHAPE, "seq_len": 16384, "itemsize": 4, "causal": causal}
    cpu, cuda, mps = (spec.memory_bytes(**shape, device=device) for device in ("cpu", "cuda", "mps"))
    assert spec.memory_bytes(**shape) == cpu == cuda
    matmul = spec.with_params(kernel="matmul")
    assert mps == matmul.memory_bytes(**shape, device="mps") == matmul.memory_bytes(**shape) > cpu
    double = {**shape, "itemsize": 8}
    assert spec.memory_bytes(**double, device="cuda", dtype="float64") == matmul.memory_bytes(**double)
    assert spec.memory_bytes(**double, device="cpu", dtype="float64") < matmul.memory_bytes(**double)


@pytest.mark.parametrize(("device", "dtype", "itemsize"), [("cuda", "float64", 8), ("mps", "float32", 4)])
def test_local_estimate_covers_one_math_path_chunk_of_the_device(device, dtype, itemsize):
    """Where "sdpa" writes scores out, the estimate covers the scores, exponentials and probabilities of the
    largest chunk the device's forward cuts (at 256K positions, several chunks even on CUDA)."""
    config, seq_len = LocalConfig(), 1 << 18
    keywords = {"itemsize": itemsize, "causal": False, "device": device, "dtype": dtype}
    estimate = LocalAttention.memory_bytes(config, **SHAPE, seq_len=seq_len, **keywords)
    block = 64  # auto_block_size(128)
    span = block + 2 * config.window
    step_blocks = blocks.chunk_elements(device) // (8 * block * 64)
    assert step_blocks < seq_len // block  # more than one chunk
    assert estimate >= 3 * 8 * step_blocks * block * span * itemsize


# --- the contract: the registry passes device and dtype only to estimates that declare them ------------------


class _Old(AttentionModule):
    """An estimate written before device and dtype existed."""

    Config = EmptyConfig

    @classmethod
    def memory_bytes(cls, config, *, batch, heads, seq_len, head_dim, itemsize, causal):
        return float(batch * heads * seq_len * head_dim * itemsize)


class _DeviceOnly(AttentionModule):
    Config = EmptyConfig
    seen: ClassVar[dict] = {}

    @classmethod
    def memory_bytes(cls, config, *, batch, heads, seq_len, head_dim, itemsize, causal, device="cpu"):
        cls.seen = {"device": device}
        return 1.0


class _Both(AttentionModule):
    Config = EmptyConfig
    seen: ClassVar[dict] = {}

    @classmethod
    def memory_bytes(cls, config, *, batch, heads, seq_len, head_dim, itemsize, causal, device="cpu", dtype=None):
        cls.seen = {"device": device, "dtype": dtype}
        return 2.0


class _Keywords(AttentionModule):
    Config = EmptyConfig
    seen: ClassVar[dict] = {}

    @classmethod
    def memory_bytes(cls, config, **keywords):
        cls.seen = {key: keywords[key] for key in ("device", "dtype")}
        return 3.0


def _spec(cls) -> ImplSpec:
    return ImplSpec(name="probe", module_cls=cls, config=EmptyConfig(), source="test", origin="here")


def test_registry_passes_the_new_keywords_only_where_declared():
    shape = {"batch": 1, "heads": 2, "seq_len": 10, "head_dim": 4, "itemsize": 2}
    assert _spec(_Old).memory_bytes(**shape, device="cuda:0", dtype=torch.float16) == 160.0
    assert _spec(_DeviceOnly).memory_bytes(**shape, device="cuda:0", dtype=torch.float16) == 1.0
    assert _DeviceOnly.seen == {"device": "cuda"}
    assert _spec(_Both).memory_bytes(**shape, device=torch.device("mps"), dtype=torch.bfloat16) == 2.0
    assert _Both.seen == {"device": "mps", "dtype": "bfloat16"}
    assert _spec(_Both).memory_bytes(**shape) == 2.0
    assert _Both.seen == {"device": "cpu", "dtype": None}
    assert _spec(_Keywords).memory_bytes(**shape, device="cuda", dtype="float64") == 3.0
    assert _Keywords.seen == {"device": "cuda", "dtype": "float64"}


def test_builtin_estimates_declare_device_and_dtype_where_their_kernels_differ():
    for cls in (SparseAttention, LocalAttention, LinearAttention, get("sdpa").module_cls):
        assert {"device", "dtype"} <= set(inspect.signature(cls.memory_bytes).parameters), cls.__name__


# --- the planner passes the case's device and dtype ------------------------------------------------------------


def test_planner_estimates_for_the_cases_device_and_dtype():
    cpu = estimate_bytes(Case(impl="sdpa", seq_len=16384, device="cpu", dtype="float32"))
    mps = estimate_bytes(Case(impl="sdpa", seq_len=16384, device="mps", dtype="float32"))
    cuda64 = estimate_bytes(Case(impl="sdpa", seq_len=16384, device="cuda", dtype="float64"))
    cuda32 = estimate_bytes(Case(impl="sdpa", seq_len=16384, device="cuda", dtype="float32"))
    assert mps > 100 * cpu and cuda64 > 100 * cpu and cuda32 == cpu
    layers = {"scope": "layers", "depth": 2, "seq_len": 16384}
    assert estimate_bytes(Case(impl="sdpa", device="mps", **layers)) > 10 * estimate_bytes(Case(impl="sdpa", **layers))


def test_configs_are_unchanged():
    # the chunking changed per device, not the hyperparameters (part of every case's key)
    assert dataclasses.asdict(LocalConfig()) == {"window": 128, "block_size": None, "kernel": "sdpa"}
    assert SparseConfig().block_size == 64
