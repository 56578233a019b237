"""bench.report: loading, statistics and analyses on synthetic results whose answers are known by construction.

The builders here (``make_record``, ``write_results``, ``synthetic_study``) are shared with
test_report, test_compare and test_export.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench.report import analysis, complexity, load
from bench.report.stats import fit_power_law, student_t_cdf, student_t_ppf
from bench.results import ResultsError, ResultsWriter

ENV: dict[str, Any] = {
    "host": "testhost",
    "cpu_model": "Test CPU 9000",
    "cpu_cores_logical": 8,
    "gpu_name": None,
    "torch_version": "2.3.0",
    "cuda_version": None,
    "num_threads": 4,
    "python_version": "3.11.7",
    "platform": "Linux-6.1.0-x86_64-with-glibc2.36",
    "git_commit": "abc1234",
    "timestamp": "2025-01-02T03:04:05+00:00",
    "peak_flops_per_s": {"cpu/float32": 1.0e11},
    "free_bytes": {"cpu": 1 << 34},
}
COMPLEXITY = {
    "full": ("O(n^2 d)", "O(n^2)", True),
    "sdpa": ("O(n^2 d)", "O(n d)", True),
    "linear": ("O(n d^2)", "O(n d)", False),
}
LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384)
# a deterministic wobble of about ±1% so that fits have residuals (and intervals) but stay tight
WOBBLE = {256: 1.004, 512: 0.993, 1024: 1.008, 2048: 0.995, 4096: 1.006, 8192: 0.991, 16384: 1.003}


def jittered(median_s: float, *, count: int = 9, spread: float = 0.01) -> list[float]:
    """``count`` samples symmetric around ``median_s`` (their median is exactly ``median_s``)."""
    half = count // 2
    return [median_s * (1.0 + spread * (i - half) / max(half, 1)) for i in range(count)]


def make_record(
    impl: str,
    seq_len: int,
    *,
    median_s: float | None = None,
    status: str = "ok",
    mode: str = "fwd",
    peak_bytes: float | None = None,
    samples: list[float] | None = None,
    env: dict[str, Any] | None = None,
    rel_error: float | None = None,
    rel_error_peaked: float | None = None,
    scope: str = "attention",
    depth: int = 1,
    residual: str = "standard",
    params: dict[str, Any] | None = None,
    impl_info: bool = True,
    meta: dict[str, Any] | None = None,
    message: str | None = None,
) -> dict[str, Any]:
    """A record as the runner writes it (less the fields no analysis reads)."""
    case = {
        "impl": impl,
        "seq_len": seq_len,
        "mode": mode,
        "device": "cpu",
        "dtype": "float32",
        "batch": 1,
        "heads": 8,
        "head_dim": 64,
        "causal": False,
        "scope": scope,
        "depth": depth,
        "residual": residual,
        "params": params or {},
    }
    record: dict[str, Any] = {
        "run_id": "run0",
        "case": case,
        "status": status,
        "message": message if status == "ok" else (message or f"{status} at {seq_len}"),
        "env": env or ENV,
        "estimate_bytes": 1.0e6,
        "wall_s": 0.1,
    }
    if impl_info and impl in COMPLEXITY:
        time_text, memory_text, exact = COMPLEXITY[impl]
        record["impl_info"] = {
            "name": impl,
            "time_complexity": time_text,
            "memory_complexity": memory_text,
            "exact": exact,
        }
    if meta is not None:
        record["meta"] = meta
    if status == "ok":
        assert median_s is not None
        samples = samples if samples is not None else jittered(median_s)
        flops = 0.25 * ENV["peak_flops_per_s"]["cpu/float32"] * median_s  # a roofline of 25%
        record.update(
            median_s=median_s,
            iqr_s=median_s * 0.005,
            min_s=min(samples),
            mean_s=sum(samples) / len(samples),
            samples=samples,
            n_samples=len(samples),
            calls_per_sample=1,
            noisy=False,
            measured_s=sum(samples),
            peak_bytes=peak_bytes,
            rss_peak_bytes=None,
            memory_method="synthetic",
            flops=flops,
            achieved_flops_per_s=flops / median_s,
            roofline=flops / median_s / ENV["peak_flops_per_s"]["cpu/float32"],
        )
        if rel_error is not None:
            record["rel_error_random"] = rel_error
            record["rel_error_peaked"] = rel_error_peaked if rel_error_peaked is not None else rel_error * 3
    return record


def write_results(path: Path, records: list[dict[str, Any]]) -> Path:
    with ResultsWriter(path) as writer:
        for record in records:
            writer.write(record)
    return path


def full_time_s(n: int) -> float:
    return 1e-9 * n * n * WOBBLE[n]


def linear_time_s(n: int) -> float:
    return 2e-6 * n  # equals full at n = 2000 (without the wobble)


def synthetic_study(*, env: dict[str, Any] | None = None, full_oom_from: int = 16384) -> list[dict[str, Any]]:
    """full: t = 1e-9 n² (OOM from ``full_oom_from``); sdpa: half of full; linear: t = 2e-6 n, approximate."""
    records = []
    for n in LENGTHS:
        if n >= full_oom_from:
            records.append(make_record("full", n, status="oom", env=env, message="OutOfMemoryError: synthetic"))
        else:
            records.append(make_record("full", n, median_s=1e-9 * n * n * WOBBLE[n], peak_bytes=32.0 * n * n, env=env))
        records.append(make_record("sdpa", n, median_s=0.5e-9 * n * n * WOBBLE[n], peak_bytes=2048.0 * n, env=env))
        records.append(
            make_record(
                "linear", n, median_s=2e-6 * n, peak_bytes=4096.0 * n * WOBBLE[n], env=env, rel_error=0.05 + n * 1e-6
            )
        )
    return records


@pytest.fixture
def study(tmp_path: Path) -> load.Results:
    return load.load_results([write_results(tmp_path / "study.jsonl", synthetic_study())])


def _row(table, **where) -> dict[str, Any]:
    rows = table
    for column, value in where.items():
        rows = rows[rows[column] == value]
    assert len(rows) == 1, f"expected one row for {where}, found {len(rows)}"
    return rows.iloc[0].to_dict()


# ---------------------------------------------------------------- statistics


def test_student_t_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 5, 7, 10, 30, 101):
        for t in (-3.0, -0.5, 0.0, 0.7, 2.0, 6.0):
            assert student_t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), abs=1e-10)
        for q in (0.6, 0.9, 0.975, 0.995):
            assert student_t_ppf(q, df) == pytest.approx(stats.t.ppf(q, df), rel=1e-8)
    assert student_t_ppf(0.025, 4) == pytest.approx(-stats.t.ppf(0.975, 4), rel=1e-8)


def test_power_fit_recovers_exponent_with_tight_interval() -> None:
    fit = fit_power_law(list(LENGTHS), [full_time_s(n) for n in LENGTHS])
    assert fit is not None
    assert fit.exponent == pytest.approx(2.0, abs=0.01)
    assert fit.low < 2.0 < fit.high
    assert fit.high - fit.low < 0.05
    assert fit.predict(1024) == pytest.approx(1e-9 * 1024**2, rel=0.02)
    assert fit.solve(fit.predict(3000)) == pytest.approx(3000)


def test_power_fit_edge_cases() -> None:
    assert fit_power_law([1024], [1.0]) is None
    assert fit_power_law([1024, 1024], [1.0, 2.0]) is None
    two = fit_power_law([1024, 2048], [1.0, 4.0])
    assert two is not None and two.exponent == pytest.approx(2.0)
    assert math.isnan(two.low) and math.isnan(two.high)
    exact = fit_power_law([1, 2, 4, 8], [3.0, 6.0, 12.0, 24.0])
    assert exact is not None and exact.low == pytest.approx(1.0) and exact.high == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("text", "exponent"),
    [
        ("O(n^2 d)", 2),
        ("O(n^2)", 2),
        ("O(n²)", 2),
        ("O(n w d)", 1),
        ("O(n k d)", 1),
        ("O(n d^2)", 1),
        ("O(n log n)", 1),
        ("O(n log(n) d)", 1),
        ("O(n c)", 1),
        ("O(n)", 1),
        ("O(n^1.5)", 1.5),
        ("O(n sqrt(n))", 1.5),
        ("O(n^2 + n d)", 2),
        ("O(n·d)", 1),
        ("O(1)", 0),
        ("O(d^2)", 0),
        ("n^2", None),
        (None, None),
        ("", None),
    ],
)
def test_complexity_exponent(text: str | None, exponent: float | None) -> None:
    assert complexity.complexity_exponent(text) == exponent


# ---------------------------------------------------------------- loading


def test_load_checks_schema_and_reports_problems(tmp_path: Path) -> None:
    path = write_results(tmp_path / "r.jsonl", synthetic_study())
    with open(path, "a") as handle:
        handle.write("not json\n")
        bad_status = make_record("full", 64, median_s=1e-3)
        bad_status["status"] = "weird"
        handle.write(json.dumps({"schema_version": 1, **bad_status}) + "\n")
        no_median = make_record("full", 128, median_s=1e-3)
        no_median["median_s"] = None
        handle.write(json.dumps({"schema_version": 1, **no_median}) + "\n")
        bad_case = make_record("full", 256, median_s=1e-3)
        bad_case["case"]["seq_len"] = -1
        handle.write(json.dumps({"schema_version": 1, **bad_case}) + "\n")
    results = load.load_results([path])
    assert len(results.frame) == 3 * len(LENGTHS)
    assert len(results.problems) == 4
    assert any("unknown status" in p for p in results.problems)
    assert any("without a positive median_s" in p for p in results.problems)
    assert any("invalid case" in p for p in results.problems)


def test_load_rejects_other_schema_versions_and_empty_files(tmp_path: Path) -> None:
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"schema_version": 99, **make_record("full", 256, median_s=1.0)}) + "\n")
    with pytest.raises(ResultsError, match="schema version 99"):
        load.load_results([other])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ResultsError, match="no usable result records"):
        load.load_results([empty])
    with pytest.raises(ResultsError, match="cannot read"):
        load.load_results([tmp_path / "missing.jsonl"])


def test_later_record_of_a_case_supersedes_earlier(tmp_path: Path) -> None:
    first = write_results(tmp_path / "a.jsonl", [make_record("full", 1024, median_s=1.0)])
    second = write_results(tmp_path / "b.jsonl", [make_record("full", 1024, median_s=2.0)])
    results = load.load_results([first, second])
    assert results.superseded == 1
    assert results.frame["median_s"].tolist() == [2.0]


def test_environments_are_kept_apart(tmp_path: Path) -> None:
    other_env = {**ENV, "host": "otherhost", "num_threads": 16}
    records = synthetic_study() + [r for r in synthetic_study(env=other_env) if r["case"]["impl"] != "full"]
    results = load.load_results([write_results(tmp_path / "mixed.jsonl", records)])
    assert len(results.env_ids) == 2
    assert len(results.environments) == 2
    assert set(results.environments["host"]) == {"testhost", "otherhost"}
    an = analysis.analyze(results)
    # one curve per impl and environment: the records of the two machines are never pooled
    assert len(an.exponents) == 3 + 2
    assert sorted(an.exponents.groupby("impl").size().to_dict().items()) == [("full", 1), ("linear", 2), ("sdpa", 2)]
    other_id = load.env_id_of(other_env)
    crossovers = an.crossovers[an.crossovers["env_id"] == other_id]
    # the other machine ran no `full`: nothing there is compared with this machine's `full`
    assert set(crossovers["baseline"]) == {"sdpa"}
    speedups = an.speedups[an.speedups["env_id"] == other_id]
    assert speedups["full_median_s"].isna().all()


def test_env_id_is_stable_and_depends_on_identity_only() -> None:
    assert load.env_id_of(ENV) == load.env_id_of({**ENV, "timestamp": "2030-01-01", "git_commit": "x"})
    assert load.env_id_of(ENV) != load.env_id_of({**ENV, "torch_version": "2.4.0"})


def test_complexity_sources(tmp_path: Path) -> None:
    records = [
        make_record("mystery", 1024, median_s=1.0, impl_info=False),
        make_record("mystery", 2048, median_s=2.0, impl_info=False),
        make_record("metaimpl", 1024, median_s=1.0, impl_info=False, meta={"time_complexity": "O(n w d)"}),
        make_record("metaimpl", 2048, median_s=2.0, impl_info=False, meta={"time_complexity": "O(n w d)"}),
    ]
    path = write_results(tmp_path / "c.jsonl", records)
    exponents = analysis.exponent_table(load.load_results([path]).frame)
    assert math.isnan(_row(exponents, impl="mystery")["time_theory"])
    assert _row(exponents, impl="metaimpl")["time_theory"] == 1.0
    mapping = {"mystery": {"time_complexity": "O(n^2 d)", "memory_complexity": "O(n^2)"}}
    exponents = analysis.exponent_table(load.load_results([path], complexities=mapping).frame)
    assert _row(exponents, impl="mystery")["time_theory"] == 2.0
    assert _row(exponents, impl="mystery")["memory_complexity"] == "O(n^2)"


# ---------------------------------------------------------------- tables


def test_exponents_beside_theory(study: load.Results) -> None:
    exponents = analysis.exponent_table(study.frame)
    full = _row(exponents, impl="full")
    assert full["time_exponent"] == pytest.approx(2.0, abs=0.02)
    assert full["time_low"] < 2.0 < full["time_high"]
    assert full["time_high"] - full["time_low"] < 0.1
    assert full["time_theory"] == 2.0 and full["memory_theory"] == 2.0
    assert full["memory_exponent"] == pytest.approx(2.0, abs=1e-9)
    # the OOM at 16384 is not a point of the fit; 1024..8192 are
    assert full["time_points"] == 4 and full["time_fit_min_seq_len"] == 1024 and full["time_fit_max_seq_len"] == 8192
    linear = _row(exponents, impl="linear")
    assert linear["time_exponent"] == pytest.approx(1.0, abs=1e-9)
    assert linear["memory_exponent"] == pytest.approx(1.0, abs=0.02)
    assert linear["time_theory"] == 1.0


def test_fit_range_excludes_overhead_dominated_lengths(tmp_path: Path) -> None:
    # below 1024 a fixed 1 ms overhead dominates; from 1024 on, t = 1e-9 n^2
    records = [make_record("full", n, median_s=(1e-3 if n < 1024 else 1e-9 * n * n) * WOBBLE[n]) for n in LENGTHS]
    frame = load.load_results([write_results(tmp_path / "o.jsonl", records)]).frame
    default = _row(analysis.exponent_table(frame), impl="full")
    assert default["time_exponent"] == pytest.approx(2.0, abs=0.05)
    everything = _row(analysis.exponent_table(frame, min_seq_len=1), impl="full")
    assert everything["time_exponent"] < 1.8
    window = _row(analysis.exponent_table(frame, min_seq_len=2048, max_seq_len=8192), impl="full")
    assert window["time_points"] == 3 and window["time_fit_max_seq_len"] == 8192


def test_crossover_function() -> None:
    # ratio 2000/n crosses 1 at exactly 2000 in log-log
    crossing = analysis.crossover([1024, 2048, 4096], [2000 / 1024, 2000 / 2048, 2000 / 4096])
    assert crossing.kind == "at" and crossing.seq_len == pytest.approx(2000)
    assert analysis.crossover([256, 512], [0.5, 0.4]).text() == "always"
    assert analysis.crossover([256, 512], [2.0, 1.5]).text() == "never"
    assert analysis.crossover([256, 512, 1024], [0.5, 2.0, 3.0]).text() == "never"
    # faster, slower, then faster for good: the crossover is the last one
    assert analysis.crossover([256, 512, 1024], [0.5, 2.0, 0.5]).seq_len == pytest.approx(724.08, rel=1e-3)
    assert analysis.crossover([], []).text() == "no common lengths"


def test_crossovers_known_by_construction(study: load.Results) -> None:
    table = analysis.crossover_table(study.frame)
    linear_full = _row(table, impl="linear", baseline="full")
    # t_linear / t_full = 2000 / (n * wobble): the crossing lies between 1024 and 2048, near 2000
    assert linear_full["crossover_seq_len"] == pytest.approx(2000, rel=0.01)
    assert linear_full["common_max_seq_len"] == 8192  # full is OOM at 16384
    assert linear_full["baseline_failed_from_seq_len"] == 16384
    assert _row(table, impl="linear", baseline="sdpa")["crossover_seq_len"] == pytest.approx(4000, rel=0.01)
    assert _row(table, impl="sdpa", baseline="full")["crossover"] == "always"
    assert _row(table, impl="full", baseline="sdpa")["crossover"] == "never"
    assert table[(table["impl"] == "full") & (table["baseline"] == "full")].empty


def test_speedups(study: load.Results) -> None:
    speedups = analysis.speedup_table(study.frame)
    sdpa = speedups[(speedups["impl"] == "sdpa") & (speedups["seq_len"] <= 8192)]
    assert sdpa["speedup_vs_full"].tolist() == pytest.approx([2.0] * 6)
    assert _row(speedups, impl="full", seq_len=1024)["speedup_vs_sdpa"] == pytest.approx(0.5)
    assert math.isnan(_row(speedups, impl="sdpa", seq_len=16384)["speedup_vs_full"])  # full OOM there


def test_roofline_and_errors(study: load.Results) -> None:
    roofline = analysis.roofline_table(study.frame)
    row = _row(roofline, impl="full", seq_len=1024)
    assert row["roofline"] == pytest.approx(row["achieved_flops_per_s"] / row["peak_flops_per_s"])
    errors = analysis.error_table(study.frame)
    assert set(errors["impl"]) == {"linear"}
    assert _row(errors, seq_len=1024)["rel_error_peaked"] == pytest.approx(3 * (0.05 + 1024e-6))


def test_stop_points(study: load.Results) -> None:
    stops = analysis.stop_points(study.frame)
    row = _row(stops, impl="full")
    assert (row["seq_len"], row["status_label"], row["last_ok_seq_len"]) == (16384, "OOM", 8192)


def test_memory_budget(study: load.Results) -> None:
    exponents = analysis.exponent_table(study.frame)
    # full needs 32 n^2 bytes: 2 GiB holds n = 8192 (measured), not 16384 (OOM there anyway)
    budget = analysis.budget_table(study.frame, exponents, budget_bytes=2 * 2**30)
    full = _row(budget, impl="full")
    assert (full["basis"], full["max_seq_len"]) == ("at least", 8192)
    assert "OOM" in full["note"]
    budget = analysis.budget_table(study.frame, exponents, budget_bytes=1 * 2**30)
    full = _row(budget, impl="full")
    assert (full["basis"], full["max_seq_len"]) == ("measured", 4096)
    # sdpa needs 2048 n bytes, every measured length fits 1 GiB: solved from the fit, n = 2^30 / 2048
    sdpa = _row(budget, impl="sdpa")
    assert sdpa["basis"] == "extrapolated"
    assert sdpa["max_seq_len"] == pytest.approx(2**30 / 2048, abs=1)
    # 1 TiB would be n = 2^40 / 2048, far past the measured lengths: reported as the extrapolation limit
    huge = _row(analysis.budget_table(study.frame, exponents, budget_bytes=2**40), impl="sdpa")
    longest = study.frame[(study.frame["impl"] == "sdpa") & (study.frame["status"] == "ok")]["seq_len"].max()
    assert (huge["basis"], huge["max_seq_len"]) == ("beyond", analysis.MAX_EXTRAPOLATION * longest)
    tiny = _row(analysis.budget_table(study.frame, exponents, budget_bytes=1000), impl="full")
    assert tiny["basis"] == "none"


def test_backward_ratio_and_layers(tmp_path: Path) -> None:
    records = []
    for n in (1024, 2048):
        records.append(make_record("full", n, median_s=1e-9 * n * n))
        records.append(make_record("full", n, mode="fwd+bwd", median_s=3e-9 * n * n))
        for depth in (1, 2, 4):
            records.append(
                make_record("full", n, scope="layers", depth=depth, median_s=1e-3 * depth, peak_bytes=1e6 * depth)
            )
            records.append(
                make_record(
                    "full", n, scope="layers", depth=depth, residual="reversible", median_s=2e-3 * depth, peak_bytes=1e6
                )
            )
    records.append(make_record("full", 4096, scope="layers", depth=4, status="timeout"))
    frame = load.load_results([write_results(tmp_path / "l.jsonl", records)]).frame
    ratio = analysis.backward_ratio_table(frame)
    attention = ratio[ratio["scope"] == "attention"]
    assert attention["fwd_bwd_over_fwd"].tolist() == pytest.approx([3.0, 3.0])
    layers = analysis.layers_table(frame)
    assert len(layers) == 13
    assert set(layers["status"]) == {"ok", "timeout"}
