"""The sweep: schedule cases on isolated worker processes, enforce time-outs and the memory budget, resume.

The cases run on lanes (``bench.measure.lanes``: a worker per device, or per disjoint set of cores) that
an executor provides (``bench.measure.executor``: ``local`` on this machine, ``ray`` on a cluster); this
module decides what runs where and when, the same for every executor. Lanes run in parallel where their
cores allow. A curve (every field of a case but ``seq_len``) runs on one kind of lane (lanes whose
environments share an identity: one GPU model on one host, say), so its lengths are comparable, and in
round 0 one length at a time, short to long, whichever lane of its kind is free: the early stop along a
curve works when its lengths run on different workers. A case's record names its lane and executor.

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
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.cases import Case, GridError
from bench.measure.executor import Executor, make_executor
from bench.measure.lanes import Lane, LaneError
from bench.measure.plan import estimate_bytes, impl_info, unsupported_reason
from bench.measure.process import cpu_list
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
# devices whose cases compute in the host's memory: their lanes on one host share its budget
HOST_MEMORY_DEVICES = ("cpu", "mps")


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
    lanes: int = 1  # lanes that ran cases side by side

    @property
    def overhead_share(self) -> float:
        """The share of the lanes' time outside measured calls (as if every lane were busy from start to end)."""
        return 1.0 - self.measured_s / (self.wall_s * self.lanes) if self.wall_s > 0 else 0.0

    def lines(self) -> list[str]:
        counts = ", ".join(f"{status} {n}" for status, n in sorted(self.counts.items())) or "nothing run"
        lanes = f" over {self.lanes} lanes" if self.lanes > 1 else ""
        return [
            f"cases: {self.ran} run, {self.reused} already done; {counts}; {self.again} timed again in later processes",
            f"wall time {self.wall_s:.1f} s, inside measured calls {self.measured_s:.1f} s{lanes}, "
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


def done_keys(finished: list[Finished], *, retry_failed: bool) -> set[tuple[tuple, str, int]]:
    """(environment identity, case key, process) of what was finished (less the failures, to retry them)."""
    return {(f.identity, f.key, f.process) for f in finished if not (retry_failed and f.status in FAILED_STATUSES)}


def first_statuses(finished: list[Finished]) -> dict[tuple[tuple, str], str]:
    """Per (environment identity, case key), how its latest process-0 record ended."""
    return {(f.identity, f.key): f.status for f in finished if f.process == 0}


class Sweep:
    """Runs a list of cases; see the module docstring."""

    def __init__(
        self,
        cases: list[Case],
        options: SweepOptions,
        *,
        log: Callable[[str], None],
        devices: list[str] | None = None,
        executor: Executor | None = None,
    ) -> None:
        """``devices``: the lanes to run on, as ``--devices`` names them (default: the cases' devices)."""
        self.cases = cases
        self.options = options
        self.log = log
        self.run_id = uuid.uuid4().hex[:12]
        devices = devices or list(dict.fromkeys(case.device for case in cases)) or ["cpu"]
        self.executor = executor or make_executor(options.executor, devices, options)
        self.lanes: list[Lane] = []
        self._last_used: dict[str, int] = {}  # lane name -> when it was last given a case (spreads the work)
        self._dispatched = 0
        # per curve (every field but seq_len): the last finished length and its outcome, and the kind of lane
        # (environment identity) that measures it
        self._curve_last: dict[tuple, tuple[int, str, float | None]] = {}
        self._curve_kind: dict[tuple, tuple] = {}
        self._kinds: dict[str, tuple] = {}  # lane name -> its kind: the identity of its environment, once probed

    # -- lanes
    def start_lanes(self) -> None:
        """Lay the lanes out and probe each one's environment (SweepError names what can not run)."""
        try:
            self.lanes = self.executor.start()
        except LaneError as exc:
            raise SweepError(str(exc)) from None
        requests = {}
        for lane in self.lanes:
            dtypes = sorted({case.dtype for case in self.cases if case.device == lane.device}) or ["float32"]
            options = self.options.measure.to_json()
            requests[lane.name] = {"op": "env", "devices": [lane.device], "dtypes": dtypes, "options": options}
        problems = []
        for lane, reply in self._run_all(requests, timeout_s=ENV_PROBE_TIMEOUT_S):
            where = f"lane {lane.name}: " if len(self.lanes) > 1 else ""
            if "env" not in reply:  # the worker died or hung
                problems.append(f"{where}the worker could not start: {reply.get('message')}")
                continue
            problems += [f"{where}{problem}" for problem in reply["problems"]]
            lane.env = reply["env"]
            if lane.cores is not None:
                lane.env["cpu_affinity"] = cpu_list(list(lane.cores))
            self._kinds[lane.name] = env_identity(lane.env)
        if problems:
            raise SweepError("; ".join(dict.fromkeys(problems)))

    def _run_all(self, requests: dict[str, dict[str, Any]], *, timeout_s: float) -> list[tuple[Lane, dict[str, Any]]]:
        """One request per lane, lanes whose cores overlap one after the other; the replies."""
        waiting = [lane for lane in self.lanes if lane.name in requests]
        busy: list[Lane] = []
        replies = []
        while waiting or busy:
            for lane in list(waiting):
                if not any(lane.conflicts(other) for other in busy):
                    self.executor.submit(lane, requests[lane.name], timeout_s=timeout_s)
                    busy.append(lane)
                    waiting.remove(lane)
            lane, reply = self.executor.next_result()
            busy.remove(lane)
            replies.append((lane, reply))
        return replies

    def _kind_lanes(self, case: Case, kind: tuple | None) -> list[Lane]:
        """The lanes that may run ``case``: its device, and the kind of lane its curve runs on (once chosen)."""
        return [
            lane
            for lane in self.lanes
            if lane.device == case.device and (kind is None or self._kinds[lane.name] == kind)
        ]

    def _free_lane(self, case: Case, kind: tuple | None, busy: list[Lane]) -> Lane | None:
        """The idle lane, of those that may run ``case`` and share no cores with a busy one, used least lately."""
        free = [
            lane
            for lane in self._kind_lanes(case, kind)
            if lane not in busy and not any(lane.conflicts(other) for other in busy)
        ]
        return min(free, key=lambda lane: self._last_used.get(lane.name, -1), default=None)

    def _assign_kinds(self, finished: list[Finished]) -> None:
        """A curve with records already finished on a kind of lane this sweep has goes on there (resume)."""
        kinds = {(lane.device, self._kinds[lane.name]) for lane in self.lanes}
        by_key = {case.key(): case for case in self.cases}
        votes: dict[tuple, Counter] = {}
        for f in finished:
            case = by_key.get(f.key)
            if case is not None and (case.device, f.identity) in kinds:
                votes.setdefault(case.family_key(), Counter())[f.identity] += 1
        for family, counter in votes.items():
            self._curve_kind[family] = counter.most_common(1)[0][0]

    # -- scheduling decisions made before a case runs
    def _skip_reason(self, case: Case, estimate: float, limit: float | None) -> str | None:
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

    def _budget(self, case: Case, kind: tuple) -> float | None:
        """The memory budget of the lanes that may run ``case``: the least of theirs. Lanes of one host that
        compute in its memory (CPU, MPS) share that host's budget out among themselves."""
        limits = []
        for lane in self._kind_lanes(case, kind):
            free = (lane.env or {}).get("free_bytes", {}).get(case.device)
            if free is None:
                continue
            sharing = 1
            if lane.device in HOST_MEMORY_DEVICES:
                sharing = sum(o.host == lane.host and o.device in HOST_MEMORY_DEVICES for o in self.lanes)
            limits.append(self.options.budget_bytes(free) / sharing)
        return min(limits, default=None)

    def _decide(self, case: Case, kind: tuple) -> dict[str, Any]:
        """Round 0, before ``case`` runs: its estimate, and its status when it is not to run (unsupported, over
        budget, a stopped curve)."""
        unsupported = unsupported_reason(case)  # checked first: estimates assume a config that can run
        if unsupported:
            return {"status": "skipped", "message": unsupported}
        estimate = estimate_bytes(case)
        reason = self._skip_reason(case, estimate, self._budget(case, kind))
        return (
            {"status": "skipped", "message": reason, "estimate_bytes": estimate}
            if reason
            else {"estimate_bytes": estimate}
        )

    def _request(self, case: Case, lane: Lane, process: int) -> dict[str, Any]:
        assert lane.env is not None
        return {
            "op": "case",
            "case": case.to_dict(),
            "options": self.options.measure.to_json(),
            "peak_flops_per_s": lane.env["peak_flops_per_s"].get(f"{case.device}/{case.dtype}"),
            "process": process,
            "processes": self.options.processes,
        }

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
            self.start_lanes()
            for line in lane_lines(self.lanes, self.cases, executor=self.executor.name):
                self.log(line)
            if not opts.force:
                self._assign_kinds(finished)
            done = set() if opts.force else done_keys(finished, retry_failed=opts.retry_failed)
            first = {} if opts.force else first_statuses(finished)
            state = _Tally()

            def kind_of(case: Case) -> tuple | None:
                return self._curve_kind.get(case.family_key())

            def pending(process: int, *, expect_ok: bool = False) -> list[Case]:
                """The cases round ``process`` runs (``expect_ok``: counting those round 0 has still to run as ok)."""
                order = self.cases if process % 2 == 0 else self.cases[::-1]
                todo = []
                for case in order:
                    kind, key = kind_of(case), case.key()
                    if kind is not None and (kind, key, process) in done:
                        continue
                    status = first.get((kind, key)) if kind is not None else None
                    if process > 0 and status != "ok" and not (expect_ok and status is None):
                        continue
                    todo.append(case)
                return todo

            todo0 = pending(0)
            reused = len(self.cases) - len(todo0)
            later = sum(len(pending(p, expect_ok=True)) for p in range(1, opts.processes))
            progress = _progress(len(todo0) + later, quiet=opts.quiet)  # corrected when round 0 ends

            def record(case: Case, lane: Lane, process: int, result: dict[str, Any], *, ran: bool = True) -> None:
                """Write a case's record; ``lane``: the lane that ran it, or (not ``ran``) one of its curve's kind."""
                base = {"run_id": self.run_id, "case": case.to_dict(), "impl_info": impl_info(case.impl)}
                where = {"lane": lane.name if ran else None, "executor": self.executor.name, "env": lane.env}
                writer.write({**base, **result, "process": process, "processes": opts.processes, **where})
                state.measured_s += result.get("measured_s") or 0.0
                if process == 0:
                    state.ran += 1
                    state.counts[result["status"]] += 1
                    first[(self._kinds[lane.name], case.key())] = result["status"]
                    if result["status"] != "skipped" or case.family_key() not in self._curve_last:
                        self._curve_last[case.family_key()] = (case.seq_len, result["status"], result.get("median_s"))
                else:
                    state.again += 1
                if result["status"] != "ok" and opts.quiet:
                    self.log(f"{case.label()} [process {process}]: {result['status']}: {result.get('message')}")
                progress.update(1)

            try:
                for process in range(opts.processes):
                    self._run_round(pending(process), process, record, progress)
                    if process == 0:  # the later rounds run only what round 0 finished ok
                        progress.total = state.ran + sum(len(pending(p)) for p in range(1, opts.processes))
                        progress.refresh()
                    self.executor.fresh_workers()  # each round in fresh processes
            finally:
                progress.close()
                self.executor.close()
        return SweepSummary(
            counts=state.counts,
            wall_s=time.perf_counter() - started,
            measured_s=state.measured_s,
            ran=state.ran,
            reused=reused,
            again=state.again,
            lanes=len(self.lanes),
        )

    def _run_round(self, cases: list[Case], process: int, record: Callable[..., None], progress) -> None:
        """One round: each case on a free lane of its curve's kind; in round 0 a curve's lengths one at a time."""
        waiting = list(cases)
        running: dict[str, tuple[Lane, Case, dict[str, Any]]] = {}  # lane name -> its case, what round 0 decided
        while waiting or running:
            blocked: set[tuple] = {case.family_key() for _, case, _ in running.values()} if process == 0 else set()
            for case in list(waiting):
                family = case.family_key()
                if family in blocked:
                    continue
                if process == 0:
                    blocked.add(family)  # a curve's later lengths wait for this one
                kind = self._curve_kind.get(family)
                lane = self._free_lane(case, kind, [busy for busy, _, _ in running.values()])
                if kind is None:  # a new curve: the kind of the lane free for it (then its budget)
                    if lane is None:
                        continue
                    kind = self._curve_kind[family] = self._kinds[lane.name]
                extra: dict[str, Any] = {}
                if process == 0:
                    extra = self._decide(case, kind)
                    if "status" in extra:  # skipped: ran on no lane, recorded in its kind's environment
                        waiting.remove(case)
                        record(case, self._kind_lanes(case, kind)[0], process, extra, ran=False)
                        blocked.discard(family)
                        continue
                if lane is None:
                    continue
                self._dispatched += 1
                self._last_used[lane.name] = self._dispatched
                self.executor.submit(lane, self._request(case, lane, process), timeout_s=self.options.timeout_s)
                running[lane.name] = (lane, case, extra)
                waiting.remove(case)
                progress.set_postfix_str(f"{case.label()} [process {process}, {lane.name}]", refresh=True)
            if not running:
                if waiting:  # no lane can ever run them (none of their device)
                    raise SweepError(f"no lane runs {waiting[0].device} cases")
                break
            lane, result = self.executor.next_result()
            _, case, extra = running.pop(lane.name)
            record(case, lane, process, {**result, **extra})

    def close(self) -> None:
        self.executor.close()


@dataclasses.dataclass
class _Tally:
    counts: Counter = dataclasses.field(default_factory=Counter)
    measured_s: float = 0.0
    ran: int = 0
    again: int = 0


def lane_lines(lanes: list[Lane], cases: list[Case], *, executor: str) -> list[str]:
    """What the sweep runs on, a line per lane: printed at the start of every run."""
    lines = []
    for lane in lanes:
        env = lane.env or {}
        dtypes = ", ".join(dict.fromkeys(case.dtype for case in cases if case.device == lane.device))
        if lane.device == "cuda":
            what = f"{env.get('gpu_name')} {env.get('gpu_uuid')}, driver {env.get('gpu_driver')}, "
            what += f"CUDA {env.get('cuda_version')}, TF32 {'on' if env.get('tf32') else 'off'}"
        elif lane.device == "mps":
            what = "Apple GPU (MPS)"
        else:
            what = f"{env.get('cpu_model')}, {env.get('num_threads')} threads, affinity {env.get('cpu_affinity')}"
        where = f"lane {lane.name} on {lane.host}" if len(lanes) > 1 or executor != "local" else "device:"
        lines.append(f"{where} {lane.device} ({what}); dtypes: {dtypes}")
    if len(lanes) > 1 or executor != "local":
        count = f"{len(lanes)} lane" + ("s" if len(lanes) > 1 else "")
        lines.append(f"{count} ({executor} executor); cases run in parallel where lanes share no cores")
    return lines


def _progress(total: int, *, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=quiet, unit="case", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
