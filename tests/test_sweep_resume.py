"""Results are appended as cases end: a sweep killed with SIGKILL loses nothing finished and resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from cli_helpers import ROOT, attnbench, cli_env

pytestmark = pytest.mark.slow

PROCESSES = 2  # every case is measured in two worker processes, a record each
ARGS = ["run", "--impls", "full,sdpa", "--seq-lens", "16:512:x2", "--modes", "fwd", "--min-time", "0.01", "--quiet"]
ARGS += ["--processes", str(PROCESSES)]
TOTAL = 2 * 6


def _lines(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_sigkill_then_resume(tmp_path) -> None:
    out = tmp_path / "sweep.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.cli", *ARGS, "--out", str(out)],
        env=cli_env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while len(_lines(out)) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its worker, mid-sweep
    proc.wait()
    before = out.read_bytes()
    finished = [json.loads(line) for line in before.decode().splitlines() if line.endswith("}")]
    assert 3 <= len(finished) < TOTAL, "the kill should land mid-sweep, in the first round"
    assert all(r["process"] == 0 for r in finished)

    result = attnbench(*ARGS, "--out", str(out))
    assert result.returncode == 0, result.stderr
    after = out.read_bytes()
    assert after.startswith(before), "records written before the kill must stay as they were"
    records = [json.loads(line) for line in after.decode().splitlines() if line.strip()]
    keys = [(json.dumps(r["case"], sort_keys=True), r["process"]) for r in records]
    assert len(keys) == len(set(keys)) == PROCESSES * TOTAL, "every case exactly once in each process"
    assert all(r["status"] == "ok" for r in records)
    assert f"{TOTAL - len(finished)} run, {len(finished)} already done" in result.stdout

    again = attnbench(*ARGS, "--out", str(out))
    assert f"0 run, {TOTAL} already done" in again.stdout
    assert out.read_bytes() == after


def test_truncated_and_corrupt_lines_are_reported_and_skipped(tmp_path) -> None:
    out = tmp_path / "sweep.jsonl"
    args = ["run", "--impls", "sdpa", "--seq-lens", "16,32", "--modes", "fwd", "--min-time", "0.01", "--quiet"]
    args += ["--processes", "2"]
    assert attnbench(*args, "--out", str(out)).returncode == 0
    good = out.read_text().splitlines()
    # line 2 corrupt, line 3 a record cut by a kill (no newline at the end of the file)
    out.write_text(good[0] + "\n" + "{not json\n" + good[1][: len(good[1]) // 2])
    result = attnbench(*args, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert ":2: corrupt line" in result.stderr
    assert ":3: truncated line" in result.stderr
    lines = out.read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{") and line.endswith("}")]
    assert sorted((r["case"]["seq_len"], r["process"]) for r in records) == [(16, 0), (16, 1), (32, 0), (32, 1)]
