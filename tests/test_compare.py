"""``attnbench compare``: matching, the Mann–Whitney test (against scipy), summaries and --fail-above."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import ROOT, attnbench
from test_analysis import ENV, jittered, make_record, write_results

from bench.report import compare
from bench.report.load import load_results
from bench.report.stats import geometric_mean, mann_whitney_u


def run_records(scale: dict[str, float] | None = None, *, env: dict | None = None, memory: float = 1.0) -> list[dict]:
    """full and sdpa at three lengths; ``scale`` multiplies one impl's times (a regression or a speed-up)."""
    scale = scale or {}
    records = []
    for impl, base_s in (("full", 1e-3), ("sdpa", 5e-4)):
        for n in (512, 1024, 2048):
            median_s = base_s * (n / 512) ** 2 * scale.get(impl, 1.0)
            records.append(make_record(impl, n, median_s=median_s, peak_bytes=1e6 * n * memory, env=env))
    return records


@pytest.fixture
def base_file(tmp_path: Path) -> Path:
    return write_results(tmp_path / "base.jsonl", run_records())


# ---------------------------------------------------------------- the test statistic


def test_mann_whitney_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(1234)
    for trial in range(40):
        n1, n2 = rng.randint(1, 30), rng.randint(2, 30)
        shift = rng.choice([0.0, 0.3, 1.0])
        digits = rng.choice([1, 2, 6])  # rounding makes ties
        x = [round(rng.gauss(0, 1), digits) for _ in range(n1)]
        y = [round(rng.gauss(shift, 1), digits) for _ in range(n2)]
        ours = mann_whitney_u(x, y)
        theirs = stats.mannwhitneyu(x, y, alternative="two-sided", method="asymptotic", use_continuity=True)
        assert ours.u == pytest.approx(float(theirs.statistic)), trial
        assert ours.p_value == pytest.approx(float(theirs.pvalue), rel=1e-9, abs=1e-12), trial


def test_mann_whitney_edge_cases() -> None:
    assert mann_whitney_u([1.0, 1.0, 1.0], [1.0, 1.0]).p_value == 1.0
    same = jittered(1e-3)
    assert mann_whitney_u(same, same).p_value == pytest.approx(1.0)
    assert mann_whitney_u(jittered(1e-3), jittered(2e-3)).p_value < 1e-3
    with pytest.raises(ValueError):
        mann_whitney_u([], [1.0])


def test_geometric_mean() -> None:
    import pandas as pd

    assert geometric_mean(pd.Series([2.0, 0.5])) == pytest.approx(1.0)
    assert geometric_mean(pd.Series([4.0, float("nan"), 1.0])) == pytest.approx(2.0)
    assert math.isnan(geometric_mean(pd.Series([], dtype=float)))


# ---------------------------------------------------------------- comparisons


def test_identical_runs_show_no_significant_change(base_file: Path, tmp_path: Path) -> None:
    new = write_results(tmp_path / "new.jsonl", run_records())
    result = compare.compare_files([base_file], [new])
    assert len(result.rows) == 6
    assert result.rows["time_ratio"].tolist() == pytest.approx([1.0] * 6)
    assert not result.rows["significant"].any()
    assert set(result.rows["verdict"]) == {"no significant change"}
    assert result.geomean_time_ratio() == pytest.approx(1.0)
    assert result.regressions(fail_above=1.10).empty


def test_a_2x_regression_is_detected(base_file: Path, tmp_path: Path) -> None:
    new = write_results(tmp_path / "new.jsonl", run_records({"full": 2.0, "sdpa": 0.5}, memory=1.5))
    result = compare.compare_files([base_file], [new])
    full = result.rows[result.rows["impl"] == "full"]
    assert full["time_ratio"].tolist() == pytest.approx([2.0] * 3)
    assert full["significant"].all() and set(full["verdict"]) == {"slower"}
    sdpa = result.rows[result.rows["impl"] == "sdpa"]
    assert set(sdpa["verdict"]) == {"faster"}
    assert result.geomean_time_ratio() == pytest.approx(1.0)  # 2x and 0.5x cancel
    assert result.geomean_memory_ratio() == pytest.approx(1.5)
    assert sorted(result.regressions(fail_above=1.10)["impl"]) == ["full"] * 3
    assert result.regressions(fail_above=2.5).empty
    text = compare.format_comparison(result, fail_above=1.10)
    assert "REGRESSION: 3 cases" in text and "2.000×" in text and "1.500×" in text


def test_the_machines_own_speed_change_is_shown(base_file: Path, tmp_path: Path) -> None:
    same = compare.compare_files([base_file], [write_results(tmp_path / "same.jsonl", run_records())])
    assert same.machine_time_ratio() == pytest.approx(1.0)
    text = compare.format_comparison(same)
    assert "new/base: 1.000×" in text and "own speed changed" not in text
    # the new run started on a machine whose matmul ran at half the FLOP/s: its time doubled
    slow_env = {**ENV, "peak_flops_per_s": {"cpu/float32": 0.5e11}}
    slower = compare.compare_files([base_file], [write_results(tmp_path / "slow.jsonl", run_records(env=slow_env))])
    assert len(slower.both_ok) == 6  # the peak is no part of the environment's identity: the cases still match
    assert slower.machine_time_ratio() == pytest.approx(2.0)
    text = compare.format_comparison(slower)
    assert "a large matmul timed as each run started, new/base: 2.000× (beyond ±5%" in text
    assert "machine's own speed changed between the runs" in text


def test_different_numbers_of_rounds_are_named(base_file: Path, tmp_path: Path) -> None:
    rounds = [{**r, "processes": 3} for r in run_records()]
    result = compare.compare_files([base_file], [write_results(tmp_path / "three.jsonl", rounds)])
    assert "warning: BASE was timed in 1 processes a case, NEW in 3" in compare.format_comparison(result)
    same = compare.compare_files([base_file], [write_results(tmp_path / "one.jsonl", run_records())])
    assert "processes a case" not in compare.format_comparison(same)


def test_a_small_noisy_difference_is_not_a_regression(base_file: Path, tmp_path: Path) -> None:
    # 1.2x slower but the new samples overlap the old ones: not significant
    records = run_records({"full": 1.2})
    for record in records:
        record["samples"] = [
            s * f for s, f in zip(record["samples"], (0.5, 1.6, 0.7, 1.5, 1.0, 0.6, 1.4, 0.8, 1.2), strict=True)
        ]
    new = write_results(tmp_path / "new.jsonl", records)
    result = compare.compare_files([base_file], [new])
    assert result.regressions(fail_above=1.10).empty


def test_unmatched_cases_and_status_changes_are_reported(base_file: Path, tmp_path: Path) -> None:
    records = [r for r in run_records() if r["case"]["seq_len"] != 512]
    records = [r for r in records if not (r["case"]["impl"] == "full" and r["case"]["seq_len"] == 2048)]
    records.append(make_record("full", 2048, status="oom"))
    records.append(make_record("full", 4096, median_s=1.0))
    new = write_results(tmp_path / "new.jsonl", records)
    result = compare.compare_files([base_file], [new])
    assert sorted(result.only_base["seq_len"]) == [512, 512]
    assert result.only_new["seq_len"].tolist() == [4096]
    changed = result.status_changes()
    assert changed["verdict"].tolist() == ["ok → oom"]
    text = compare.format_comparison(result)
    assert "only in BASE:" in text and "only in NEW:" in text and "ok → oom" in text


def test_incomparable_environments_do_not_match(base_file: Path, tmp_path: Path) -> None:
    new = write_results(tmp_path / "new.jsonl", run_records({"full": 2.0}, env={**ENV, "host": "elsewhere"}))
    with pytest.raises(compare.CompareError, match="no case of NEW matches"):
        compare.compare_files([base_file], [new])
    result = compare.compare_files([base_file], [new], any_env=True)
    assert len(result.rows) == 6
    assert "--any-env" in compare.format_comparison(result)


# ---------------------------------------------------------------- the command


def test_cli_fail_above(base_file: Path, tmp_path: Path) -> None:
    slower = write_results(tmp_path / "slower.jsonl", run_records({"full": 2.0}))
    same = write_results(tmp_path / "same.jsonl", run_records())
    done = attnbench("compare", str(base_file), str(slower), "--fail-above", "1.10", "--csv", str(tmp_path / "c.csv"))
    assert done.returncode == 1, done.stderr
    assert "REGRESSION" in done.stdout
    assert "time_ratio" in (tmp_path / "c.csv").read_text().splitlines()[0]
    assert attnbench("compare", str(base_file), str(slower)).returncode == 0  # no gate asked for
    assert attnbench("compare", str(base_file), str(same), "--fail-above", "1.10").returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{base}", "{tmp}/missing.jsonl"], "does not exist"),
        (["{base}", "{base}", "--fail-above", "0"], "--fail-above"),
        (["{base}", "{base}", "--alpha", "2"], "--alpha"),
        (["{base}", "{tmp}/other.jsonl"], "no case of NEW matches"),
    ],
)
def test_cli_compare_usage_errors(base_file: Path, tmp_path: Path, args: list[str], message: str) -> None:
    write_results(tmp_path / "other.jsonl", run_records(env={**ENV, "host": "elsewhere"}))
    done = attnbench("compare", *(arg.format(base=base_file, tmp=tmp_path) for arg in args))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnbench compare: error:") and message in lines[0], done.stderr


def test_compare_runs_without_torch(base_file: Path, tmp_path: Path) -> None:
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "torch.py").write_text("raise ImportError('torch is deliberately unavailable in this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stub), str(ROOT)])}
    code = "import sys\nfrom bench.cli import main\nrc = main(sys.argv[1:])\nassert 'torch' not in sys.modules\nsys.exit(rc)"
    done = subprocess.run(
        [sys.executable, "-c", code, "compare", str(base_file), str(base_file)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "matched cases: 6" in done.stdout


def test_load_results_for_compare_keeps_samples(base_file: Path) -> None:
    frame = load_results([base_file]).frame
    assert all(len(samples) == 9 for samples in frame["samples"])
