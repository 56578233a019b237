"""A sweep survives every kind of failing case: each is recorded with its status and the rest run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import HANG_MARKER_ENV, ROOT, attnbench, cli_env

pytestmark = pytest.mark.slow

EXPECTED = {
    "fault_raise": ("error", "deliberate failure"),
    "fault_hang": ("timeout", "time-out"),
    "fault_hog": ("oom", "allocate"),
    "fault_abort": ("crashed", "SIGABRT"),
    # SIGKILL from outside: not the kernel's out-of-memory killer (its oom_kill count does not move)
    "fault_sigkill": ("crashed", "SIGKILL from outside"),
}


def test_fault_injection_sweep(tmp_path) -> None:
    out = tmp_path / "faults.jsonl"
    impls = ",".join(["full", *EXPECTED, "sdpa"])
    result = attnbench(
        "run",
        "--impls", impls,
        "--seq-lens", "64",
        "--modes", "fwd",
        "--min-time", "0.01",
        "--timeout", "8",
        "--processes", "2",
        "--quiet",
        "--out", str(out),
        ATTNBENCH_IMPORT="fault_impls",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by_impl = {r["case"]["impl"]: r for r in records if r["process"] == 0}
    assert len(by_impl) == len(EXPECTED) + 2
    # the second process times again only what the first finished ok
    again = [r for r in records if r["process"] == 1]
    assert sorted(r["case"]["impl"] for r in again) == ["full", "sdpa"]
    assert all(r["status"] == "ok" and r.get("peak_bytes") is None for r in again)
    for impl, (status, fragment) in EXPECTED.items():
        record = by_impl[impl]
        assert record["status"] == status, (impl, record)
        assert fragment in record["message"], (impl, record["message"])
        assert "\n" not in record["message"]
    for healthy in ("full", "sdpa"):
        assert by_impl[healthy]["status"] == "ok", by_impl[healthy]
        samples = [r["n_samples"] for r in records if r["case"]["impl"] == healthy]
        assert sum(samples) >= 5 and min(samples) >= 2  # min_samples dealt out to the two processes
    assert "ok 2" in result.stdout and "timeout 1" in result.stdout


def test_budget_skips_with_the_estimate(tmp_path) -> None:
    out = tmp_path / "budget.jsonl"
    result = attnbench(
        "run", "--impls", "full", "--seq-lens", "64,65536", "--modes", "fwd", "--min-time", "0.01",
        "--budget-gb", "1", "--quiet", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = {r["case"]["seq_len"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert records[64]["status"] == "ok"
    assert records[65536]["status"] == "skipped"
    assert "exceeds the budget of 1.00 GiB" in records[65536]["message"]
    assert "estimated" in records[65536]["message"]


def test_death_by_sigkill_is_oom_only_when_the_kernel_counted_an_oom_kill() -> None:
    from bench.measure.process import classify_death

    oom = classify_death(-9, oom_kills_before=3, oom_kills_after=4)
    outside = classify_death(-9, oom_kills_before=3, oom_kills_after=3)
    uncounted = classify_death(-9, oom_kills_before=None, oom_kills_after=None)
    assert (oom.status, outside.status, uncounted.status) == ("oom", "crashed", "crashed")
    assert "out-of-memory killer" in oom.message
    assert "from outside" in outside.message
    assert classify_death(-6, oom_kills_before=0, oom_kills_after=0).message == "worker died with SIGABRT"
    assert classify_death(3, oom_kills_before=0, oom_kills_after=0).message == "worker exited with code 3"


def test_oom_kill_count_reads_vmstat(tmp_path) -> None:
    from bench.measure.process import oom_kill_count

    vmstat = tmp_path / "vmstat"
    vmstat.write_text("pgfault 10\noom_kill 7\n")
    assert oom_kill_count(vmstat) == 7
    assert oom_kill_count(tmp_path / "missing") is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_sweep_killed_from_outside_leaves_no_worker_running(tmp_path) -> None:
    """kill -9 of the sweep while its worker runs a case that would last an hour: the worker dies with it."""
    out, marker = tmp_path / "killed.jsonl", tmp_path / "hanging.pid"
    args = ["run", "--impls", "fault_hang", "--seq-lens", "64", "--modes", "fwd", "--timeout", "600"]
    sweep = subprocess.Popen(
        [sys.executable, "-m", "bench.cli", *args, "--quiet", "--out", str(out)],
        env=cli_env(ATTNBENCH_IMPORT="fault_impls", **{HANG_MARKER_ENV: str(marker)}),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(600):  # the worker writes its pid as the hanging case starts
            if marker.exists() and marker.read_text():
                break
            time.sleep(0.1)
        worker = int(marker.read_text())
        assert _alive(worker)
        sweep.kill()
        sweep.wait(timeout=30)
        for _ in range(100):
            if not _alive(worker):
                break
            time.sleep(0.1)
        assert not _alive(worker), f"worker {worker} outlived the sweep"
    finally:
        sweep.kill()


def _alive(pid: int) -> bool:
    """Whether ``pid`` is still running (Linux's /proc; a zombie, dead but not yet reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
