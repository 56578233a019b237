"""The sweep: schedule cases on isolated worker processes, enforce time-outs and the memory budget, resume.

The sweep runs in rounds, ``processes`` of them (``--processes``): round 0 measures every case (time,
memory, approximation error) from short to long, stopping a curve where it would fail; each later
round measures again, in a fresh worker process and in the opposite order, the cases that round 0
finished ``ok`` (time only), so each case's samples come from several processes spread over the
sweep, as pyperf's processes and asv's interleaved rounds do. Each round writes a record per case
(``process`` = the round); readers pool them (``bench.pooling``).

Within a round the worker process (``bench.measure.process``) is reused across cases while it
stays healthy; on an accelerator a case that is not ``ok`` replaces it (a sticky CUDA error, a
device-side assert or a failed allocation can leave the context broken for every later case). A case
that raises is recorded by the worker (``error``, ``oom`` for an allocation failure); a worker that passes the time-out is killed (``timeout``); one that dies is ``oom`` when the
kernel's out-of-memory killer killed it and ``crashed`` otherwise (abort, segfault, exit, a kill from
outside). In every case the worker is replaced and the sweep goes on.

The results file is opened first, under an exclusive lock (one run writes a file at a time); each
record is appended and synced as soon as its case ends, so a killed sweep loses nothing finished, and
the same command run again skips what is already done. A run that fails before its first record
leaves no file behind.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from bench.cases import Case, GridError
from bench.measure.plan import estimate_bytes, impl_info, unsupported_reason
from bench.measure.process import WorkerDied, WorkerProcess, WorkerTimeout, cpu_list, pinned_cores
from bench.measure.timing import WARMUP_CALLS
from bench.options import SweepOptions
from bench.results import FAILED_STATUSES, Problem, ResultsWriter, env_identity, iter_records, summarize_problems

ENV_PROBE_TIMEOUT_S = 180.0
# calls of a case's first worker process beyond its timed samples: the warm-up calls and the memory run
EXTRA_CALLS = WARMUP_CALLS + 1
# the quadratic extrapolation under-predicts where a longer curve leaves the caches (full at 8192 on
# a 2-core EPYC: predicted 50 s, timed out at 60 s); a case is skipped when this times it passes the time-out
PREDICTION_MARGIN = 1.5
# an earlier length of a curve that ended like this stops the curve: longer lengths would fail the same way
CURVE_STOPPING_STATUSES = ("oom", "timeout", "crashed")


class SweepError(Exception):
    """A sweep that can not start (results file, devices, worker): one line for the user."""


@dataclasses.dataclass
class SweepSummary:
    counts: Counter
    wall_s: float
    measured_s: float
    ran: int
    reused: int
    again: int = 0  # records of the later processes (rounds) of cases

    @property
    def overhead_share(self) -> float:
        return 1.0 - self.measured_s / self.wall_s if self.wall_s > 0 else 0.0

    def lines(self) -> list[str]:
        counts = ", ".join(f"{status} {n}" for status, n in sorted(self.counts.items())) or "nothing run"
        return [
            f"cases: {self.ran} run, {self.reused} already done; {counts}; {self.again} timed again in later processes",
            f"wall time {self.wall_s:.1f} s, inside measured calls {self.measured_s:.1f} s, "
            f"harness overhead {100 * self.overhead_share:.1f}%",
        ]


@dataclasses.dataclass(frozen=True)
class Finished:
    """What a results file says was done: one per record."""

    identity: tuple  # bench.results.env_identity of the record's environment
    key: str  # the case key
    process: int  # the round that measured it
    status: str


def read_finished(path: Path) -> tuple[list[Finished], list[str]]:
    """What every record of ``path`` finished, and the lines skipped.

    One pass over the file, before the sweep probes its environment or runs anything: an unreadable
    file or another schema raises ResultsError here.
    """
    finished: list[Finished] = []
    problems: list[str] = []
    for number, record, problem in iter_records(path):
        if problem is not None:
            problems.append(str(problem))
            continue
        assert record is not None
        try:
            key = Case.from_dict(record["case"]).key()
        except (GridError, TypeError) as exc:
            problems.append(str(Problem(str(path), number, f"invalid case ({exc})")))
            continue
        env = record.get("env")
        identity = env_identity(env if isinstance(env, dict) else {})
        process = record.get("process") or 0
        finished.append(Finished(identity, key, process if isinstance(process, int) else 0, record["status"]))
    return finished, problems


def done_keys(finished: list[Finished], env: dict[str, Any], *, retry_failed: bool) -> set[tuple[str, int]]:
    """(case key, process) of what was finished in a comparable environment (less the failures, to retry them)."""
    identity = env_identity(env)
    return {
        (f.key, f.process)
        for f in finished
        if f.identity == identity and not (retry_failed and f.status in FAILED_STATUSES)
    }


def first_statuses(finished: list[Finished], env: dict[str, Any]) -> dict[str, str]:
    """Per case key, how its latest process-0 record in a comparable environment ended."""
    identity = env_identity(env)
    return {f.key: f.status for f in finished if f.identity == identity and f.process == 0}


def needs_new_worker(case: Case, status: str) -> bool:
    """On an accelerator a case that ran and did not finish ok may leave the device context broken."""
    return status not in ("ok", "skipped") and not case.device.startswith("cpu")


class Sweep:
    """Runs a list of cases; see the module docstring."""

    def __init__(self, cases: list[Case], options: SweepOptions, *, log: Callable[[str], None]) -> None:
        self.cases = cases
        self.options = options
        self.log = log
        self.run_id = uuid.uuid4().hex[:12]
        self.threads = options.threads or psutil.cpu_count(logical=False) or 1
        self._log_dir = Path(tempfile.mkdtemp(prefix="attnbench-"))
        self._worker: WorkerProcess | None = None
        # per curve (every field but seq_len): the last finished length and its outcome
        self._curve_last: dict[tuple, tuple[int, str, float | None]] = {}

    # -- workers
    def worker(self) -> WorkerProcess:
        if self._worker is None or self._worker.proc.poll() is not None:
            self._worker = WorkerProcess(threads=self.threads, log_dir=self._log_dir, pin=self.options.pin)
        return self._worker

    def _drop_worker(self) -> None:
        if self._worker is not None:
            self._worker.kill()
            self._worker.close()
            self._worker = None

    def probe_env(self) -> dict[str, Any]:
        """Environment metadata and matmul peaks, measured by a worker; SweepError names what can not run."""
        devices = sorted({case.device for case in self.cases})
        dtypes = sorted({case.dtype for case in self.cases})
        try:
            probe = self.worker().request(
                {"op": "env", "devices": devices, "dtypes": dtypes, "options": self.options.measure.to_json()},
                timeout_s=ENV_PROBE_TIMEOUT_S,
            )
        except (WorkerDied, WorkerTimeout) as exc:
            self._drop_worker()
            raise SweepError(f"the worker could not start: {exc}") from None
        if probe["problems"]:
            raise SweepError("; ".join(probe["problems"]))
        return probe["env"]

    # -- scheduling decisions made before a case runs
    def _skip_reason(self, case: Case, estimate: float, budget: dict[str, float]) -> str | None:
        limit = budget.get(case.device)
        if limit is not None and estimate > limit:
            return f"estimated {estimate / 2**30:.2f} GiB exceeds the budget of {limit / 2**30:.2f} GiB"
        last = self._curve_last.get(case.family_key())
        if last is None:
            return None
        last_len, last_status, last_median = last
        if last_status in CURVE_STOPPING_STATUSES and case.seq_len > last_len:
            return f"not run: n={last_len} already ended with {last_status}"
        if last_status == "ok" and last_median is not None and case.seq_len > last_len:
            # attention costs at most quadratic time: extrapolate from the previous length
            predicted_s = last_median * (case.seq_len / last_len) ** 2
            calls = self.options.measure.samples_for(0, self.options.processes) + EXTRA_CALLS
            if predicted_s * calls * PREDICTION_MARGIN > self.options.timeout_s:
                return (
                    f"predicted {predicted_s:.1f} s per call (from n={last_len}); "
                    f"{calls} calls with a margin of {PREDICTION_MARGIN:g}x would pass the "
                    f"{self.options.timeout_s:.0f} s time-out"
                )
        return None

    def _outcome(self, case: Case, env: dict[str, Any], budget: dict[str, float], process: int) -> dict[str, Any]:
        """The measured fields of the case's record, or why it was skipped."""
        peak = env["peak_flops_per_s"].get(f"{case.device}/{case.dtype}")
        if process > 0:  # round 0 ran it to the end: only time it again
            return self._run_one(case, peak, process)
        unsupported = unsupported_reason(case)  # checked first: estimates assume a config that can run
        if unsupported:
            return {"status": "skipped", "message": unsupported}
        estimate = estimate_bytes(case)
        reason = self._skip_reason(case, estimate, budget)
        result = {"status": "skipped", "message": reason} if reason else self._run_one(case, peak, process)
        return {**result, "estimate_bytes": estimate}

    def _run_one(self, case: Case, peak_flops_per_s: float | None, process: int) -> dict[str, Any]:
        request = {
            "op": "case",
            "case": case.to_dict(),
            "options": self.options.measure.to_json(),
            "peak_flops_per_s": peak_flops_per_s,
            "process": process,
            "processes": self.options.processes,
        }
        try:
            result = self.worker().request(request, timeout_s=self.options.timeout_s)
            if needs_new_worker(case, result["status"]):
                self._drop_worker()
            return result
        except WorkerTimeout:
            self._drop_worker()
            return {
                "status": "timeout",
                "message": f"passed the time-out of {self.options.timeout_s:g} s",
                "wall_s": self.options.timeout_s,
            }
        except WorkerDied as exc:
            self._worker = None
            return {"status": exc.status, "message": exc.message}

    def run(self, *, started: float | None = None) -> SweepSummary:
        """Run what is not done yet; ``started`` (perf_counter) counts start-up in the wall time.

        Raises SweepError (or bench.results.ResultsError) before any case runs when the sweep can not start.
        """
        started = time.perf_counter() if started is None else started
        opts = self.options
        with ResultsWriter(opts.out) as writer:
            finished, problems = read_finished(opts.out)
            for line in summarize_problems(problems):
                self.log(line)
            env = self.probe_env()
            env["cpu_affinity"] = cpu_list(pinned_cores(self.threads)) if opts.pin else env.get("cpu_affinity")
            for line in device_lines(self.cases, env):
                self.log(line)
            done = set() if opts.force else done_keys(finished, env, retry_failed=opts.retry_failed)
            first = {} if opts.force else first_statuses(finished, env)
            budget = {device: opts.budget_bytes(free) for device, free in env["free_bytes"].items()}
            counts: Counter = Counter()
            measured_s = 0.0
            ran = again = 0
            todo = [case for case in self.cases if (case.key(), 0) not in done]

            def later_runs(may_run: Callable[[str], bool]) -> int:
                """Records the later rounds will write for the cases ``may_run`` admits."""
                keys = [case.key() for case in self.cases]
                return sum(may_run(key) and (key, p) not in done for key in keys for p in range(1, opts.processes))

            progress = _progress(len(todo) + later_runs(lambda key: True), quiet=opts.quiet)
            try:
                for process in range(opts.processes):
                    order = self.cases if process % 2 == 0 else self.cases[::-1]
                    for case in order:
                        key = case.key()
                        if (key, process) in done or (process > 0 and first.get(key) != "ok"):
                            continue
                        progress.set_postfix_str(f"{case.label()} [process {process}]", refresh=True)
                        result = self._outcome(case, env, budget, process)
                        record = {"run_id": self.run_id, "case": case.to_dict(), "impl_info": impl_info(case.impl)}
                        writer.write({**record, **result, "process": process, "processes": opts.processes, "env": env})
                        measured_s += result.get("measured_s") or 0.0
                        if process == 0:
                            ran += 1
                            counts[result["status"]] += 1
                            first[key] = result["status"]
                            if result["status"] != "skipped" or case.family_key() not in self._curve_last:
                                self._curve_last[case.family_key()] = (
                                    case.seq_len,
                                    result["status"],
                                    result.get("median_s"),
                                )
                        else:
                            again += 1
                        if result["status"] != "ok" and opts.quiet:
                            self.log(f"{case.label()} [process {process}]: {result['status']}: {result.get('message')}")
                        progress.update(1)
                    if process == 0:  # the later rounds run only what round 0 finished ok
                        progress.total = ran + later_runs(lambda key: first.get(key) == "ok")
                        progress.refresh()
                    self._drop_worker()  # each round in a fresh process
            finally:
                progress.close()
                self._drop_worker()
        return SweepSummary(
            counts=counts,
            wall_s=time.perf_counter() - started,
            measured_s=measured_s,
            ran=ran,
            reused=len(self.cases) - len(todo),
            again=again,
        )

    def close(self) -> None:
        self._drop_worker()
        for path in self._log_dir.glob("*"):
            path.unlink(missing_ok=True)
        self._log_dir.rmdir()


def device_lines(cases: list[Case], env: dict[str, Any]) -> list[str]:
    """What the sweep runs on, a line per device: printed at the start of every run."""
    lines = []
    for device in dict.fromkeys(case.device for case in cases):
        dtypes = ", ".join(dict.fromkeys(case.dtype for case in cases if case.device == device))
        if device.startswith("cuda"):
            what = f"{env.get('gpu_name')}, driver {env.get('gpu_driver')}, CUDA {env.get('cuda_version')}"
            what += f", TF32 {'on' if env.get('tf32') else 'off'}"
        elif device == "mps":
            what = "Apple GPU (MPS)"
        else:
            what = f"{env.get('cpu_model')}, {env.get('num_threads')} threads, affinity {env.get('cpu_affinity')}"
        lines.append(f"device: {device} ({what}); dtypes: {dtypes}")
    return lines


def _progress(total: int, *, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=quiet, unit="case", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
