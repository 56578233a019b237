"""Run cases in a process of its own and report one record per case.

The parent (``bench.measure.runner``) starts ``python -m bench.measure.worker`` and speaks
JSON lines to it: a request on stdin, a reply on the protocol stream (the
process's original stdout; anything the measured code prints goes to stderr).
The worker only measures; the parent decides what to run, enforces time-outs
and replaces a worker that dies.

Requests:
  {"op": "env", "devices": [...], "dtypes": [...]}   -> environment metadata, matmul peaks, problems
  {"op": "case", "case": {...}, "options": {...}}     -> the measured fields of one record
  {"op": "exit"}
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

import bench
from attention_impls import UnsupportedCase, get, registry
from bench.cases import Case
from bench.measure.memory import measure_peak
from bench.measure.timing import time_callable

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
PEAK_MATMUL_SIZE = {"cpu": 2048, "cuda": 8192, "mps": 4096}
ERROR_QUERY_CHUNK = 512  # query rows per step of the float64 reference (memory chunk x n)
PEAKED_SCORE_STD = 4.0  # peaked inputs: q and k scaled so that the attention scores have this standard deviation


# ---------------------------------------------------------------- environment


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
        a = torch.ones(8, 8, device=dev, dtype=DTYPES[dtype])
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
    a = torch.randn(size, size, device=device).to(DTYPES[dtype])
    b = torch.randn(size, size, device=device).to(DTYPES[dtype])
    stats = time_callable(lambda: torch.matmul(a, b), min_time_s=0.3, min_samples=5, num_threads=num_threads)
    return 2.0 * size**3 / stats.median_s


def collect_env(devices: list[str], dtypes: list[str], *, num_threads: int) -> dict[str, Any]:
    problems = [p for d in devices for t in dtypes if (p := device_problem(d, t))]
    env: dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_cores_physical": psutil.cpu_count(logical=False),
        "cpu_cores_logical": psutil.cpu_count(logical=True),
        "num_threads": num_threads,
        "memory_total_bytes": psutil.virtual_memory().total,
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "gpu_name": None,
        "gpu_driver": None,
        "attnbench_version": bench.__version__,
        "git_commit": _git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "peak_flops_per_s": {},
        "free_bytes": {},
    }
    cuda_devices = [d for d in devices if d.startswith("cuda")]
    if cuda_devices and torch.cuda.is_available():
        env["gpu_name"] = torch.cuda.get_device_name(torch.device(cuda_devices[0]))
        env["gpu_driver"] = _nvidia_driver()
    if problems:
        return {"env": env, "problems": problems}
    for device in devices:
        env["free_bytes"][device] = free_bytes(device)
        for dtype in dtypes:
            env["peak_flops_per_s"][f"{device}/{dtype}"] = matmul_peak_flops(device, dtype, num_threads=num_threads)
    return {"env": env, "problems": []}


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


# ---------------------------------------------------------------- one case


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def synchronize(device: str) -> None:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()


def exact_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, shared_qk: bool
) -> torch.Tensor:
    """Exact attention in float64 on the CPU, computed a block of queries at a time (memory chunk x n)."""
    q, k, v = (t.detach().to("cpu", torch.float64) for t in (q, k, v))
    if shared_qk:
        k = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    seq_len = q.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    key_pos = torch.arange(seq_len)
    out = torch.empty_like(v)
    for start in range(0, seq_len, ERROR_QUERY_CHUNK):
        stop = min(seq_len, start + ERROR_QUERY_CHUNK)
        scores = torch.matmul(q[:, :, start:stop], k.transpose(-2, -1)) * scale  # (batch, heads, chunk, seq_len)
        query_pos = torch.arange(start, stop).unsqueeze(1)
        allowed = key_pos.unsqueeze(0) <= query_pos if causal else torch.ones(stop - start, seq_len, dtype=torch.bool)
        if shared_qk:
            others = allowed & (key_pos.unsqueeze(0) != query_pos)
            allowed = torch.where(others.any(dim=-1, keepdim=True), others, allowed)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, :, start:stop] = torch.matmul(torch.softmax(scores, dim=-1), v)  # (batch, heads, chunk, head_dim)
    return out


def peaked_scale(head_dim: int, *, shared_qk: bool) -> float:
    """The factor on standard-normal q and k that gives scores q.k/sqrt(d) a spread of PEAKED_SCORE_STD.

    Separate keys: q.k/sqrt(d) with q, k ~ N(0, s^2) has standard deviation s^2. Shared query-key (the keys
    are the queries normalized to unit length): q_i.q_j/|q_j|/sqrt(d) has standard deviation s/sqrt(d), so
    random inputs give nearly uniform attention there and need a larger factor to peak.
    """
    if shared_qk:
        return PEAKED_SCORE_STD * math.sqrt(head_dim)
    return math.sqrt(PEAKED_SCORE_STD)


def approximation_errors(module, spec, q, k, v, *, causal: bool) -> dict[str, float]:
    """rel_error = ||out - exact|| / ||exact|| on the timed (random) inputs and on peaked ones."""
    errors = {}
    peaked = peaked_scale(q.shape[-1], shared_qk=spec.shared_qk)
    with torch.no_grad():
        for label, scale in (("rel_error", 1.0), ("rel_error_peaked", peaked)):
            qs, ks = q * scale, k * scale
            out = module(qs, ks, v, causal=causal).to("cpu", torch.float64)
            exact = exact_reference(qs, ks, v, causal=causal, shared_qk=spec.shared_qk)
            errors[label] = float((out - exact).norm() / exact.norm())
    return errors


def _layer_stack(spec, case: Case, dtype: torch.dtype) -> torch.nn.Module:
    from bench.measure.stack import TransformerStack

    stack = TransformerStack(
        spec,
        depth=case.depth,
        d_model=case.d_model,
        heads=case.heads,
        seq_len=case.seq_len,
        residual=case.residual,
        causal=case.causal,
    )
    return stack.to(device=case.device, dtype=dtype)


def layer_stack_flops(spec, case: Case) -> float:
    """FLOPs of one call of the layer stack (projections, feed-forward and attention; backward included)."""
    from bench.measure.stack import stack_flops

    return float(
        stack_flops(
            spec,
            depth=case.depth,
            batch=case.batch,
            seq_len=case.seq_len,
            d_model=case.d_model,
            heads=case.heads,
            causal=case.causal,
            residual=case.residual,
            mode=case.mode,
        )
    )


def prepare(case: Case, *, seed: int) -> tuple[Callable[[], object], float, Callable[[], dict[str, float]] | None]:
    """The callable to measure, its FLOPs, and how to compute its approximation error (or None)."""
    spec = get(case.impl, case.params_dict())
    dtype = DTYPES[case.dtype]
    reason = spec.unsupported_reason(
        seq_len=case.seq_len, head_dim=case.head_dim, causal=case.causal, device=case.device, dtype=dtype
    )
    if reason:
        raise UnsupportedCase(reason)
    torch.manual_seed(seed)
    grad = case.mode == "fwd+bwd"
    if case.scope == "layers":
        module = _layer_stack(spec, case, dtype)
        inputs = [torch.randn(case.batch, case.seq_len, case.d_model, device=case.device, dtype=dtype)]
        flops = layer_stack_flops(spec, case)

        def forward():
            return module(inputs[0])

    else:
        module = spec.build(
            seq_len=case.seq_len, heads=case.heads, head_dim=case.head_dim, device=case.device, dtype=dtype
        )
        shape = (case.batch, case.heads, case.seq_len, case.head_dim)
        inputs = [torch.randn(shape, device=case.device, dtype=dtype) for _ in range(3)]
        flops = spec.flops(
            batch=case.batch, heads=case.heads, seq_len=case.seq_len, head_dim=case.head_dim, causal=case.causal
        )

        def forward():
            return module(*inputs, causal=case.causal)

    errors = None
    if case.scope == "attention" and not spec.exact and case.mode == "fwd":

        def errors():
            return approximation_errors(module, spec, *inputs, causal=case.causal)

    if not grad:
        module.requires_grad_(False)

        def fn():
            with torch.no_grad():
                return forward()

        return fn, flops, errors
    for tensor in inputs:
        tensor.requires_grad_(True)
    leaves = [*inputs, *module.parameters()]

    def fn():
        for leaf in leaves:
            leaf.grad = None
        out = forward()
        out.float().sum().backward()

    if case.scope == "layers":
        return fn, flops, errors  # stack_flops counts the backward (and the reversible recomputation)
    # backward of attention costs about twice its forward (two matmuls per forward matmul)
    return fn, 3.0 * flops, errors


def run_case(case: Case, options: dict[str, Any]) -> dict[str, Any]:
    """Measure one case; never raises (the outcome is in ``status``)."""
    started = time.perf_counter()
    result: dict[str, Any] = {"status": "ok", "message": None}
    try:
        fn, flops, errors = prepare(case, seed=options.get("seed", 0))
        stats = time_callable(
            fn,
            min_time_s=options.get("min_time_s", 0.5),
            min_samples=options.get("min_samples", 5),
            num_threads=torch.get_num_threads(),
        )
        memory = measure_peak(fn, device=case.device)
        peak_flops = options.get("peak_flops_per_s")
        result.update(
            median_s=stats.median_s,
            iqr_s=stats.iqr_s,
            min_s=stats.min_s,
            mean_s=stats.mean_s,
            samples=stats.samples,
            n_samples=stats.n_samples,
            calls_per_sample=stats.calls_per_sample,
            noisy=stats.noisy,
            measured_s=stats.measured_s,
            peak_bytes=memory.peak_bytes,
            rss_peak_bytes=memory.rss_peak_bytes,
            rss_before_bytes=memory.rss_before_bytes,
            memory_method=memory.method,
            flops=flops,
            achieved_flops_per_s=flops / stats.median_s if stats.median_s > 0 else None,
            roofline=(flops / stats.median_s / peak_flops) if peak_flops and stats.median_s > 0 else None,
        )
        if errors is not None and case.seq_len <= options.get("error_max_len", 4096):
            result.update(errors())
    except UnsupportedCase as exc:
        result = {"status": "skipped", "message": first_line(exc)}
    except registry.RegistryError as exc:
        result = {"status": "error", "message": first_line(exc)}
    except Exception as exc:
        status = "oom" if is_oom(exc) else "error"
        result = {"status": status, "message": f"{type(exc).__name__}: {first_line(exc)}"}
        if status == "error":
            traceback.print_exc(file=sys.stderr)
    finally:
        with contextlib.suppress(Exception):
            synchronize(case.device)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result["wall_s"] = time.perf_counter() - started
    return result


# ---------------------------------------------------------------- protocol


def serve(proto_in, proto_out) -> None:
    for line in proto_in:
        if not line.strip():
            continue
        request = json.loads(line)
        op = request.get("op")
        if op == "exit":
            return
        if op == "env":
            reply = collect_env(request["devices"], request["dtypes"], num_threads=torch.get_num_threads())
        elif op == "case":
            reply = run_case(Case.from_dict(request["case"]), request.get("options", {}))
        else:
            reply = {"status": "error", "message": f"unknown op {op!r}"}
        proto_out.write(json.dumps(reply) + "\n")
        proto_out.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="attnbench worker (started by the sweep runner)")
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # the protocol keeps the original stdout; whatever the measured code prints goes to stderr
    proto_out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin, proto_out)


if __name__ == "__main__":
    main()
