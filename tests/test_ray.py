"""The ray executor on a real local Ray instance (no mocks): the same cases and statuses as the local
executor, the fault implementations included; resume across executors; a Ray worker killed mid-case;
cases spread one per GPU over declared (fake) GPU resources.

`nox -s tests` installs the ``ray`` extra and sets ATTNBENCH_REQUIRE_RAY: there a missing Ray fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
from cli_helpers import HANG_MARKER_ENV, ROOT, attnbench, cli_env
from test_sweep_faults import EXPECTED

if os.environ.get("ATTNBENCH_REQUIRE_RAY"):
    import ray
else:
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")

pytestmark = pytest.mark.slow

FAULT_GRID = [
    "--impls", ",".join(["full", "linear", *EXPECTED]), "--seq-lens", "64,128", "--modes", "fwd",
    "--min-time", "0.01", "--timeout", "8", "--processes", "2", "--quiet",
]  # fmt: skip


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _outcomes(records: list[dict]) -> Counter:
    """(case key, process, status) of every record: what two executors must agree on."""
    return Counter((json.dumps(r["case"], sort_keys=True), r["process"], r["status"]) for r in records)


def test_ray_and_local_run_the_same_cases_to_the_same_ends_and_resume_each_other(tmp_path) -> None:
    local, remote = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    ran_local = attnbench("run", *FAULT_GRID, "--out", str(local), ATTNBENCH_IMPORT="fault_impls")
    ran_ray = attnbench("run", *FAULT_GRID, "--executor", "ray", "--out", str(remote), ATTNBENCH_IMPORT="fault_impls")
    assert ran_local.returncode == 0, ran_local.stderr
    assert ran_ray.returncode == 0, ran_ray.stderr
    local_records, ray_records = _records(local), _records(remote)
    assert _outcomes(ray_records) == _outcomes(local_records)
    statuses = {r["case"]["impl"]: r["status"] for r in ray_records if r["process"] == 0 and r["case"]["seq_len"] == 64}
    assert statuses == {"full": "ok", "linear": "ok", **{impl: status for impl, (status, _) in EXPECTED.items()}}
    for impl, (_, fragment) in EXPECTED.items():  # classified in the actor as on this machine
        assert any(fragment in r["message"] for r in ray_records if r["case"]["impl"] == impl), impl
    assert {r["executor"] for r in ray_records} == {"ray"} and {r["executor"] for r in local_records} == {"local"}
    assert {r["env"]["host"] for r in ray_records} == {r["env"]["host"] for r in local_records}
    # resume across executors: each finds the other's cases done (the same environment), and runs none
    for out, executor in ((local, "ray"), (remote, "local")):
        again = attnbench("run", *FAULT_GRID, "--executor", executor, "--out", str(out), ATTNBENCH_IMPORT="fault_impls")
        assert again.returncode == 0, again.stderr
        assert "0 run, 14 already done" in again.stdout, again.stdout


def test_a_ray_worker_killed_mid_case_is_recorded_and_the_sweep_finishes(tmp_path) -> None:
    out, marker = tmp_path / "killed.jsonl", tmp_path / "hanging.pid"
    args = [
        "run", "--impls", "full,fault_hang,linear", "--seq-lens", "64", "--modes", "fwd", "--min-time", "0.01",
        "--timeout", "600", "--processes", "2", "--executor", "ray", "--quiet", "--out", str(out),
    ]  # fmt: skip
    sweep = subprocess.Popen(
        [sys.executable, "-m", "bench.cli", *args],
        env=cli_env(ATTNBENCH_IMPORT="fault_impls", **{HANG_MARKER_ENV: str(marker)}),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(1200):  # the lane's worker writes its pid as the hanging case starts
            if marker.exists() and marker.read_text():
                break
            time.sleep(0.1)
        worker = psutil.Process(int(marker.read_text()))
        actor = worker.parent()  # the Ray worker process that runs the lane's actor
        assert actor is not None and "ray" in " ".join(actor.cmdline()).lower(), actor
        os.kill(actor.pid, signal.SIGKILL)
        stdout, stderr = sweep.communicate(timeout=300)
    finally:
        sweep.kill()
    assert sweep.returncode == 0, stderr
    records = _records(out)
    keys = [(r["case"]["impl"], r["process"]) for r in records]
    assert sorted(keys) == sorted(set(keys)), "a case recorded twice"
    hang = [r for r in records if r["case"]["impl"] == "fault_hang"]
    assert len(hang) == 1 and hang[0]["status"] == "crashed", hang
    assert "the Ray worker died" in hang[0]["message"]
    # the cases after it ran on the lane's new actor, both rounds
    assert sorted(k for k in keys if k[0] != "fault_hang") == [("full", 0), ("full", 1), ("linear", 0), ("linear", 1)]
    assert all(r["status"] == "ok" for r in records if r["case"]["impl"] != "fault_hang")
    assert "crashed 1" in stdout and "ok 2" in stdout


def test_cases_spread_one_per_gpu_over_declared_gpus(tmp_path) -> None:
    from fake_gpus import FAKE_GPUS, spread_sweep

    assert not ray.is_initialized()
    spread_sweep(tmp_path / "spread.jsonl")
    records = _records(tmp_path / "spread.jsonl")
    assert len(records) == 8 and all(r["status"] == "ok" for r in records)
    lanes = Counter(r["lane"] for r in records)
    assert set(lanes) == {f"cuda:{gpu}" for gpu in range(FAKE_GPUS)}, lanes  # every GPU had cases
    # the worker that measured a case (its probe, in the worker process) saw one GPU, its lane's, and no other
    # lane's: Ray gave each actor a GPU of its own
    seen = {r["lane"]: r["env"]["cuda_visible_devices"] for r in records}
    assert sorted(seen.values()) == [str(gpu) for gpu in range(FAKE_GPUS)], seen
    assert all(visible == lane.removeprefix("cuda:") for lane, visible in seen.items()), seen
