"""A sweep survives every kind of failing case: each is recorded with its status and the rest run."""

from __future__ import annotations

import json

import pytest
from cli_helpers import attnbench

pytestmark = pytest.mark.slow

EXPECTED = {
    "fault_raise": ("error", "deliberate failure"),
    "fault_hang": ("timeout", "time-out"),
    "fault_hog": ("oom", "allocate"),
    "fault_abort": ("crashed", "SIGABRT"),
    "fault_oomkill": ("oom", "SIGKILL"),
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
        "--quiet",
        "--out", str(out),
        ATTNBENCH_IMPORT="fault_impls",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by_impl = {r["case"]["impl"]: r for r in records}
    assert len(records) == len(by_impl) == len(EXPECTED) + 2
    for impl, (status, fragment) in EXPECTED.items():
        record = by_impl[impl]
        assert record["status"] == status, (impl, record)
        assert fragment in record["message"], (impl, record["message"])
        assert "\n" not in record["message"]
    for healthy in ("full", "sdpa"):
        assert by_impl[healthy]["status"] == "ok", by_impl[healthy]
        assert by_impl[healthy]["n_samples"] >= 5
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
