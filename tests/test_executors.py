"""The local executor with real worker processes: CPU lanes on disjoint cores, side by side."""

from __future__ import annotations

import json
import os

import pytest
from cli_helpers import attnbench

pytestmark = pytest.mark.slow


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two CPU lanes need two CPUs")
def test_two_cpu_lanes_run_on_cores_of_their_own(tmp_path) -> None:
    out = tmp_path / "lanes.jsonl"
    first, second = sorted(os.sched_getaffinity(0))[:2]
    result = attnbench(
        "run", "--impls", "full,linear,sdpa", "--seq-lens", "64,128", "--modes", "fwd", "--min-time", "0.01",
        "--processes", "2", "--cpu-lanes", "2", "--threads", "1", "--quiet", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"lane cpu[{first}] on" in result.stderr and f"lane cpu[{second}] on" in result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 12 and all(r["status"] == "ok" for r in records)
    affinity = {r["lane"]: r["env"]["cpu_affinity"] for r in records}
    assert affinity == {f"cpu[{first}]": str(first), f"cpu[{second}]": str(second)}
    assert all(r["env"]["num_threads"] == 1 and r["executor"] == "local" for r in records)
    # one environment identity: the lanes' records make one curve per case
    from bench.results import env_identity

    assert len({env_identity(r["env"]) for r in records}) == 1
