"""``attnbench export --format pytest-benchmark``: the JSON that ``pytest-benchmark compare`` reads."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import ROOT, attnbench
from test_analysis import ENV, make_record, synthetic_study, write_results

from bench.report import export
from bench.report.load import load_results


@pytest.fixture
def results_file(tmp_path: Path) -> Path:
    return write_results(tmp_path / "study.jsonl", synthetic_study())


def _pytest_benchmark_command() -> list[str]:
    executable = shutil.which("pytest-benchmark")
    return [executable] if executable else [sys.executable, "-m", "pytest_benchmark"]


@pytest.mark.parametrize(
    "samples",
    [
        [0.5],
        [3.0, 1.0],
        [1.0, 2.0, 3.0, 4.0, 100.0],
        [1.0, 1.1, 0.9, 1.05, 0.95, 1.2, 5.0],
        [float(i % 7) + 0.5 for i in range(20)],
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
    ],
)
def test_stats_match_pytest_benchmark(samples: list[float]) -> None:
    stats_module = pytest.importorskip("pytest_benchmark.stats")
    reference = stats_module.Stats()
    for value in samples:
        reference.update(value)
    ours = export.benchmark_stats(samples, iterations=3)
    version = tuple(int(x) for x in importlib.metadata.version("pytest-benchmark").split(".")[:2])
    for field, value in reference.as_dict().items():
        if field == "hd15iqr" and version < (5, 3):
            continue  # fixed in 5.3: older releases returned the first datum above the fence
        assert ours[field] == pytest.approx(value) if isinstance(value, float) else ours[field] == value, field
    assert ours["data"] == samples and ours["iterations"] == 3


def test_document_layout(results_file: Path) -> None:
    document = export.to_pytest_benchmark(load_results([results_file]))
    assert set(document) == {"machine_info", "commit_info", "benchmarks", "datetime", "version"}
    assert document["datetime"] == ENV["timestamp"]
    assert document["commit_info"]["id"] == ENV["git_commit"]
    assert document["machine_info"]["node"] == "testhost"
    ok_records = [r for r in synthetic_study() if r["status"] == "ok"]
    assert len(document["benchmarks"]) == len(ok_records)  # the OOM case is not a benchmark
    bench = next(b for b in document["benchmarks"] if b["params"]["impl"] == "sdpa" and b["params"]["seq_len"] == 1024)
    assert set(bench) == {"group", "name", "fullname", "params", "param", "extra_info", "options", "stats"}
    assert bench["param"] == "sdpa-fwd-cpu-float32-b1h8d64-n1024"
    assert bench["name"] == "attention[sdpa-fwd-cpu-float32-b1h8d64-n1024]"
    assert bench["stats"]["median"] == pytest.approx(0.5e-9 * 1024**2 * 1.008)
    assert bench["stats"]["rounds"] == 9
    assert bench["extra_info"]["peak_bytes"] == 2048.0 * 1024
    assert bench["extra_info"]["rel_error_random"] is None
    json.dumps(document, allow_nan=False)  # no NaN anywhere


def test_mixed_environments_need_a_choice(tmp_path: Path) -> None:
    other = {**ENV, "host": "otherhost"}
    results = load_results([write_results(tmp_path / "m.jsonl", synthetic_study() + synthetic_study(env=other))])
    with pytest.raises(export.ExportError, match="2 environments"):
        export.to_pytest_benchmark(results)
    chosen = results.env_ids[1]
    document = export.to_pytest_benchmark(results, env_id=chosen)
    assert document["machine_info"]["attnbench"]["env_id"] == chosen
    with pytest.raises(export.ExportError, match="unknown environment"):
        export.to_pytest_benchmark(results, env_id="nope")


def test_cli_export_is_read_by_pytest_benchmark_compare(results_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("pytest_benchmark")
    out = tmp_path / "export" / "attnbench.json"
    done = attnbench("export", str(results_file), "--format", "pytest-benchmark", "--out", str(out))
    assert done.returncode == 0, done.stderr
    again = tmp_path / "again.json"
    assert attnbench("export", str(results_file), "--out", str(again)).returncode == 0
    assert out.read_bytes() == again.read_bytes()  # deterministic
    workdir = tmp_path / "cwd"  # pytest-benchmark creates .benchmarks/ in its working directory
    workdir.mkdir()
    compared = subprocess.run(
        [*_pytest_benchmark_command(), "compare", str(out), "--group-by=param:seq_len"],
        capture_output=True,
        text=True,
        cwd=workdir,
        timeout=120,
    )
    assert compared.returncode == 0, compared.stderr
    assert "Failed to load" not in compared.stdout + compared.stderr
    for impl in ("full", "sdpa", "linear"):
        assert f"attention[{impl}-fwd-cpu-float32-b1h8d64-n1024]" in compared.stdout
    assert "seq_len=1024" in compared.stdout and "seq_len=16384" in compared.stdout


@pytest.mark.parametrize(
    ("records", "extra", "message"),
    [
        ("mixed", [], "environments"),
        ("failed", [], "no ok case"),
        ("study", ["--format", "csv"], "invalid choice"),
    ],
)
def test_cli_export_usage_errors(tmp_path: Path, records: str, extra: list[str], message: str) -> None:
    if records == "mixed":
        content = synthetic_study() + synthetic_study(env={**ENV, "host": "otherhost"})
    elif records == "failed":
        content = [make_record("full", 1024, status="oom")]
    else:
        content = synthetic_study()
    path = write_results(tmp_path / "r.jsonl", content)
    done = attnbench("export", str(path), "--out", str(tmp_path / "x.json"), *extra)
    assert done.returncode == 2
    assert message in done.stderr
    assert not (tmp_path / "x.json").exists()


def test_export_runs_without_torch(results_file: Path, tmp_path: Path) -> None:
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "torch.py").write_text("raise ImportError('torch is deliberately unavailable in this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stub), str(ROOT)])}
    code = "import sys\nfrom bench.cli import main\nrc = main(sys.argv[1:])\nassert 'torch' not in sys.modules\nsys.exit(rc)"
    out = tmp_path / "x.json"
    done = subprocess.run(
        [sys.executable, "-c", code, "export", str(results_file), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["benchmarks"]
