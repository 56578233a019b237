"""Each case is timed in several worker processes, in rounds spread over the sweep, and pooled by readers."""

from __future__ import annotations

import json
import os

import pytest
from cli_helpers import attnbench

from bench.measure.process import allocator_setting, worker_environ
from bench.pooling import CaseGroups, pool


def _record(process: int, samples: list[float], status: str = "ok", **extra) -> dict:
    ordered = sorted(samples)
    median = ordered[len(ordered) // 2]
    return {
        "status": status,
        "process": process,
        "samples": samples,
        "median_s": median,
        "iqr_s": (ordered[-1] - ordered[0]) / 2,
        "flops": 1e9,
        "achieved_flops_per_s": 1e9 / median,
        "roofline": 0.5,
        "peak_bytes": 100 if process == 0 else None,
        **extra,
    }


def test_the_best_round_is_the_time_and_every_sample_is_pooled() -> None:
    agree = pool([_record(0, [1.02, 1.03, 1.04]), _record(1, [1.00, 1.01, 1.02])])
    assert agree["n_samples"] == 6 and agree["processes"] == 2
    assert agree["median_s"] == 1.01  # the fastest process's median: the best of the rounds
    assert agree["pooled_median_s"] == pytest.approx(1.02)  # the median of all six samples
    assert agree["min_s"] == 1.00 and agree["samples"] == [1.02, 1.03, 1.04, 1.00, 1.01, 1.02]
    assert agree["process_medians_s"] == [1.03, 1.01]
    assert agree["process_spread"] == pytest.approx(0.02 / 1.01)
    assert not agree["unstable"]
    assert agree["peak_bytes"] == 100  # memory from process 0
    assert agree["achieved_flops_per_s"] == pytest.approx(1e9 / 1.01)
    assert agree["roofline"] == pytest.approx(0.5 * 1.03 / 1.01)  # process 0 measured 0.5 at its 1.03


def test_processes_that_disagree_beyond_their_own_spread_are_unstable() -> None:
    # the second process is 20% slower, each process tight (within ~1%): one process's samples can not see it
    disagree = pool([_record(0, [1.00, 1.01, 1.00]), _record(1, [1.20, 1.21, 1.20])])
    assert disagree["unstable"] and disagree["process_spread"] > 0.15
    # the same gap inside very noisy processes is not flagged: the spread within one explains it
    noisy = pool([_record(0, [0.7, 1.0, 1.3]), _record(1, [0.9, 1.06, 1.5])])
    assert not noisy["unstable"]


def test_a_process_that_did_not_finish_is_named_and_flags_the_case() -> None:
    pooled = pool([_record(0, [1.0, 1.0]), {"status": "timeout", "process": 1, "message": "passed the time-out"}])
    assert pooled["status"] == "ok" and pooled["unstable"] and pooled["processes"] == 1
    assert "process 1: timeout" in pooled["message"]
    failed_first = {"status": "oom", "process": 0, "message": "out of memory"}
    assert pool([failed_first]) == failed_first


def test_case_groups_start_again_at_process_zero() -> None:
    groups = CaseGroups()
    assert groups.add("a", _record(0, [1.0])) is None
    assert groups.add("a", _record(1, [1.1])) is None
    assert groups.add("a", _record(1, [1.2])) is None  # a retried process replaces its record
    assert "no process-0 record" in groups.add("b", _record(1, [1.0]))
    [(key, pooled, _extra)] = list(groups)
    assert key == "a" and pooled["process_medians_s"] == [1.0, 1.2] and groups.superseded == 1
    groups.add("a", _record(0, [2.0]))  # --force: measured again from the start
    [(_key, pooled, _extra)] = list(groups)
    assert pooled["median_s"] == 2.0 and groups.superseded == 3


@pytest.mark.slow
def test_rounds_measure_each_case_in_fresh_processes_and_the_report_pools_them(tmp_path) -> None:
    out = tmp_path / "r.jsonl"
    args = ["run", "--impls", "sdpa,linear", "--seq-lens", "64,128", "--modes", "fwd", "--min-time", "0.05"]
    result = attnbench(*args, "--processes", "3", "--quiet", "--out", str(out))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["process"] for r in records] == [0] * 4 + [1] * 4 + [2] * 4
    order = [(r["case"]["impl"], r["case"]["seq_len"]) for r in records]
    assert order[4:8] == order[:4][::-1] and order[8:] == order[:4]  # interleaved: every other round reversed
    assert all(r["n_samples"] >= 2 for r in records)  # min_samples 5 shared by 3 processes
    assert all(r["env"]["omp_proc_bind"] == "close" and r["env"]["cpu_affinity"] for r in records)
    assert all(r["env"]["allocator"] == allocator_setting(os.environ) for r in records)
    assert "4 timed again" not in result.stdout and "8 timed again in later processes" in result.stdout

    from bench.report.load import load_results

    frame = load_results([out]).frame
    assert len(frame) == 4 and (frame["processes"] == 3).all()
    assert (frame["samples"].map(len) == frame["n_samples"]).all()
    assert frame["process_spread"].notna().all() and frame["within_spread"].notna().all()
    report = tmp_path / "report"
    assert attnbench("report", str(out), "--out", str(report)).returncode == 0
    assert "## Repeatability" in (report / "README.md").read_text()


def test_records_from_before_the_allocator_field_count_as_the_default() -> None:
    from bench.results import env_identity

    assert env_identity({"host": "h"}) == env_identity({"host": "h", "allocator": "default"})
    assert env_identity({"host": "h"}) != env_identity({"host": "h", "allocator": "LD_PRELOAD=/x.so"})


def test_the_allocator_setting_is_what_the_environment_sets() -> None:
    assert allocator_setting({"PATH": "/bin", "OMP_PLACES": "cores"}) == "default"
    preloaded = {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2", "MALLOC_ARENA_MAX": "2", "PATH": "/bin"}
    assert allocator_setting(preloaded) == "LD_PRELOAD=/usr/lib/libjemalloc.so.2 MALLOC_ARENA_MAX=2"
    assert worker_environ(preloaded, pin=True)["LD_PRELOAD"] == "/usr/lib/libjemalloc.so.2"  # passed on as set
