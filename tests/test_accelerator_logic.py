"""What the CUDA and MPS paths decide, checked on the CPU: device choice, timing, memory, faults, conditions.

The GPU itself is exercised by tests/test_cuda.py (skipped without one); everything here runs anywhere.
"""

from __future__ import annotations

import os
import stat
import time

import pytest
import torch
from cli_helpers import attnbench

from bench.cases import DEFAULT_DTYPES, Case, GridError, GridRequest
from bench.measure import plan, timing
from bench.measure.memory import measure_peak
from bench.measure.worker import is_oom, prepare, run_case, sdpa_backend
from bench.options import MeasureOptions

# ---------------------------------------------------------------- device choice


def _request(**overrides) -> GridRequest:
    values = dict(
        impls=("sdpa",),
        seq_lens=(64,),
        dtypes=None,
        modes=("fwd",),
        batch=1,
        heads=2,
        head_dim=16,
        causal=False,
        scope="attention",
        depths=(1,),
    )
    return GridRequest(**{**values, **overrides})


def test_default_device_is_cuda_then_mps_then_cpu(monkeypatch) -> None:
    monkeypatch.setattr(plan, "nvidia_gpu_visible", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert plan.default_devices() == ("cuda",)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert plan.default_devices() == ("mps",)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert plan.default_devices() == ("cpu",)


def test_a_visible_gpu_that_torch_can_not_use_stops_the_default_run(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(plan, "nvidia_gpu_visible", lambda: True)
    with pytest.raises(GridError, match=r"install a CUDA build of torch .* or pass --devices cpu"):
        plan.default_devices()
    # an explicit device is what the user asked for
    assert {case.device for case in plan.plan_cases(_request(devices=("cpu",)))} == {"cpu"}


def test_default_dtype_follows_the_device() -> None:
    for device in ("cpu", "cuda", "mps"):
        cases = plan.plan_cases(_request(devices=(device,)))
        assert {case.dtype for case in cases} == {DEFAULT_DTYPES[device]}
    assert DEFAULT_DTYPES["cuda"] == "bfloat16" and DEFAULT_DTYPES["cpu"] == "float32"
    both = plan.plan_cases(_request(devices=("cpu", "cuda"), dtypes=("float32",)))
    assert {(case.device, case.dtype) for case in both} == {("cpu", "float32"), ("cuda", "float32")}


def _fake_nvidia_smi(tmp_path) -> dict[str, str]:
    """A PATH on which nvidia-smi lists a GPU: torch here is a CPU build, so it can not use it."""
    script = tmp_path / "bin" / "nvidia-smi"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{script.parent}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that can not use the GPU")
def test_cli_stops_with_one_line_when_the_gpu_is_unusable_and_runs_on_cpu_when_asked(tmp_path) -> None:
    env = _fake_nvidia_smi(tmp_path)
    args = ["run", "--impls", "sdpa", "--seq-lens", "32", "--modes", "fwd", "--min-time", "0.01", "--quiet"]
    out = tmp_path / "r.jsonl"
    stopped = attnbench(*args, "--out", str(out), **env)
    assert stopped.returncode == 2
    lines = stopped.stderr.strip().splitlines()
    assert len(lines) == 1 and "install a CUDA build of torch" in lines[0] and "--devices cpu" in lines[0]
    assert not out.exists()
    ran = attnbench(*args, "--devices", "cpu", "--processes", "1", "--out", str(out), **env)
    assert ran.returncode == 0, ran.stderr
    assert "device: cpu (" in ran.stderr  # the chosen device is printed at the start of every run


# ---------------------------------------------------------------- timing


def test_calls_per_sample_are_calibrated_after_the_warm_up() -> None:
    """A cold first call (lazy initialisation on a GPU) must not size the samples: the warm call does."""
    calls = []

    def fn():
        calls.append(None)
        if len(calls) == 1:
            time.sleep(0.05)  # cold: 50 ms; warm: a few microseconds

    stats = timing.time_callable(fn, min_time_s=0.02, min_samples=5)
    assert stats.calls_per_sample > 16
    assert stats.median_s < 1e-3


def test_a_slow_warm_call_is_the_first_sample() -> None:
    calls = []
    stats = timing.time_callable(lambda: calls.append(time.sleep(0.005)), min_time_s=0.0, min_samples=3)
    assert stats.calls_per_sample == 1
    assert len(calls) == timing.WARMUP_CALLS + stats.n_samples  # warm-up, then samples: no calibration call wasted


def test_the_clock_synchronizes_the_cases_own_device(monkeypatch) -> None:
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    clock = timing._Clock(torch.device("cuda:1"))
    clock.per_call(lambda: None, 3, None)
    assert synced == [torch.device("cuda:1")] * 2


def test_timer_choice() -> None:
    assert timing.resolve_timer("auto", "cuda:1") == "cuda-events"
    assert timing.resolve_timer("auto", "cpu") == "clock"
    assert timing.resolve_timer("clock", "cuda") == "clock"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        timing.resolve_timer("cuda-events", "cpu")


def test_flush_runs_before_every_call_outside_the_timed_region() -> None:
    order = []
    per_call = timing._Clock(torch.device("cpu")).per_call(
        lambda: order.append("call"), 3, lambda: (order.append("flush"), time.sleep(0.02))
    )
    assert order == ["flush", "call"] * 3
    assert per_call < 0.01  # the 20 ms flushes are not timed
    stats = timing.time_callable(lambda: None, min_time_s=0.0, min_samples=2, flush_cache=True)
    assert stats.timer == "clock" and stats.median_s < 0.01


# ---------------------------------------------------------------- memory


def test_reset_runs_before_the_baseline_and_the_call(monkeypatch) -> None:
    """A training step frees the previous gradients, then allocates new ones: reset() drops them first, so a
    baseline read after it (CUDA: memory_allocated) does not hold bytes the call frees and takes again."""
    from bench.measure import memory

    order = []
    numel = 1 << 20
    held = [torch.ones(numel)]

    def step():
        order.append("call")
        held[0] = None  # like leaf.grad = None at the start of a step
        held[0] = torch.ones(numel)

    monkeypatch.setattr(memory, "rss_bytes", lambda: order.append("baseline") or 0)
    peak = measure_peak(step, device="cpu", reset=lambda: (order.append("reset"), held.__setitem__(0, None)))
    assert order == ["reset", "baseline", "call"]
    assert peak.peak_bytes >= 4 * numel


def test_training_step_peak_includes_the_gradients_and_output() -> None:
    case = Case("full", 512, mode="fwd+bwd", heads=2, head_dim=32)
    prepared = prepare(case, seed=0)
    prepared.fn()  # the timing loop leaves gradients behind
    peak = measure_peak(prepared.fn, device="cpu", reset=prepared.reset).peak_bytes
    grads = 3 * case.batch * case.heads * case.seq_len * case.head_dim * 4
    output = grads // 3
    assert peak >= grads + output


# ---------------------------------------------------------------- faults


@pytest.mark.parametrize(
    "message",
    [
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
        "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
        "CUDA out of memory. Tried to allocate 2.00 GiB",
        "MPS backend out of memory (MPS allocated: 1 GB)",
    ],
)
def test_allocation_failures_are_oom(message) -> None:
    assert is_oom(RuntimeError(message))


def test_an_illegal_address_is_not_oom() -> None:
    assert not is_oom(RuntimeError("CUDA error: an illegal memory access was encountered"))


def test_a_failed_accelerator_case_replaces_the_worker(monkeypatch) -> None:
    from bench.measure.lanes import LaneWorker

    class FakeWorker:
        def __init__(self, status):
            self.status = status

        def request(self, payload, *, timeout_s):
            return {"status": self.status, "message": "CUDA error: device-side assert triggered"}

    worker = LaneWorker(threads=1, cores=None, environ={})
    stopped = []
    monkeypatch.setattr(worker, "start", lambda: None)
    monkeypatch.setattr(worker, "stop", lambda: stopped.append(True))
    try:
        for device, status, replaced in [
            ("cuda", "error", True),
            ("mps", "oom", True),
            ("cuda", "ok", False),
            ("cpu", "error", False),  # a Python exception leaves a CPU worker healthy
        ]:
            stopped.clear()
            worker._worker = FakeWorker(status)
            assert worker.request({"op": "case"}, timeout_s=1, device=device)["status"] == status
            assert bool(stopped) is replaced, (device, status)
    finally:
        worker._worker = None
        worker.close()


# ---------------------------------------------------------------- conditions in the records


def test_records_state_timer_backend_and_conditions() -> None:
    from bench.results import ENV_IDENTITY_FIELDS

    result = run_case(Case("sdpa", 128, heads=2, head_dim=16), MeasureOptions(min_time_s=0.01))
    assert result["status"] == "ok", result
    assert result["timer"] == "clock"
    assert result["sdpa_backend"] == "flash-cpu"
    assert {"tf32", "flop_convention", "cuda_version", "cudnn_version", "gpu_driver"} <= set(ENV_IDENTITY_FIELDS)


def test_sdpa_backend_names_the_kernel_that_ran() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 2, 64, 16)
    with sdpa_kernel(SDPBackend.MATH):
        math_ops = measure_peak(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q), device="cpu").ops
    assert sdpa_backend(math_ops) == "math"
    assert sdpa_backend(measure_peak(lambda: q @ q.transpose(-1, -2), device="cpu").ops) is None


def test_env_sets_and_records_tf32() -> None:
    from bench.measure.env import FLOP_CONVENTION, collect_env

    for enabled in (True, False):
        env = collect_env(["cpu"], ["float32"], num_threads=1, tf32=enabled)["env"]
        assert env["tf32"] is enabled and torch.backends.cuda.matmul.allow_tf32 is enabled
        assert env["flop_convention"] == FLOP_CONVENTION and "3 x forward" in FLOP_CONVENTION
        assert env["cpu_affinity"]


def test_pyproject_torch_floor_is_a_version_we_run() -> None:
    """The oldest torch pyproject allows must not be older than the GPU validation machine's (2.11)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    floor = re.search(r'"torch>=(\d+)\.(\d+)"', text)
    assert floor and (int(floor[1]), int(floor[2])) >= (2, 11)
    installed = tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2])
    assert installed >= (int(floor[1]), int(floor[2]))
