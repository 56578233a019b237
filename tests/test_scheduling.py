"""The runner's scheduling over several lanes, with an executor that answers at once (no processes).

What the executor does is tested with real processes in test_executors.py and test_ray.py; here, what the
runner decides: lanes in parallel, a curve one length at a time and on one kind of lane, the early stop
along a curve across lanes, lanes that share cores taking turns, resume onto the kind that measured a curve.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from bench.cases import Case
from bench.measure.lanes import Lane
from bench.measure.runner import Sweep
from bench.options import MeasureOptions, SweepOptions


def _env(gpu: str = "G1", host: str = "h") -> dict[str, Any]:
    return {
        "host": host,
        "cpu_model": "cpu",
        "gpu_name": gpu,
        "num_threads": 1,
        "peak_flops_per_s": {},
        "free_bytes": {"cuda": 80 * 2**30, "cpu": 8 * 2**30},
    }


class InstantExecutor:
    """Lanes that answer requests in the order they were handed out; it notes what ran beside what."""

    name = "instant"

    def __init__(self, lanes: list[Lane], envs: dict[str, dict], outcome: Callable[[dict, Lane], dict]) -> None:
        self.lanes, self.envs, self.outcome = lanes, envs, outcome
        self.running: list[tuple[Lane, dict]] = []
        self.submitted: list[tuple[str, dict, list[dict]]] = []  # lane, request, the requests running beside it

    def start(self) -> list[Lane]:
        return self.lanes

    def submit(self, lane: Lane, payload: dict, *, timeout_s: float) -> None:
        assert all(other.name != lane.name for other, _ in self.running), "a busy lane was given a request"
        if payload["op"] == "case":
            self.submitted.append((lane.name, payload, [p for _, p in self.running]))
        self.running.append((lane, payload))

    def next_result(self) -> tuple[Lane, dict]:
        lane, payload = self.running.pop(0)
        if payload["op"] == "env":
            return lane, {"env": dict(self.envs[lane.name]), "problems": []}
        return lane, self.outcome(payload["case"], lane)

    def fresh_workers(self) -> None:
        pass

    def close(self) -> None:
        pass


def _ok(case: dict, lane: Lane) -> dict:
    return {"status": "ok", "median_s": 1e-3 * case["seq_len"] / 64, "measured_s": 0.01}


def _gpu_lanes(count: int, *, cores: bool = True) -> list[Lane]:
    return [Lane(f"cuda:{i}", "cuda", "h", (i,) if cores else None, 1, visible_devices=str(i)) for i in range(count)]


def _cases(*impls: str, lens=(64, 128, 256)) -> list[Case]:
    return [Case(impl, n, device="cuda", dtype="float32", heads=2, head_dim=8) for impl in impls for n in lens]


def _sweep(tmp_path, cases, executor, **options) -> tuple[Sweep, list[dict]]:
    out = tmp_path / "r.jsonl"
    opts = SweepOptions(out=out, quiet=True, timeout_s=100, measure=MeasureOptions(min_time_s=0.01), **options)
    sweep = Sweep(cases, opts, log=lambda line: None, executor=executor)
    sweep.run()
    return sweep, [json.loads(line) for line in out.read_text().splitlines()]


def test_lanes_run_side_by_side_and_a_curve_runs_one_length_at_a_time(tmp_path) -> None:
    lanes = _gpu_lanes(2)
    executor = InstantExecutor(lanes, {lane.name: _env() for lane in lanes}, _ok)
    _, records = _sweep(tmp_path, _cases("full", "linear"), executor, processes=2)
    assert max(len(beside) for _, _, beside in executor.submitted) == 1  # two at once
    round0 = [(lane, request, beside) for lane, request, beside in executor.submitted if request["process"] == 0]
    assert {lane for lane, _, _ in round0} == {"cuda:0", "cuda:1"}
    for _, request, beside in round0:  # no other length of its curve beside it
        assert all(other["case"]["impl"] != request["case"]["impl"] for other in beside)
    for impl in ("full", "linear"):
        assert [r["case"]["seq_len"] for _, r, _ in round0 if r["case"]["impl"] == impl] == [64, 128, 256]
    assert len(records) == 12 and {r["lane"] for r in records} == {"cuda:0", "cuda:1"}
    assert {r["executor"] for r in records} == {"instant"}
    # every record carries the environment of the lane that measured it
    assert all(r["env"]["gpu_name"] == "G1" for r in records)


def test_a_curve_stops_after_a_timeout_even_when_another_lane_is_free(tmp_path) -> None:
    def outcome(case: dict, lane: Lane) -> dict:
        if case["impl"] == "full" and case["seq_len"] == 128:
            return {"status": "timeout", "message": "passed the time-out of 100 s"}
        return _ok(case, lane)

    lanes = _gpu_lanes(2)
    executor = InstantExecutor(lanes, {lane.name: _env() for lane in lanes}, outcome)
    _, records = _sweep(tmp_path, _cases("full", "linear"), executor, processes=1)
    by_case = {(r["case"]["impl"], r["case"]["seq_len"]): r for r in records}
    assert by_case["full", 128]["status"] == "timeout"
    assert by_case["full", 256]["status"] == "skipped"
    assert "n=128 already ended with timeout" in by_case["full", 256]["message"]
    assert ("full", 256) not in {(r["case"]["impl"], r["case"]["seq_len"]) for _, r, _ in executor.submitted}
    assert all(by_case["linear", n]["status"] == "ok" for n in (64, 128, 256))


def test_a_curve_runs_on_one_kind_of_lane(tmp_path) -> None:
    lanes = _gpu_lanes(4)
    envs = {lane.name: _env("H100" if i < 2 else "A100") for i, lane in enumerate(lanes)}
    executor = InstantExecutor(lanes, envs, _ok)
    _, records = _sweep(tmp_path, _cases("full", "linear", "sdpa", "local"), executor, processes=2)
    kinds: dict[str, set[str]] = {}
    for record in records:
        kinds.setdefault(record["case"]["impl"], set()).add(record["env"]["gpu_name"])
    assert all(len(gpus) == 1 for gpus in kinds.values()), kinds
    assert set().union(*kinds.values()) == {"H100", "A100"}  # both kinds worked


def test_lanes_that_share_cores_take_turns(tmp_path) -> None:
    lanes = _gpu_lanes(2, cores=False)  # unpinned: they may share any core
    executor = InstantExecutor(lanes, {lane.name: _env() for lane in lanes}, _ok)
    _, records = _sweep(tmp_path, _cases("full", "linear"), executor, processes=1)
    assert all(not beside for _, _, beside in executor.submitted)
    # taking turns, the work still goes to the lane used least lately
    assert {r["lane"] for r in records} == {"cuda:0", "cuda:1"}


def test_a_resumed_curve_goes_on_where_it_was_measured(tmp_path) -> None:
    lanes = _gpu_lanes(2)
    envs = {"cuda:0": _env("H100"), "cuda:1": _env("A100")}
    first = InstantExecutor(lanes[1:], envs, _ok)  # full at 64 measured on the A100 alone
    _sweep(tmp_path, _cases("full", lens=(64,)), first, processes=1)
    again = InstantExecutor(lanes, envs, _ok)
    _, records = _sweep(tmp_path, _cases("full", "linear"), again, processes=1)
    full = [r for r in records if r["case"]["impl"] == "full"]
    assert [r["case"]["seq_len"] for r in full] == [64, 128, 256]  # 64 once: resumed, not run again
    assert {r["env"]["gpu_name"] for r in full} == {"A100"}
