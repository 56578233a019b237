"""One worker child process: start it, speak JSON lines to it, and say what happened when it dies.

A worker that exits with SIGKILL we did not send was killed either by the kernel's out-of-memory killer
or by someone else (``kill -9``, a job scheduler). The kernel counts its OOM kills (``oom_kill`` in
``/proc/vmstat``, global and cgroup kills alike): the count is read when a request is sent and again
when the worker is found dead, and only a rise makes the death ``oom``. Any other death is ``crashed``,
with the signal or exit code in words.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psutil

_VMSTAT = Path("/proc/vmstat")


class WorkerDied(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class WorkerTimeout(Exception):
    pass


def oom_kill_count(vmstat: Path = _VMSTAT) -> int | None:
    """How many processes the kernel's out-of-memory killer has killed since boot (None: not counted here)."""
    try:
        for line in vmstat.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        return None
    return None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def classify_death(returncode: int, *, oom_kills_before: int | None, oom_kills_after: int | None) -> WorkerDied:
    """The status and one-line message of a worker that ended on its own (not killed by the runner)."""
    if returncode == -signal.SIGKILL:
        if oom_kills_before is None or oom_kills_after is None:
            return WorkerDied(
                "crashed",
                "worker killed by SIGKILL (by the out-of-memory killer or another process: "
                "this system does not count OOM kills)",
            )
        if oom_kills_after > oom_kills_before:
            return WorkerDied("oom", "worker killed by the kernel's out-of-memory killer (SIGKILL)")
        return WorkerDied("crashed", "worker killed by SIGKILL from outside (not the kernel's out-of-memory killer)")
    if returncode < 0:
        return WorkerDied("crashed", f"worker died with {_signal_name(-returncode)}")
    return WorkerDied("crashed", f"worker exited with code {returncode}")


def worker_environ(environ: Mapping[str, str], *, pin: bool) -> dict[str, str]:
    """The worker's environment: pinned, each OpenMP thread bound to a core of its own (unless the user set it)."""
    env = dict(environ)
    if pin:
        env.setdefault("OMP_PROC_BIND", "close")
        env.setdefault("OMP_PLACES", "cores")
    return env


def allocator_setting(environ: Mapping[str, str]) -> str:
    """The C allocator's setting, for the record: glibc's ``MALLOC_*`` variables and ``LD_PRELOAD`` (a
    jemalloc or tcmalloc, say) as set, or ``default``. Both change what a CPU timing includes."""
    names = sorted(name for name in environ if name.startswith("MALLOC_") or name == "LD_PRELOAD")
    return " ".join(f"{name}={environ[name]}" for name in names) or "default"


def pinned_cores(threads: int) -> list[int] | None:
    """The CPUs a pinned worker runs on: the first ``threads`` physical cores this process may use, as a sweep's
    one CPU lane (None: no affinity here)."""
    if not can_pin():
        return None
    return usable_cores()[: max(1, threads)]


def usable_cores() -> list[int]:
    """One CPU per physical core this process may run on (the first of its hyperthreads), in order.

    Where the system has no CPU affinity (macOS), nominal numbers for the physical cores: lanes there are
    not pinned (``can_pin``).
    """
    if not hasattr(os, "sched_getaffinity"):
        return list(range(psutil.cpu_count(logical=False) or os.cpu_count() or 1))
    cores, seen = [], set()
    for cpu in sorted(os.sched_getaffinity(0)):
        siblings = _thread_siblings(cpu)
        if siblings not in seen:
            seen.add(siblings)
            cores.append(cpu)
    return cores


def can_pin() -> bool:
    """Whether workers can be confined to cores here (Linux)."""
    return hasattr(os, "sched_setaffinity")


def _thread_siblings(cpu: int) -> frozenset[int]:
    """The CPUs that are hyperthreads of one core with ``cpu`` (Linux sysfs; ``{cpu}`` where unknown)."""
    try:
        text = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip()
    except OSError:
        return frozenset({cpu})
    return frozenset(parse_cpu_list(text)) or frozenset({cpu})


def parse_cpu_list(text: str) -> list[int]:
    """``0-3,8`` -> ``[0, 1, 2, 3, 8]`` (the kernel's CPU list format; malformed text gives [])."""
    cpus: list[int] = []
    try:
        for part in filter(None, text.split(",")):
            first, _, last = part.partition("-")
            cpus += range(int(first), int(last or first) + 1)
    except ValueError:
        return []
    return cpus


_PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's ``prctl`` (Linux), looked up once in the sweep's process: nothing is loaded between fork and exec."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(prctl: Callable[..., int] | None, parent_pid: int) -> None:
    """In a worker before it starts (Linux): have the kernel SIGKILL it when the sweep that started it dies, so a
    sweep killed from outside (SIGTERM, SIGKILL) leaves no worker computing a long case; elsewhere nothing.

    Exits at once when ``parent_pid`` is no longer the parent (the sweep died before the signal was asked for).
    The signal follows the thread that started the worker: the sweep starts them from its main thread.
    """
    if prctl is None or prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        return
    if os.getppid() != parent_pid:
        os._exit(1)


def _prepare_worker(*, cores: list[int] | None, prctl: Callable[..., int] | None, parent_pid: int) -> None:
    """Run in the worker between fork and exec."""
    die_with_parent(prctl, parent_pid)
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)


def cpu_list(cpus: list[int] | None) -> str | None:
    """CPUs as ranges, e.g. ``0-3,8`` (None stays None)."""
    if not cpus:
        return None
    ranges, start = [], cpus[0]
    for previous, cpu in itertools.pairwise([*cpus, None]):
        if cpu != previous + 1:
            ranges.append(f"{start}-{previous}" if previous != start else str(start))
            start = cpu
    return ",".join(ranges)


class WorkerProcess:
    """One ``python -m bench.measure.worker`` child, spoken to in JSON lines."""

    def __init__(
        self,
        *,
        threads: int,
        log_dir: Path,
        pin: bool = True,
        cores: tuple[int, ...] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """``pin``: confined to ``cores`` (default: the first ``threads`` CPUs); ``environ``: default this process's."""
        pinned = (list(cores) if cores is not None else pinned_cores(threads)) if pin else None
        self._log = tempfile.NamedTemporaryFile(prefix="worker-", suffix=".log", dir=log_dir, delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.measure.worker", "--threads", str(threads)],
            env=worker_environ(os.environ if environ is None else environ, pin=pin),
            preexec_fn=functools.partial(_prepare_worker, cores=pinned, prctl=_prctl(), parent_pid=os.getpid()),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            start_new_session=True,  # its own process group: a kill takes its children too
        )
        self._buffer = b""
        self._oom_kills_before: int | None = None

    def request(self, payload: dict[str, Any], *, timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._oom_kills_before = oom_kill_count()
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
        died = classify_death(code, oom_kills_before=self._oom_kills_before, oom_kills_after=oom_kill_count())
        tail = self.stderr_tail()
        if tail:
            died.message = f"{died.message}; last output: {tail}"
        return died

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
