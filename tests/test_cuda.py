"""What only a GPU can show: the harness's CUDA measurements against arithmetic and known durations, faults in
a CUDA sweep, and the conformance suite on the device in float32 and bfloat16.

Every test is marked ``cuda`` and skips without a CUDA device; ``attnbench validate`` runs them with
``pytest -m cuda``. What is asserted is what must hold on any GPU (bounds, ratios, statuses), never a speed.
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from cli_helpers import attnbench

import conformance
from attention_impls import get, list_impls
from bench.cases import Case
from bench.measure.env import TORCH_DTYPES, matmul_peak_flops, set_tf32
from bench.measure.timing import time_callable
from bench.measure.worker import run_case
from bench.options import MeasureOptions
from reference import reference_attention, rel_error

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

QUICK = MeasureOptions(min_time_s=0.0, min_samples=5)
HEADS, HEAD_DIM = 8, 64  # the default case shape (batch 1)
# a GPU sleep of this long is timed by the harness; within SLEEP_TOLERANCE of it passes
SLEEP_S = 0.02
SLEEP_TOLERANCE = 0.1
CALIBRATION_CYCLES = 200_000_000  # about 0.1 s at 2 GHz: long enough for events to time it to 0.1%


def _cycles_per_second(device: str) -> float:
    """How many ``torch.cuda._sleep`` cycles ``device`` spins per second, timed by CUDA events (median of 3)."""
    with torch.cuda.device(torch.device(device)):
        torch.cuda._sleep(1_000_000)  # loads the kernel
        torch.cuda.synchronize()
        rates = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(CALIBRATION_CYCLES)
            end.record()
            end.synchronize()
            rates.append(CALIBRATION_CYCLES / (start.elapsed_time(end) / 1e3))
    return statistics.median(rates)


# ---------------------------------------------------------------- measurements against arithmetic


@pytest.mark.parametrize("impl", ["full", "sdpa"])
def test_achieved_flops_never_exceed_the_matmul_peak(impl) -> None:
    peak = matmul_peak_flops("cuda", "bfloat16", num_threads=torch.get_num_threads())
    record = run_case(Case(impl, 4096, device="cuda", dtype="bfloat16"), QUICK, peak_flops_per_s=peak)
    assert record["status"] == "ok", record
    assert 0 < record["achieved_flops_per_s"] <= peak, (record["achieved_flops_per_s"], peak)
    assert 0 < record["roofline"] <= 1.0


def test_sdpa_peak_memory_grows_like_n() -> None:
    """The fused kernel holds O(n d): 4x the length is about 4x the memory, far from the 16x of n^2 scores."""
    peaks = {}
    for seq_len in (4096, 16384):
        record = run_case(Case("sdpa", seq_len, device="cuda", dtype="bfloat16"), QUICK)
        assert record["status"] == "ok", record
        assert record["memory_method"] == "cuda-allocator"
        peaks[seq_len] = record["peak_bytes"]
    ratio = peaks[16384] / peaks[4096]
    assert 2.0 <= ratio <= 6.0, (peaks, record.get("sdpa_backend"))
    output = 1 * HEADS * 16384 * HEAD_DIM * 2
    assert peaks[16384] >= output  # the output at least, and nothing like the 4 GiB of 16384^2 scores
    assert peaks[16384] < 1 * HEADS * 16384**2 * 2 / 16


@pytest.mark.parametrize("impl", ["full", "sdpa"])
def test_training_step_peak_holds_the_gradients_and_the_output(impl) -> None:
    seq_len = 4096
    record = run_case(Case(impl, seq_len, mode="fwd+bwd", device="cuda", dtype="bfloat16"), QUICK)
    assert record["status"] == "ok", record
    tensor_bytes = 1 * HEADS * seq_len * HEAD_DIM * 2
    assert record["peak_bytes"] >= 3 * tensor_bytes + tensor_bytes  # gradients of q, k, v and the output


# ---------------------------------------------------------------- timing a known duration


@pytest.mark.parametrize("timer", ["clock", "cuda-events"])
def test_a_known_gpu_sleep_is_timed_right(timer) -> None:
    """Without synchronization the clock would read the launch (microseconds), not the 20 ms the kernel spins."""
    cycles = int(SLEEP_S * _cycles_per_second("cuda:0"))
    with torch.cuda.device(0):
        stats = time_callable(
            lambda: torch.cuda._sleep(cycles), device="cuda:0", timer=timer, min_time_s=0.2, min_samples=5
        )
    assert stats.timer == timer
    assert stats.calls_per_sample == 1  # 20 ms is a sample of its own
    assert stats.median_s == pytest.approx(SLEEP_S, rel=SLEEP_TOLERANCE), stats


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("timer", ["clock", "cuda-events"])
def test_the_timer_waits_for_the_cases_device_not_the_current_one(timer) -> None:
    cycles = int(SLEEP_S * _cycles_per_second("cuda:1"))

    def sleep_on_device_1() -> None:
        with torch.cuda.device(1):
            torch.cuda._sleep(cycles)

    with torch.cuda.device(0):
        stats = time_callable(sleep_on_device_1, device="cuda:1", timer=timer, min_time_s=0.2, min_samples=5)
        assert torch.cuda.current_device() == 0
    assert stats.median_s == pytest.approx(SLEEP_S, rel=SLEEP_TOLERANCE), stats


def test_crosscheck_times_a_cuda_case_by_every_method() -> None:
    from bench.measure import crosscheck

    result = crosscheck.crosscheck_case(
        Case("sdpa", 4096, device="cuda", dtype="bfloat16"), MeasureOptions(min_time_s=0.3), rounds=2
    )
    assert result.status == "ok", result
    assert result.harness_timer == "cuda-events" and result.independent_method == crosscheck.CUDA_METHOD
    assert result.ratio is not None and result.ratio > 0
    if crosscheck.triton_do_bench() is not None:
        assert result.triton_ratio is not None and result.triton_ratio > 0


# ---------------------------------------------------------------- faults in a CUDA sweep


def _sweep(tmp_path, *args: str, devices: str = "cuda", **env: str) -> list[dict]:
    out = tmp_path / "cuda.jsonl"
    result = attnbench(
        "run", *args, "--devices", devices, "--dtypes", "bfloat16", "--modes", "fwd", "--processes", "1",
        "--min-time", "0.01", "--timeout", "120", "--quiet", "--out", str(out), **env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_an_out_of_memory_case_is_oom_and_the_next_case_runs(tmp_path) -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    huge = 1024
    while 1 * HEADS * huge * huge * 2 <= 1.5 * total:  # full's bfloat16 scores alone pass the device's memory
        huge *= 2
    records = _sweep(tmp_path, "--impls", "full,sdpa", "--seq-lens", f"1024,{huge}", "--budget-gb", "100000")
    order = [(r["case"]["impl"], r["case"]["seq_len"], r["status"]) for r in records]
    assert [(impl, n) for impl, n, _ in order] == [("full", 1024), ("full", huge), ("sdpa", 1024), ("sdpa", huge)]
    statuses = {(impl, n): status for impl, n, status in order}
    assert statuses[("full", huge)] == "oom", records[1]
    assert statuses[("sdpa", 1024)] == "ok", records[2]  # the case right after the OOM, in a fresh worker
    assert statuses[("full", 1024)] == "ok" and statuses[("sdpa", huge)] == "ok", order


def test_a_device_side_assert_fails_its_case_and_the_next_case_runs(tmp_path) -> None:
    records = _sweep(
        tmp_path, "--impls", "fault_device_assert,sdpa", "--seq-lens", "256", ATTNBENCH_IMPORT="cuda_fault_impls"
    )
    by_impl = {r["case"]["impl"]: r for r in records}
    assert [r["case"]["impl"] for r in records] == ["fault_device_assert", "sdpa"]
    fault = by_impl["fault_device_assert"]
    assert fault["status"] in ("error", "crashed"), fault
    assert fault["message"] and "\n" not in fault["message"]
    assert by_impl["sdpa"]["status"] == "ok", by_impl["sdpa"]  # a sticky CUDA error did not follow it


def test_every_gpu_is_a_lane_that_names_its_card(tmp_path) -> None:
    """--devices cuda:all: a lane per GPU, each worker seeing its GPU alone; records name the lane and its UUID."""
    records = _sweep(tmp_path, "--impls", "sdpa,full,linear,local", "--seq-lens", "256,512", devices="cuda:all")
    count = torch.cuda.device_count()
    assert len(records) == 8 and all(r["status"] == "ok" for r in records), records
    assert {r["case"]["device"] for r in records} == {"cuda"}  # a case says the kind; its lane says which
    lanes = {r["lane"] for r in records}
    # each case goes to the lane used least lately: a lane never used first
    assert lanes <= {f"cuda:{gpu}" for gpu in range(count)} and len(lanes) == min(count, 8), lanes
    uuids = {r["lane"]: r["env"]["gpu_uuid"] for r in records}
    assert all(uuid and uuid.startswith("GPU-") for uuid in uuids.values()), uuids
    assert len(set(uuids.values())) == len(uuids)  # a card of its own each
    assert all(r["env"]["gpu_name"] == torch.cuda.get_device_name(0) for r in records)


# ---------------------------------------------------------------- the conformance suite on the device

IMPLS = list_impls()
LENGTHS = (1, 3, 127, 1000)
DTYPES = ("float32", "bfloat16")
# relative error of an exact implementation against float64 attention of the same (rounded) inputs:
# float32 with TF32 off is IEEE single precision; bfloat16 keeps 8 bits of mantissa
EXACT_TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
# outputs up to t that change when only the future changes, relative to the outputs' size: rounding noise
# (a kernel's atomics can reorder sums) at most, never the O(1) change a leak makes
LEAK_TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
# a decode step against the causal forward's row, relative: the order of the sums differs, nothing else (on the
# CPU, 8 heads on 2 key/value heads, 300 tokens: at most 5e-7 in float32 and 2.2e-3 in bfloat16)
DECODE_TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


@pytest.fixture(autouse=True)
def _no_tf32():
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    set_tf32(False)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def _skip_unsupported(name: str, *, seq_len: int, causal: bool, dtype: str) -> None:
    reason = get(name).unsupported_reason(
        seq_len=seq_len, head_dim=conformance.HEAD_DIM, causal=causal, device="cuda", dtype=TORCH_DTYPES[dtype]
    )
    if reason:
        pytest.skip(reason)


def _run_on_cuda(name: str, q, k, v, *, causal: bool, dtype: str, seed: int = 0) -> torch.Tensor:
    """Build for the inputs' shapes on the device in ``dtype`` (as the worker does) and call on the inputs cast
    to it, after seeding."""
    spec = get(name)
    torch.manual_seed(seed)
    module = spec.build(
        seq_len=k.shape[2],
        heads=q.shape[1],
        head_dim=q.shape[3],
        q_len=q.shape[2],
        kv_heads=k.shape[1],
        device="cuda",
        dtype=TORCH_DTYPES[dtype],
    )
    torch.manual_seed(seed)
    return module(*(x.to("cuda", TORCH_DTYPES[dtype]) for x in (q, k, v)), causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", IMPLS)
@pytest.mark.parametrize("seq_len", LENGTHS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_agrees_with_exact_attention_on_cuda(
    name: str, seq_len: int, causal: bool, dtype: str, record_property
) -> None:
    _skip_unsupported(name, seq_len=seq_len, causal=causal, dtype=dtype)
    spec = get(name)
    q, k, v = (x.to(TORCH_DTYPES[dtype]) for x in conformance.make_qkv(seq_len))  # the inputs as the device sees them
    out = _run_on_cuda(name, q, k, v, causal=causal, dtype=dtype)
    assert out.shape == q.shape and out.dtype == TORCH_DTYPES[dtype] and out.device.type == "cuda"
    assert torch.isfinite(out).all(), f"{name}: non-finite output on cuda in {dtype}"
    exact = reference_attention(q, k, v, causal=causal, shared_qk=spec.shared_qk)  # float64, on the CPU
    error = rel_error(out.cpu(), exact)
    record_property("rel_error", error)
    tolerance = EXACT_TOLERANCE[dtype] if spec.exact else conformance.APPROX_TOLERANCE
    assert error <= tolerance, f"{name}: rel error {error:.3g} > {tolerance} on cuda in {dtype} (n={seq_len})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", IMPLS)
def test_finite_for_large_inputs_on_cuda(name: str, dtype: str) -> None:
    for causal in (False, True):
        if get(name).unsupported_reason(
            seq_len=200, head_dim=conformance.HEAD_DIM, causal=causal, device="cuda", dtype=TORCH_DTYPES[dtype]
        ):
            continue
        for scale in (1.0, 30.0, 1e3):
            q, k, v = conformance.make_qkv(200, scale=scale)
            out = _run_on_cuda(name, q, k, v, causal=causal, dtype=dtype)
            assert torch.isfinite(out).all(), f"{name}: non-finite output at magnitude {scale} causal={causal}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", IMPLS)
def test_causal_does_not_see_the_future_on_cuda(name: str, dtype: str) -> None:
    seq_len = 300
    _skip_unsupported(name, seq_len=seq_len, causal=True, dtype=dtype)
    q, k, v = conformance.make_qkv(seq_len)
    base = _run_on_cuda(name, q, k, v, causal=True, dtype=dtype).float().cpu()
    scale = base.abs().max().item()
    gen = torch.Generator().manual_seed(123)
    for t in (0, seq_len // 3, seq_len // 2, seq_len - 2):
        changed = [x.clone() for x in (q, k, v)]
        for x in changed:
            x[:, :, t + 1 :] = torch.randn(x[:, :, t + 1 :].shape, generator=gen, dtype=x.dtype) * 3.0
        out = _run_on_cuda(name, *changed, causal=True, dtype=dtype).float().cpu()
        leak = (out[:, :, : t + 1] - base[:, :, : t + 1]).abs().max().item()
        assert leak <= LEAK_TOLERANCE[dtype] * scale, f"{name}: outputs up to t={t} moved by {leak:.3g} in {dtype}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", IMPLS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gradients_finite_on_cuda(name: str, causal: bool, dtype: str) -> None:
    seq_len = 130
    _skip_unsupported(name, seq_len=seq_len, causal=causal, dtype=dtype)
    spec = get(name)
    q, k, v = (x.to("cuda", TORCH_DTYPES[dtype]).requires_grad_(True) for x in conformance.make_qkv(seq_len))
    out = _run_on_cuda(name, q, k, v, causal=causal, dtype=dtype)
    assert out.requires_grad, f"{name}: output is detached from q, k, v"
    weights = torch.linspace(-1, 1, out.numel(), device="cuda", dtype=torch.float32).view_as(out)
    (out.float() * weights).sum().backward()
    conformance.check_input_gradients(spec, q, k, v, context=f" in {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", IMPLS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_grouped_heads_and_cross_lengths_on_cuda(name: str, causal: bool, dtype: str) -> None:
    """8 query heads on 2 key/value heads, 130 queries against 300 keys (lower-right aligned when causal)."""
    spec = get(name)
    shape = {"heads": 8, "kv_heads": 2, "q_len": 130}
    reason = spec.unsupported_reason(
        seq_len=300, head_dim=conformance.HEAD_DIM, causal=causal, device="cuda", dtype=TORCH_DTYPES[dtype], **shape
    )
    if reason:
        pytest.skip(reason)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 130, conformance.HEAD_DIM, generator=gen, dtype=torch.float64).to(TORCH_DTYPES[dtype])
    k, v = (torch.randn(2, 2, 300, conformance.HEAD_DIM, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = k.to(TORCH_DTYPES[dtype]), v.to(TORCH_DTYPES[dtype])
    with torch.no_grad():
        out = _run_on_cuda(name, q, k, v, causal=causal, dtype=dtype)
    assert out.shape == q.shape and out.device.type == "cuda" and torch.isfinite(out).all()
    error = rel_error(out.cpu(), reference_attention(q, k, v, causal=causal))
    tolerance = EXACT_TOLERANCE[dtype] if spec.exact else conformance.APPROX_TOLERANCE
    assert error <= tolerance, f"{name}: rel error {error:.3g} > {tolerance} on cuda in {dtype}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", IMPLS)
def test_decode_steps_on_cuda_follow_the_causal_forward(name: str, dtype: str) -> None:
    spec = get(name)
    seq_len, filled = 300, 280
    reason = spec.unsupported_reason(
        seq_len=seq_len,
        head_dim=conformance.HEAD_DIM,
        causal=True,
        device="cuda",
        dtype=TORCH_DTYPES[dtype],
        heads=8,
        kv_heads=2,
        decode=True,
    )
    if reason:
        pytest.skip(reason)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, seq_len, conformance.HEAD_DIM, generator=gen).to("cuda", TORCH_DTYPES[dtype])
    k, v = (torch.randn(2, 2, seq_len, conformance.HEAD_DIM, generator=gen).to(q) for _ in range(2))
    module = spec.build(
        seq_len=seq_len, heads=8, head_dim=conformance.HEAD_DIM, kv_heads=2, device="cuda", dtype=TORCH_DTYPES[dtype]
    )
    with torch.no_grad():
        forward = module(q, k, v, causal=True).float()
        cache = module.prefill(k[:, :, :filled], v[:, :, :filled], capacity=seq_len)
        for t in range(filled, seq_len):
            out, cache = module.decode_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], cache)
            row = forward[:, :, t : t + 1]
            error = ((out.float() - row).norm() / row.norm()).item()
            assert error <= DECODE_TOLERANCE[dtype], f"{name}: token {t} differs from the forward by {error:.3g}"
