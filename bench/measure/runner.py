"""The sweep: schedule cases on an isolated worker process, enforce time-outs and the memory budget, resume.

Each case runs in a worker process (``bench.measure.process``) that is reused across cases while it
stays healthy. A case that raises is recorded by the worker (``error``, ``oom`` for an allocation
failure); a worker that passes the time-out is killed (``timeout``); one that dies is ``oom`` when the
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
from bench.measure.process import WorkerDied, WorkerProcess, WorkerTimeout
from bench.options import SweepOptions
from bench.results import FAILED_STATUSES, Problem, ResultsWriter, env_identity, iter_records, summarize_problems

ENV_PROBE_TIMEOUT_S = 180.0
# calls per case beyond the timed samples: warm-up and the memory run
EXTRA_CALLS = 2
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

    @property
    def overhead_share(self) -> float:
        return 1.0 - self.measured_s / self.wall_s if self.wall_s > 0 else 0.0

    def lines(self) -> list[str]:
        counts = ", ".join(f"{status} {n}" for status, n in sorted(self.counts.items())) or "nothing run"
        return [
            f"cases: {self.ran} run, {self.reused} already done; {counts}",
            f"wall time {self.wall_s:.1f} s, inside measured calls {self.measured_s:.1f} s, "
            f"harness overhead {100 * self.overhead_share:.1f}%",
        ]


def read_finished(path: Path) -> tuple[list[tuple[tuple, str, str]], list[str]]:
    """(environment identity, case key, status) of every case recorded in ``path``, and the lines skipped.

    One pass over the file, before the sweep probes its environment or runs anything: an unreadable
    file or another schema raises ResultsError here.
    """
    finished: list[tuple[tuple, str, str]] = []
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
        finished.append((env_identity(env if isinstance(env, dict) else {}), key, record["status"]))
    return finished, problems


def done_keys(finished: list[tuple[tuple, str, str]], env: dict[str, Any], *, retry_failed: bool) -> set[str]:
    """Keys of the finished cases measured in a comparable environment (less the failed ones, to retry them)."""
    identity = env_identity(env)
    return {
        key
        for record_identity, key, status in finished
        if record_identity == identity and not (retry_failed and status in FAILED_STATUSES)
    }


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
            self._worker = WorkerProcess(threads=self.threads, log_dir=self._log_dir)
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
                {"op": "env", "devices": devices, "dtypes": dtypes}, timeout_s=ENV_PROBE_TIMEOUT_S
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
            calls = self.options.measure.min_samples + EXTRA_CALLS
            if predicted_s * calls > self.options.timeout_s:
                return (
                    f"predicted {predicted_s:.1f} s per call (from n={last_len}); "
                    f"{calls} calls would pass the {self.options.timeout_s:.0f} s time-out"
                )
        return None

    def _outcome(self, case: Case, env: dict[str, Any], budget: dict[str, float]) -> dict[str, Any]:
        """The measured fields of the case's record, or why it was skipped."""
        unsupported = unsupported_reason(case)  # checked first: estimates assume a config that can run
        if unsupported:
            return {"status": "skipped", "message": unsupported}
        estimate = estimate_bytes(case)
        reason = self._skip_reason(case, estimate, budget)
        if reason is not None:
            result = {"status": "skipped", "message": reason}
        else:
            result = self._run_one(case, env["peak_flops_per_s"].get(f"{case.device}/{case.dtype}"))
        return {**result, "estimate_bytes": estimate}

    def _run_one(self, case: Case, peak_flops_per_s: float | None) -> dict[str, Any]:
        request = {
            "op": "case",
            "case": case.to_dict(),
            "options": self.options.measure.to_json(),
            "peak_flops_per_s": peak_flops_per_s,
        }
        try:
            return self.worker().request(request, timeout_s=self.options.timeout_s)
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
            done = set() if opts.force else done_keys(finished, env, retry_failed=opts.retry_failed)
            todo = [case for case in self.cases if case.key() not in done]
            budget = {device: opts.budget_bytes(free) for device, free in env["free_bytes"].items()}
            counts: Counter = Counter()
            measured_s = 0.0
            progress = _progress(len(todo), quiet=opts.quiet)
            try:
                for case in todo:
                    progress.set_postfix_str(case.label(), refresh=True)
                    result = self._outcome(case, env, budget)
                    record = {"run_id": self.run_id, "case": case.to_dict(), "impl_info": impl_info(case.impl)}
                    writer.write({**record, **result, "env": env})
                    counts[result["status"]] += 1
                    measured_s += result.get("measured_s") or 0.0
                    if result["status"] != "skipped" or case.family_key() not in self._curve_last:
                        self._curve_last[case.family_key()] = (case.seq_len, result["status"], result.get("median_s"))
                    if result["status"] != "ok" and opts.quiet:
                        self.log(f"{case.label()}: {result['status']}: {result.get('message')}")
                    progress.update(1)
            finally:
                progress.close()
                self._drop_worker()
        return SweepSummary(
            counts=counts,
            wall_s=time.perf_counter() - started,
            measured_s=measured_s,
            ran=len(todo),
            reused=len(self.cases) - len(todo),
        )

    def close(self) -> None:
        self._drop_worker()
        for path in self._log_dir.glob("*"):
            path.unlink(missing_ok=True)
        self._log_dir.rmdir()


def _progress(total: int, *, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=quiet, unit="case", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
