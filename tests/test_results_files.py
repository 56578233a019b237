"""Results files: one writer at a time, bounded reads, nothing left by a run that writes nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from cli_helpers import ROOT, attnbench, cli_env

from bench import results
from bench.results import MAX_LINE_BYTES, ResultsError, ResultsWriter, iter_records


def _record(seq_len: int = 64) -> dict:
    return {"case": {"impl": "full", "seq_len": seq_len}, "status": "ok", "median_s": 1e-3}


def test_a_second_writer_is_refused_and_leaves_the_file_alone(tmp_path) -> None:
    out = tmp_path / "r.jsonl"
    with ResultsWriter(out) as first:
        first.write(_record())
        with pytest.raises(ResultsError, match="being written by another attnbench run"):
            ResultsWriter(out)
        first.write(_record(128))
    assert [r["case"]["seq_len"] for _, r, _ in iter_records(out)] == [64, 128]


def test_a_writer_that_wrote_nothing_removes_what_it_created(tmp_path) -> None:
    out = tmp_path / "a" / "b" / "r.jsonl"
    ResultsWriter(out).close()
    assert not (tmp_path / "a").exists()
    existing = tmp_path / "kept.jsonl"
    existing.write_text("")
    ResultsWriter(existing).close()
    assert existing.exists(), "a file that was there before is never removed"


def test_undeclared_fields_are_refused(tmp_path) -> None:
    with ResultsWriter(tmp_path / "r.jsonl") as writer, pytest.raises(ValueError, match="not declared"):
        writer.write({**_record(), "median_ms": 1.0})


def test_field_declaration_is_the_one_list() -> None:
    names = [f.name for f in results.RECORD_FIELDS]
    assert len(names) == len(set(names))
    assert set(results.NUMERIC_FIELDS) <= set(names)
    assert set(results.FAILED_STATUSES) < set(results.STATUSES)


def test_an_overlong_line_is_reported_not_held(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(results, "MAX_LINE_BYTES", 1024)
    path = tmp_path / "r.jsonl"
    good = json.dumps({"schema_version": 1, **_record()})
    path.write_text(good + "\n" + "x" * 5000 + "\n" + good + "\n" + "y" * 3000)
    seen = list(iter_records(path))
    assert [(n, r is not None) for n, r, _ in seen] == [(1, True), (2, False), (3, True), (4, False)]
    assert "line longer than" in str(seen[1][2])
    assert "line longer than" in str(seen[3][2])


def test_max_line_is_far_above_a_real_record() -> None:
    assert MAX_LINE_BYTES >= 2**20


def test_a_device_is_not_a_results_file() -> None:
    with pytest.raises(ResultsError, match="not a regular file"):
        list(iter_records("/dev/full"))


@pytest.mark.slow
def test_two_runs_on_one_file(tmp_path) -> None:
    """The second run refuses at once with one line; the first finishes and every case is there once.

    The first run's second case hangs until its time-out, so the second run surely meets the first.
    """
    out = tmp_path / "r.jsonl"
    args = ["run", "--impls", "sdpa,fault_hang", "--seq-lens", "16", "--modes", "fwd", "--min-time", "0.01"]
    args += ["--timeout", "20", "--quiet", "--processes", "1"]
    first = subprocess.Popen(
        [sys.executable, "-m", "bench.cli", *args, "--out", str(out)],
        env=cli_env(ATTNBENCH_IMPORT="fault_impls"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    second = attnbench(*args, "--out", str(out), ATTNBENCH_IMPORT="fault_impls")
    first.communicate(timeout=300)
    assert first.returncode == 0
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"attnbench run: error: {out} is being written by another attnbench run: "
        "wait for it to end or choose another --out"
    ]
    statuses = sorted(json.loads(line)["status"] for line in out.read_text().splitlines() if line)
    assert statuses == ["ok", "timeout"], "each case once, from the first run"


@pytest.mark.slow
def test_a_worker_killed_from_outside_is_recorded_as_such(tmp_path) -> None:
    """kill -9 of the worker mid-case: recorded as crashed by SIGKILL from outside, and the sweep goes on."""
    out = tmp_path / "r.jsonl"
    args = ["run", "--impls", "fault_hang,sdpa", "--seq-lens", "16", "--modes", "fwd", "--min-time", "0.01"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.cli", *args, "--timeout", "120", "--quiet", "--out", str(out)],
        env=cli_env(ATTNBENCH_IMPORT="fault_impls"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    worker = None
    deadline = time.monotonic() + 120
    while worker is None and time.monotonic() < deadline:
        found = subprocess.run(
            ["pgrep", "-f", "-P", str(proc.pid), "bench.measure.worker"], capture_output=True, text=True
        )
        pids = found.stdout.split()
        worker = int(pids[0]) if pids else None
        time.sleep(0.2)
    assert worker is not None
    time.sleep(5)  # the env probe first, then the hanging case
    subprocess.run(["kill", f"-{signal.SIGKILL.value}", str(worker)], check=True)
    proc.communicate(timeout=300)
    assert proc.returncode == 0
    by_impl = {r["case"]["impl"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert by_impl["fault_hang"]["status"] == "crashed"
    assert "SIGKILL from outside" in by_impl["fault_hang"]["message"]
    assert by_impl["sdpa"]["status"] == "ok"


def test_resume_reads_the_file_once_and_reports_records_it_can_not_use(tmp_path) -> None:
    from bench.measure.runner import done_keys, read_finished
    from bench.results import env_identity

    path = tmp_path / "r.jsonl"
    env = {"host": "h", "cpu_model": "c", "num_threads": 2}
    good = {"schema_version": 1, "case": {"impl": "full", "seq_len": 64}, "status": "ok", "env": env}
    failed = {**good, "case": {"impl": "full", "seq_len": 128}, "status": "timeout"}
    bad_case = {**good, "case": {"impl": "full", "seq_len": 0}}
    path.write_text("\n".join(json.dumps(r) for r in (good, failed, bad_case)) + "\n")
    finished, problems = read_finished(path)
    assert len(finished) == 2
    assert len(problems) == 1 and ":3: invalid case" in problems[0]
    assert len(done_keys(finished, retry_failed=False)) == 2
    assert len(done_keys(finished, retry_failed=True)) == 1
    # done in this environment alone: another host's sweep would run them again
    assert {identity for identity, _, _ in done_keys(finished, retry_failed=False)} == {env_identity(env)}
    assert env_identity({**env, "host": "other"}) != env_identity(env)
