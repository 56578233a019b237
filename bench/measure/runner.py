"""The sweep: schedule cases on isolated worker processes, enforce time-outs and the memory budget, resume.

Each case runs in a worker process (``bench.measure.worker``) that is reused across
cases while it stays healthy. A case that raises is recorded by the worker
(``error``, ``oom`` for an allocation failure); a worker that passes the
time-out is killed (``timeout``); one that dies is recorded as ``oom`` when
it was killed by SIGKILL that we did not send (the kernel's out-of-memory
killer) and as ``crashed`` otherwise (abort, segfault, exit). In every case the
worker is replaced and the sweep goes on. Each record is appended and synced
as soon as its case ends, so a killed sweep loses nothing finished, and the
same command run again skips what is already done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.cases import Case
from bench.results import ResultsWriter, env_identity, iter_records

ENV_PROBE_TIMEOUT_S = 180.0
# fwd+bwd keeps the forward's intermediates for the backward and adds gradients
BACKWARD_MEMORY_FACTOR = 3.0
# calls per case beyond the timed samples: warm-up and the memory run
EXTRA_CALLS = 2


class WorkerDied(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class WorkerTimeout(Exception):
    pass


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class WorkerProcess:
    """One ``python -m bench.measure.worker`` child, spoken to in JSON lines."""

    def __init__(self, *, threads: int, log_dir: Path) -> None:
        self._log = tempfile.NamedTemporaryFile(prefix="worker-", suffix=".log", dir=log_dir, delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.measure.worker", "--threads", str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            start_new_session=True,  # its own process group: a kill takes its children too
        )
        self._buffer = b""

    def request(self, payload: dict[str, Any], *, timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write((json.dumps(payload) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._death() from None
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerTimeout()
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise self._death()
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _death(self) -> WorkerDied:
        code = self.proc.wait()
        tail = self.stderr_tail()
        detail = f"; last output: {tail}" if tail else ""
        if code == -signal.SIGKILL:
            return WorkerDied("oom", f"worker killed by SIGKILL (the kernel's out-of-memory killer){detail}")
        if code < 0:
            return WorkerDied("crashed", f"worker died with {_signal_name(-code)}{detail}")
        return WorkerDied("crashed", f"worker exited with code {code}{detail}")

    def stderr_tail(self) -> str:
        try:
            lines = [ln.strip() for ln in Path(self._log.name).read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1][:300] if lines else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(WorkerDied, WorkerTimeout, OSError, ValueError):
                self.request({"op": "exit"}, timeout_s=5)
            self.kill()
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)


@dataclasses.dataclass
class SweepOptions:
    out: Path
    threads: int
    timeout_s: float = 300.0
    min_time_s: float = 0.5
    min_samples: int = 5
    seed: int = 0
    budget_bytes: float | None = None  # None: a fraction of the memory free at start
    budget_fraction: float = 0.6
    force: bool = False
    retry_failed: bool = False
    quiet: bool = False
    error_max_len: int = 4096


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


def estimate_bytes(case: Case) -> float:
    """What a case should need, from the implementation's own estimate (bytes)."""
    from attention_impls import get

    spec = get(case.impl, case.params_dict())
    attention = spec.memory_bytes(
        batch=case.batch,
        heads=case.heads,
        seq_len=case.seq_len,
        head_dim=case.head_dim,
        itemsize=case.itemsize,
        causal=case.causal,
    )
    tokens = case.batch * case.seq_len * case.d_model * case.itemsize
    if case.scope == "layers":
        from bench.measure.stack import stack_memory_bytes

        return stack_memory_bytes(
            spec,
            batch=case.batch,
            seq_len=case.seq_len,
            d_model=case.d_model,
            heads=case.heads,
            depth=case.depth,
            itemsize=case.itemsize,
            causal=case.causal,
            residual=case.residual,
            mode=case.mode,
        )
    inputs = 3 * tokens
    factor = BACKWARD_MEMORY_FACTOR if case.mode == "fwd+bwd" else 1.0
    return factor * attention + inputs * (2 if case.mode == "fwd+bwd" else 1)


def impl_info(name: str) -> dict[str, Any]:
    """The implementation's metadata, stored in each record so reports need no registry (and no torch)."""
    from attention_impls import get

    info = get(name).describe()
    info.pop("params")
    return info


def load_done(path: Path, env: dict[str, Any], *, retry_failed: bool) -> tuple[set[str], list[str]]:
    """Keys of the cases already finished in ``path`` under a comparable environment, and problems seen."""
    done: set[str] = set()
    problems: list[str] = []
    if not path.exists():
        return done, problems
    identity = env_identity(env)
    for _, record, problem in iter_records(path):
        if problem is not None:
            problems.append(str(problem))
            continue
        assert record is not None
        if env_identity(record.get("env", {})) != identity:
            continue
        if retry_failed and record["status"] in ("error", "timeout", "oom", "crashed"):
            continue
        done.add(Case.from_dict(record["case"]).key())
    return done, problems


class Sweep:
    """Runs a list of cases; see the module docstring."""

    def __init__(self, cases: list[Case], options: SweepOptions, *, log: Callable[[str], None]) -> None:
        self.cases = cases
        self.options = options
        self.log = log
        self.run_id = uuid.uuid4().hex[:12]
        self._log_dir = Path(tempfile.mkdtemp(prefix="attnbench-"))
        self._worker: WorkerProcess | None = None
        # per curve (every field but seq_len): the last finished length and its outcome
        self._curve_last: dict[tuple, tuple[int, str, float | None]] = {}

    # -- workers
    def worker(self) -> WorkerProcess:
        if self._worker is None or self._worker.proc.poll() is not None:
            self._worker = WorkerProcess(threads=self.options.threads, log_dir=self._log_dir)
        return self._worker

    def _drop_worker(self) -> None:
        if self._worker is not None:
            self._worker.kill()
            self._worker.close()
            self._worker = None

    def probe_env(self, devices: list[str], dtypes: list[str]) -> dict[str, Any]:
        """Environment metadata and matmul peaks, measured by a worker; problems with the request."""
        try:
            return self.worker().request(
                {"op": "env", "devices": devices, "dtypes": dtypes}, timeout_s=ENV_PROBE_TIMEOUT_S
            )
        except (WorkerDied, WorkerTimeout) as exc:
            self._drop_worker()
            raise RuntimeError(f"the worker could not start: {exc}") from None

    # -- scheduling decisions made before a case runs
    def _skip_reason(self, case: Case, budget: dict[str, float]) -> str | None:
        estimate = estimate_bytes(case)
        limit = budget.get(case.device)
        if limit is not None and estimate > limit:
            return f"estimated {estimate / 2**30:.2f} GiB exceeds the budget of {limit / 2**30:.2f} GiB"
        last = self._curve_last.get(case.family_key())
        if last is None:
            return None
        last_len, last_status, last_median = last
        if last_status in ("oom", "timeout", "crashed") and case.seq_len > last_len:
            return f"not run: n={last_len} already ended with {last_status}"
        if last_status == "ok" and last_median is not None and case.seq_len > last_len:
            # attention costs at most quadratic time: extrapolate from the previous length
            predicted_s = last_median * (case.seq_len / last_len) ** 2
            calls = self.options.min_samples + EXTRA_CALLS
            if predicted_s * calls > self.options.timeout_s:
                return (
                    f"predicted {predicted_s:.1f} s per call (from n={last_len}); "
                    f"{calls} calls would pass the {self.options.timeout_s:.0f} s time-out"
                )
        return None

    def _run_one(self, case: Case, case_options: dict[str, Any]) -> dict[str, Any]:
        worker = self.worker()
        try:
            return worker.request(
                {"op": "case", "case": case.to_dict(), "options": case_options}, timeout_s=self.options.timeout_s
            )
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

    def run(self, env: dict[str, Any], *, started: float | None = None) -> SweepSummary:
        """Run what is not done yet; ``started`` (perf_counter) counts start-up in the wall time."""
        started = time.perf_counter() if started is None else started
        opts = self.options
        done, problems = (set(), []) if opts.force else load_done(opts.out, env, retry_failed=opts.retry_failed)
        for problem in problems:
            self.log(f"warning: {problem}")
        todo = [case for case in self.cases if case.key() not in done]
        reused = len(self.cases) - len(todo)
        budget = {
            device: (opts.budget_bytes if opts.budget_bytes is not None else opts.budget_fraction * free)
            for device, free in env["free_bytes"].items()
        }
        counts: Counter = Counter()
        measured_s = 0.0
        progress = _progress(len(todo), quiet=opts.quiet)
        try:
            with ResultsWriter(opts.out) as writer:
                for case in todo:
                    progress.set_postfix_str(case.label(), refresh=True)
                    reason = self._skip_reason(case, budget)
                    if reason is not None:
                        result = {"status": "skipped", "message": reason}
                    else:
                        peak = env["peak_flops_per_s"].get(f"{case.device}/{case.dtype}")
                        case_options = {
                            "seed": opts.seed,
                            "min_time_s": opts.min_time_s,
                            "min_samples": opts.min_samples,
                            "peak_flops_per_s": peak,
                            "error_max_len": opts.error_max_len,
                        }
                        result = self._run_one(case, case_options)
                    result["estimate_bytes"] = estimate_bytes(case)
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
            counts=counts, wall_s=time.perf_counter() - started, measured_s=measured_s, ran=len(todo), reused=reused
        )

    def close(self) -> None:
        self._drop_worker()
        for path in self._log_dir.glob("*"):
            path.unlink(missing_ok=True)
        self._log_dir.rmdir()


def _progress(total: int, *, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=quiet, unit="case", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
