"""``attnbench crosscheck``: the harness's timings checked against methods written independently of it.

For each case the call is built as the worker builds it (``bench.measure.worker.prepare``) and timed,
in this process, by the harness (``bench.measure.timing.time_callable``, with the options a sweep's
worker process uses) and right after by an independent method:

* CPU: ``torch.utils.benchmark.Timer(...).blocked_autorange`` (its median);
* CUDA: a CUDA-event loop written here, apart from ``timing.py``, as Triton's ``do_bench`` does it:
  a few calls to estimate the duration, warm-up calls, then events around each of N calls (no cache
  flush, as the harness's default), the median; and, when Triton is importable,
  ``triton.testing.do_bench`` itself as a second independent value (it flushes the L2 cache before
  every call, so on a case whose inputs fit in L2 it may read slower than the harness).

The methods alternate in ``rounds`` rounds (the one that goes first changes every round), each round
gets the sweep's share of the minimum time and samples per worker process, and each method's value
is its best round's median, as a sweep takes a case's best round (``bench.pooling``): a machine whose
speed changes from second to second slows one method's round now and the other's next, and the best
round of each is the least disturbed. The ratio harness / independent is reported; it is not a test:
a ratio outside ``RATIO_RANGE`` is listed, never an error.

Each case runs in a worker process started as a sweep starts its workers (``bench.measure.process``:
the same pinning, threads and allocator setting), one at a time; a worker that dies or hangs is
that case's status (``crashed``, ``oom``, ``timeout``) and the next case gets a fresh one.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gc
import io
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from attention_impls import UnsupportedCase
from bench.cases import Case
from bench.measure.env import set_tf32
from bench.measure.lanes import needs_new_worker
from bench.measure.process import WorkerDied, WorkerProcess, WorkerTimeout, usable_cores
from bench.measure.timing import time_callable
from bench.measure.worker import is_oom, prepare
from bench.options import MeasureOptions
from bench.results import first_line

RATIO_RANGE = (0.9, 1.1)  # harness / independent inside this range agrees
CASE_TIMEOUT_S = 900.0  # one case's set-up and warm-up calls, beyond the methods' timed seconds
# the CUDA-event loop: calls to estimate one call's duration, warm-up time, bounds on the timed calls
CUDA_ESTIMATE_CALLS = 5
CUDA_WARMUP_S = 0.025
CUDA_MIN_CALLS = 5
CUDA_MAX_CALLS = 10_000
CPU_METHOD = "torch.utils.benchmark"
CUDA_METHOD = "cuda-event loop"
CSV_FIELDS = (
    "impl",
    "seq_len",
    "mode",
    "device",
    "dtype",
    "status",
    "message",
    "harness_median_s",
    "harness_timer",
    "independent_median_s",
    "independent_method",
    "ratio",
    "within",
    "triton_median_s",
    "triton_ratio",
    "harness_rounds_s",
    "independent_rounds_s",
    "rounds",
    "threads",
)


@dataclasses.dataclass(frozen=True)
class CrosscheckResult:
    """One case: each method's median in each round, or why it was not measured."""

    case: Case
    status: str  # ok | skipped | oom | error | timeout | crashed
    message: str | None = None
    harness_rounds_s: tuple[float, ...] = ()
    independent_rounds_s: tuple[float, ...] = ()
    triton_rounds_s: tuple[float, ...] = ()
    harness_timer: str | None = None
    independent_method: str | None = None
    threads: int | None = None

    @property
    def harness_median_s(self) -> float | None:
        return min(self.harness_rounds_s) if self.harness_rounds_s else None

    @property
    def independent_median_s(self) -> float | None:
        return min(self.independent_rounds_s) if self.independent_rounds_s else None

    @property
    def triton_median_s(self) -> float | None:
        return min(self.triton_rounds_s) if self.triton_rounds_s else None

    @property
    def ratio(self) -> float | None:
        return _ratio(self.harness_median_s, self.independent_median_s)

    @property
    def triton_ratio(self) -> float | None:
        return _ratio(self.harness_median_s, self.triton_median_s)

    @property
    def within(self) -> bool | None:
        ratio = self.ratio
        return None if ratio is None else RATIO_RANGE[0] <= ratio <= RATIO_RANGE[1]

    def to_json(self) -> dict[str, Any]:
        """What crosses the worker's pipe (``from_json`` reads it back)."""
        return {**dataclasses.asdict(self), "case": self.case.to_dict()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CrosscheckResult:
        rounds = {f"{m}_rounds_s": tuple(data[f"{m}_rounds_s"]) for m in ("harness", "independent", "triton")}
        return cls(**{**data, **rounds, "case": Case.from_dict(data["case"])})

    def row(self) -> dict[str, Any]:
        """The CSV row (``CSV_FIELDS``): numbers as numbers, absent values as None."""
        return {
            "impl": self.case.impl,
            "seq_len": self.case.seq_len,
            "mode": self.case.mode,
            "device": self.case.device,
            "dtype": self.case.dtype,
            "status": self.status,
            "message": self.message,
            "harness_median_s": self.harness_median_s,
            "harness_timer": self.harness_timer,
            "independent_median_s": self.independent_median_s,
            "independent_method": self.independent_method,
            "ratio": self.ratio,
            "within": self.within,
            "triton_median_s": self.triton_median_s,
            "triton_ratio": self.triton_ratio,
            "harness_rounds_s": ";".join(f"{s:.6g}" for s in self.harness_rounds_s),
            "independent_rounds_s": ";".join(f"{s:.6g}" for s in self.independent_rounds_s),
            "rounds": len(self.harness_rounds_s),
            "threads": self.threads,
        }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


# ---------------------------------------------------------------- the independent methods


def cpu_timer_median_s(fn: Callable[[], object], *, min_run_time_s: float) -> float:
    """``torch.utils.benchmark``'s median per call (its own block size and warm-up)."""
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return float(timer.blocked_autorange(min_run_time=min_run_time_s).median)


def cuda_event_median_s(fn: Callable[[], object], *, device: str | torch.device, min_run_time_s: float) -> float:
    """Median of CUDA events around each call, after a duration estimate and warm-up (as Triton's do_bench)."""
    dev = torch.device(device)

    def event() -> torch.cuda.Event:
        return torch.cuda.Event(enable_timing=True)

    with torch.cuda.device(dev):
        fn()
        torch.cuda.synchronize(dev)
        start, end = event(), event()
        start.record()
        for _ in range(CUDA_ESTIMATE_CALLS):
            fn()
        end.record()
        torch.cuda.synchronize(dev)
        estimate_s = max(start.elapsed_time(end) / 1e3 / CUDA_ESTIMATE_CALLS, 1e-7)
        for _ in range(max(1, int(CUDA_WARMUP_S / estimate_s))):
            fn()
        calls = min(CUDA_MAX_CALLS, max(CUDA_MIN_CALLS, int(min_run_time_s / estimate_s)))
        starts = [event() for _ in range(calls)]
        ends = [event() for _ in range(calls)]
        for begin, finish in zip(starts, ends, strict=True):
            begin.record()
            fn()
            finish.record()
        torch.cuda.synchronize(dev)
        times_ms = [begin.elapsed_time(finish) for begin, finish in zip(starts, ends, strict=True)]
    return statistics.median(times_ms) / 1e3


def triton_do_bench() -> Callable[..., Any] | None:
    """``triton.testing.do_bench`` when Triton can be imported, else None."""
    try:
        from triton.testing import do_bench
    except Exception:  # not installed, or installed without a working driver
        return None
    return do_bench


def triton_median_s(
    do_bench: Callable[..., Any], fn: Callable[[], object], *, device: str | torch.device, min_run_time_s: float
) -> float:
    """Triton's median (``quantiles=[0.5]``: accepted by every Triton version that has ``return_mode`` or not)."""
    with torch.cuda.device(torch.device(device)):
        value = do_bench(fn, warmup=25, rep=max(1, round(min_run_time_s * 1e3)), quantiles=[0.5])
    if isinstance(value, list | tuple):
        value = value[0]
    return float(value) / 1e3


# ---------------------------------------------------------------- one case, all cases


def physical_threads() -> int:
    """The sweep's default thread count: the physical cores it may use (a sweep's one CPU lane)."""
    return len(usable_cores())


def _empty_cache(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        with contextlib.suppress(Exception):
            torch.cuda.synchronize(torch.device(device))
            torch.cuda.empty_cache()


def _measure(case: Case, options: MeasureOptions, *, rounds: int) -> tuple[dict[str, list[float]], str | None]:
    """Each method's per-round medians (``harness``, ``independent``, ``triton``) and the harness's timer."""
    is_cuda = torch.device(case.device).type == "cuda"
    share_s = options.min_time_s / rounds  # a round gets what one of the sweep's worker processes gets
    do_bench = triton_do_bench() if is_cuda else None
    medians: dict[str, list[float]] = {"harness": [], "independent": [], "triton": []}
    timers: list[str] = []
    set_tf32(options.tf32)
    fn = prepare(case, seed=options.seed).fn
    fn()  # one call before any method, so none of them pays for the first
    if is_cuda:
        torch.cuda.synchronize(torch.device(case.device))

    def run_harness(number: int) -> None:
        stats = time_callable(
            fn,
            device=case.device,
            min_time_s=share_s,
            min_samples=options.samples_for(number, rounds),
            timer=options.timer,
            flush_cache=options.flush_cache,
        )
        timers.append(stats.timer)
        medians["harness"].append(stats.median_s)

    def run_independent(number: int) -> None:
        if is_cuda:
            medians["independent"].append(cuda_event_median_s(fn, device=case.device, min_run_time_s=share_s))
        else:
            medians["independent"].append(cpu_timer_median_s(fn, min_run_time_s=share_s))

    def run_triton(number: int) -> None:
        assert do_bench is not None
        medians["triton"].append(triton_median_s(do_bench, fn, device=case.device, min_run_time_s=share_s))

    methods = [run_harness, run_independent] + ([run_triton] if do_bench is not None else [])
    for number in range(rounds):
        shift = number % len(methods)  # the method that goes first changes every round
        for method in methods[shift:] + methods[:shift]:
            method(number)
    return medians, (timers[0] if timers else None)


def crosscheck_case(case: Case, options: MeasureOptions, *, rounds: int) -> CrosscheckResult:
    """Time one case by the harness and the independent method(s), interleaved; a case's fault is its status."""
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    threads = torch.get_num_threads()
    try:
        medians, timer = _measure(case, options, rounds=rounds)
    except UnsupportedCase as exc:
        return CrosscheckResult(case, "skipped", first_line(exc), threads=threads)
    except Exception as exc:
        status = "oom" if is_oom(exc) else "error"
        return CrosscheckResult(case, status, f"{type(exc).__name__}: {first_line(exc)}", threads=threads)
    finally:
        _empty_cache(case.device)  # the case's inputs and module are gone with _measure's frame
    is_cuda = torch.device(case.device).type == "cuda"
    return CrosscheckResult(
        case,
        "ok",
        harness_rounds_s=tuple(medians["harness"]),
        independent_rounds_s=tuple(medians["independent"]),
        triton_rounds_s=tuple(medians["triton"]),
        harness_timer=timer,
        independent_method=CUDA_METHOD if is_cuda else CPU_METHOD,
        threads=threads,
    )


def run_crosscheck(
    cases: list[Case],
    options: MeasureOptions,
    *,
    rounds: int,
    threads: int | None = None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> list[CrosscheckResult]:
    """Every case in turn, each in a worker process started as a sweep's (threads: the physical cores)."""
    threads = threads or physical_threads()
    timeout_s = CASE_TIMEOUT_S + 3 * options.min_time_s  # each of up to three methods takes min_time_s in all
    log_dir = Path(tempfile.mkdtemp(prefix="attnbench-crosscheck-"))
    worker: WorkerProcess | None = None
    results = []
    try:
        for index, case in enumerate(cases, 1):
            log(f"crosscheck [{index}/{len(cases)}] {case.label()}")
            worker = worker or WorkerProcess(threads=threads, log_dir=log_dir)
            request = {"op": "crosscheck", "case": case.to_dict(), "options": options.to_json(), "rounds": rounds}
            try:
                result = CrosscheckResult.from_json(worker.request(request, timeout_s=timeout_s))
                if needs_new_worker(case.device, result.status):  # a CUDA error may have broken the context
                    worker.close()
                    worker = None
            except (WorkerDied, WorkerTimeout) as exc:
                status, message = (
                    (exc.status, exc.message)
                    if isinstance(exc, WorkerDied)
                    else ("timeout", f"no result after {timeout_s:g} s; worker killed")
                )
                result = CrosscheckResult(case, status, message, threads=threads)
                worker.kill()
                worker.close()
                worker = None
            if result.status != "ok":
                log(f"  {result.status}: {result.message}")
            results.append(result)
    finally:
        if worker is not None:
            worker.close()
        shutil.rmtree(log_dir, ignore_errors=True)
    return results


# ---------------------------------------------------------------- output


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def to_csv(results: list[CrosscheckResult]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for result in results:
        writer.writerow({key: _cell(value) for key, value in result.row().items()})
    return buffer.getvalue()


def read_csv(text: str) -> list[dict[str, str]]:
    """The rows of a crosscheck CSV (as text), for a table printed later (``attnbench validate``)."""
    return list(csv.DictReader(io.StringIO(text)))


def _ms(value: str) -> str:
    return f"{float(value) * 1e3:.4g} ms" if value else "–"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows as ``to_csv`` writes them (text cells) or ``CrosscheckResult.row()`` gives them, as markdown."""
    rows = [{key: _cell(value) for key, value in row.items()} for row in rows]
    low, high = RATIO_RANGE
    with_triton = any(row.get("triton_median_s") for row in rows)
    header = ["impl", "n", "mode", "device", "dtype", "harness", "independent", "ratio", f"in [{low}, {high}]"]
    if with_triton:
        header += ["triton do_bench", "ratio to triton"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        if row["status"] != "ok":
            cells = [row["impl"], row["seq_len"], row["mode"], row["device"], row["dtype"]]
            cells += [f"{row['status']}: {row['message']}"] + ["–"] * (len(header) - 6)
        else:
            cells = [row["impl"], row["seq_len"], row["mode"], row["device"], row["dtype"]]
            cells += [
                f"{_ms(row['harness_median_s'])} ({row['harness_timer']})",
                f"{_ms(row['independent_median_s'])} ({row['independent_method']})",
                f"{float(row['ratio']):.3f}" if row["ratio"] else "–",
                row["within"] or "–",
            ]
            if with_triton:
                ratio = row.get("triton_ratio")
                cells += [_ms(row.get("triton_median_s", "")), f"{float(ratio):.3f}" if ratio else "–"]
        lines.append("| " + " | ".join(str(cell).replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines)
