"""The environment probe: what machine, devices and versions measured a sweep, and the matmul peak per dtype.

Run once per sweep inside a worker (it needs torch); its result goes into every record's ``env``, and
``bench.results.ENV_IDENTITY_FIELDS`` of it decide which records may be compared.
"""

from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import psutil
import torch

import bench
from bench.measure.process import allocator_setting
from bench.measure.timing import time_callable
from bench.results import first_line

TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
PEAK_MATMUL_SIZE = {"cpu": 2048, "cuda": 8192, "mps": 4096}
# backward FLOPs per forward FLOP: each forward matmul has two in the backward (no recomputation counted)
BACKWARD_FLOP_FACTOR = 2.0
# how ``flops`` counts, stated in every record's environment: results that count differently never share a curve
FLOP_CONVENTION = (
    "forward: the work each implementation performs (masked work it computes counts, work it skips does not; "
    f"sdpa's fused kernels skip the causal half); fwd+bwd: {1 + BACKWARD_FLOP_FACTOR:g} x forward"
)
# the matmul peak's own timing: short, and enough samples for a stable best
PEAK_MIN_TIME_S = 0.3
PEAK_MIN_SAMPLES = 5


def set_tf32(enabled: bool) -> None:
    """TF32 for float32 matmuls and convolutions on CUDA: set explicitly, never left to the default."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _affinity() -> str | None:
    """The CPUs this thread may run on (the runner overwrites it with the worker's cores when it pins)."""
    from bench.measure.process import cpu_list

    return cpu_list(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else None


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def device_problem(device: str, dtype: str) -> str | None:
    """None when ``device`` exists and can multiply ``dtype`` matrices; else why not."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"device {device!r} is not available (available: {', '.join(available_devices())})"
        if (dev.index or 0) >= torch.cuda.device_count():
            return f"device {device!r} is not available (available: {', '.join(available_devices())})"
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        return f"device {device!r} is not available (available: {', '.join(available_devices())})"
    try:
        a = torch.ones(8, 8, device=dev, dtype=TORCH_DTYPES[dtype])
        torch.matmul(a, a)
        torch.softmax(a, dim=-1)
    except (RuntimeError, TypeError) as exc:
        return f"dtype {dtype} can not run on {device}: {first_line(exc)}"
    return None


def available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def free_bytes(device: str) -> int:
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    return int(psutil.virtual_memory().available)


def matmul_peak_flops(device: str, dtype: str, *, num_threads: int) -> float:
    """FLOP/s of a large square matmul: the roofline's ceiling for this device and dtype."""
    size = PEAK_MATMUL_SIZE[torch.device(device).type]
    a = torch.randn(size, size, device=device).to(TORCH_DTYPES[dtype])
    b = torch.randn(size, size, device=device).to(TORCH_DTYPES[dtype])
    stats = time_callable(
        lambda: torch.matmul(a, b),
        device=device,
        min_time_s=PEAK_MIN_TIME_S,
        min_samples=PEAK_MIN_SAMPLES,
        num_threads=num_threads,
    )
    # the fastest sample: a ceiling, and the reading least moved by a slow start (thread pool, page faults,
    # clock) that made the median of one run half of another's minutes later on the same VM
    return 2.0 * size**3 / stats.min_s


def collect_env(devices: list[str], dtypes: list[str], *, num_threads: int, tf32: bool = False) -> dict[str, Any]:
    """The environment of a sweep; the matmul peaks are measured in the sweep's math mode (TF32 or not)."""
    set_tf32(tf32)
    problems = [p for d in devices for t in dtypes if (p := device_problem(d, t))]
    env: dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_cores_physical": psutil.cpu_count(logical=False),
        "cpu_cores_logical": psutil.cpu_count(logical=True),
        "num_threads": num_threads,
        "cpu_affinity": _affinity(),
        "omp_proc_bind": os.environ.get("OMP_PROC_BIND"),
        "allocator": allocator_setting(os.environ),
        "memory_total_bytes": psutil.virtual_memory().total,
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn_version": None,
        "gpu_name": None,
        "gpu_uuid": None,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpu_driver": None,
        "tf32": tf32,
        "flop_convention": FLOP_CONVENTION,
        "attnbench_version": bench.__version__,
        "git_commit": _git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "peak_flops_per_s": {},
        "free_bytes": {},
    }
    cuda_devices = [d for d in devices if d.startswith("cuda")]
    if cuda_devices and torch.cuda.is_available():
        env["gpu_name"] = torch.cuda.get_device_name(torch.device(cuda_devices[0]))
        env["gpu_uuid"] = gpu_uuid(torch.device(cuda_devices[0]))
        env["gpu_driver"] = _nvidia_driver()
        env["cudnn_version"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if problems:
        return {"env": env, "problems": problems}
    for device in devices:
        env["free_bytes"][device] = free_bytes(device)
        for dtype in dtypes:
            env["peak_flops_per_s"][f"{device}/{dtype}"] = matmul_peak_flops(device, dtype, num_threads=num_threads)
    return {"env": env, "problems": []}


def gpu_uuid(device: torch.device) -> str | None:
    """The GPU's UUID as nvidia-smi writes it (``GPU-8f3c...``): which card measured a record."""
    try:
        uuid = str(torch.cuda.get_device_properties(device).uuid)
    except (AttributeError, RuntimeError):
        return None
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
