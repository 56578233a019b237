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


def test_a_resumed_curve_stays_on_its_device(tmp_path) -> None:
    """A file whose CPU records carry the GPU lane's environment (one probe for both devices, as sweeps wrote
    before lanes): the CPU curve can not resume on the GPU lane; it runs again on the CPU lane."""
    cpu = Lane("cpu", "cpu", "h", (0,), 1)
    gpu = _gpu_lanes(1)[0]
    cases = [
        Case("full", n, device=device, dtype="float32", heads=2, head_dim=8)
        for device in ("cpu", "cuda")
        for n in (64, 128)
    ]
    before = {"cpu": _env("G1"), "cuda:0": _env("G1")}
    _sweep(tmp_path, [cases[0], cases[2]], InstantExecutor([cpu, gpu], before, _ok), processes=1)
    now = {"cpu": _env(None), "cuda:0": _env("G1")}  # the CPU lane's own probe has no GPU
    again = InstantExecutor([cpu, gpu], now, _ok)
    _, records = _sweep(tmp_path, cases, again, processes=1)
    ran = sorted((r["case"]["device"], r["case"]["seq_len"], r["lane"]) for r in records[2:])
    assert ran == [("cpu", 64, "cpu"), ("cpu", 128, "cpu"), ("cuda", 128, "cuda:0")]  # cuda at 64 resumed


def test_a_new_curve_is_judged_by_the_budget_of_the_kind_that_takes_it(tmp_path) -> None:
    from bench.measure.plan import estimate_bytes

    lanes = _gpu_lanes(2)
    big = Case("full", 4096, device="cuda", dtype="float32", heads=2, head_dim=8)
    need = estimate_bytes(big)
    small_env = {**_env("small"), "free_bytes": {"cuda": 0.5 * need / 0.6}}  # a budget of half the estimate
    large_env = {**_env("large"), "free_bytes": {"cuda": 4 * need / 0.6}}
    executor = InstantExecutor(lanes, {"cuda:0": small_env, "cuda:1": large_env}, _ok)
    cases = [Case("full", n, device="cuda", dtype="float32", heads=2, head_dim=8) for n in (64, 4096)]
    _, records = _sweep(tmp_path, cases, executor, processes=1)
    # the curve went to the lane used least lately (cuda:0, the small card): its 4096 is over that card's budget,
    # and the record says so in that card's environment, beside the curve's other length
    by_len = {r["case"]["seq_len"]: r for r in records}
    assert by_len[64]["lane"] == "cuda:0" and by_len[64]["env"]["gpu_name"] == "small"
    assert by_len[4096]["status"] == "skipped" and "exceeds the budget" in by_len[4096]["message"]
    assert by_len[4096]["env"]["gpu_name"] == "small" and by_len[4096]["lane"] is None  # skipped: ran on no lane


def test_cpu_lanes_of_one_host_share_its_memory_budget(tmp_path) -> None:
    from bench.measure.plan import estimate_bytes

    case = Case("full", 2048, device="cpu", dtype="float32", heads=2, head_dim=8)
    free = 1.5 * estimate_bytes(case) / 0.6  # alone, a budget of 1.5 times the estimate; shared by two, 0.75
    lanes = [Lane(f"cpu[{i}]", "cpu", "h", (i,), 1) for i in range(2)]
    envs = {lane.name: {**_env(), "free_bytes": {"cpu": free}} for lane in lanes}
    _, records = _sweep(tmp_path, [case], InstantExecutor(lanes, envs, _ok), processes=1)
    assert records[0]["status"] == "skipped" and "exceeds the budget" in records[0]["message"]
    _, alone = _sweep(tmp_path / "alone", [case], InstantExecutor(lanes[:1], envs, _ok), processes=1)
    assert alone[0]["status"] == "ok"
