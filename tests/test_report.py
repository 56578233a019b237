"""``attnbench report``: the markdown, tables and figures; determinism; no torch needed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import ROOT, attnbench
from test_analysis import ENV, make_record, synthetic_study, write_results

from bench.report import plot_style
from bench.report.formatting import fmt_sig, markdown_table
from bench.report.markdown import ReportOptions, write_report

FIGURE_STEMS = ("time_vs_seq_len", "memory_vs_seq_len", "fwd_bwd_ratio", "layers_memory_vs_depth", "speed_vs_error")


def full_study() -> list[dict]:
    """The synthetic study, plus fwd+bwd for two impls and a layer stack with a timeout."""
    records = synthetic_study()
    for n in (1024, 2048, 4096):
        records.append(make_record("full", n, mode="fwd+bwd", median_s=3e-9 * n * n, peak_bytes=96.0 * n * n))
        records.append(make_record("sdpa", n, mode="fwd+bwd", median_s=1.2e-9 * n * n, peak_bytes=6144.0 * n))
    for residual, per_layer_bytes in (("standard", 4e6), ("reversible", 0.5e6)):
        for depth in (1, 2, 4):
            records.append(
                make_record(
                    "full",
                    1024,
                    mode="fwd+bwd",
                    scope="layers",
                    depth=depth,
                    residual=residual,
                    median_s=1e-2 * depth,
                    peak_bytes=4e6 + per_layer_bytes * depth,
                )
            )
    records.append(make_record("full", 1024, mode="fwd+bwd", scope="layers", depth=8, status="timeout"))
    return records


@pytest.fixture(scope="module")
def results_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_results(tmp_path_factory.mktemp("results") / "study.jsonl", full_study())


@pytest.fixture(scope="module")
def report(results_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    write_report([results_file], out_dir=out)
    return out


def test_report_contents(report: Path) -> None:
    text = (report / "README.md").read_text()
    for heading in ("## Environment", "## Grid", "## Headline", "## Median time by length (ms)", "## Figures"):
        assert heading in text
    assert "testhost" in text and "Test CPU 9000" in text and "2025-01-02T03:04:05+00:00" in text
    headline = text.split("## Headline")[1].split("\n## ")[0]
    full_row = next(line for line in headline.splitlines() if line.startswith("| full | fwd |"))
    assert "2.00 [" in full_row and "`O(n^2 d)`" in full_row
    linear_row = next(line for line in headline.splitlines() if line.startswith("| linear | fwd |"))
    assert "| 1.00 [1.00, 1.00] (5 pts) | 1 `O(n d^2)` |" in linear_row
    crossover_vs_full = int(linear_row.split(" | ")[7])  # 2000 by construction, moved a little by the wobble
    assert abs(crossover_vs_full - 2000) < 20
    sdpa_row = next(line for line in headline.splitlines() if line.startswith("| sdpa | fwd |"))
    assert "| always |" in sdpa_row
    assert "(extrapolated)" in sdpa_row
    assert "OOM" in text  # full at 16384: in the by-length table and in "Where curves stopped"
    assert "## Where curves stopped" in text and "timeout" in text
    assert "## Approximation error" in text and "## Layer stacks" in text


def test_report_files(report: Path) -> None:
    text = (report / "README.md").read_text()
    for stem in FIGURE_STEMS:
        png, svg = report / "figures" / f"{stem}.png", report / "figures" / f"{stem}.svg"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", stem
        assert svg.read_text().lstrip().startswith("<?xml"), stem
        assert f"](figures/{stem}.png)" in text and f"(figures/{stem}.svg)" in text
    for name in ("measurements", "exponents", "crossovers", "speedups", "roofline", "memory_budget", "errors"):
        path = report / "tables" / f"{name}.csv"
        assert path.stat().st_size > 0
        assert f"](tables/{name}.csv)" in text


def test_every_figure_has_a_sentence(report: Path) -> None:
    text = (report / "README.md").read_text()
    figures = text.split("## Figures")[1].split("\n## ")[0]
    blocks = figures.split("### ")[1:]
    assert len(blocks) >= len(FIGURE_STEMS)
    for block in blocks:
        caption = [line for line in block.splitlines() if line and not line.startswith("![")][1]
        assert caption.endswith("))") and "." in caption


def test_report_is_deterministic(results_file: Path, tmp_path: Path) -> None:
    import matplotlib

    rc_before = dict(matplotlib.rcParams)
    first, second = tmp_path / "one", tmp_path / "two"
    write_report([results_file], out_dir=first)
    write_report([results_file], out_dir=second)
    assert (first / "README.md").read_bytes() == (second / "README.md").read_bytes()
    csvs = sorted(p.name for p in (first / "tables").glob("*.csv"))
    assert csvs and csvs == sorted(p.name for p in (second / "tables").glob("*.csv"))
    for name in csvs:
        assert (first / "tables" / name).read_bytes() == (second / "tables" / name).read_bytes(), name
    for svg in sorted((first / "figures").glob("*.svg")):
        assert svg.read_bytes() == (second / "figures" / svg.name).read_bytes(), svg.name
        assert "<dc:date>" not in svg.read_text()
    # plotting leaves matplotlib's global settings as it found them
    rc_after = dict(matplotlib.rcParams)
    assert {key for key in rc_before if rc_before[key] != rc_after[key]} == set()


def test_mixed_environments_are_reported_apart(tmp_path: Path) -> None:
    other = {**ENV, "host": "otherhost", "torch_version": "2.4.0"}
    path = write_results(tmp_path / "mixed.jsonl", synthetic_study() + synthetic_study(env=other))
    out = tmp_path / "report"
    write_report([path], out_dir=out, options=ReportOptions(figures=True))
    text = (out / "README.md").read_text()
    assert "**Warning:** these results come from 2 environments" in text
    headline = text.split("## Headline")[1].split("\n## ")[0]
    full_rows = [line for line in headline.splitlines() if "| full | fwd |" in line]
    assert len(full_rows) == 2  # one per environment, each naming its env first
    assert all(not line.startswith("| full") for line in full_rows)
    time_figures = sorted(p.name for p in (out / "figures").glob("time_vs_seq_len--*.png"))
    assert len(time_figures) == 2


def test_the_report_says_where_cases_ran_when_a_sweep_had_several_lanes(tmp_path: Path) -> None:
    from bench.report.load import load_results

    records = synthetic_study(env={**ENV, "gpu_uuid": None})
    for index, record in enumerate(records):
        record.update(lane=f"cuda:{index % 2}", executor="ray")
    records[0]["env"] = {**records[0]["env"], "gpu_uuid": "GPU-1234"}  # not an identity field: one environment
    records.append({**make_record("full", 96, status="skipped"), "lane": None, "executor": "ray"})
    path = write_results(tmp_path / "lanes.jsonl", records)
    lanes = load_results([path]).lanes
    assert sorted(lanes["lane"]) == ["cuda:0", "cuda:0", "cuda:1"]  # cuda:0 with and without its UUID
    assert lanes["records"].sum() == len(records) - 1  # the skipped case ran on no lane
    out = tmp_path / "report"
    write_report([path], out_dir=out, options=ReportOptions(figures=False))
    text = (out / "README.md").read_text()
    assert "Where the cases ran" in text and "| ray | cuda:1 |" in text and "GPU-1234" in text
    # one lane of the local executor, as every sweep before lanes: no table
    plain = write_results(tmp_path / "plain.jsonl", synthetic_study())
    write_report([plain], out_dir=tmp_path / "plain", options=ReportOptions(figures=False))
    assert "Where the cases ran" not in (tmp_path / "plain" / "README.md").read_text()


def test_report_leaves_no_stale_figures(results_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "old_figure.png").write_bytes(b"old")
    (out / "figures" / "notes.txt").write_text("kept")
    write_report([results_file], out_dir=out, options=ReportOptions(figures=False))
    assert not (out / "figures" / "old_figure.png").exists()
    assert (out / "figures" / "notes.txt").exists()
    assert "## Figures" not in (out / "README.md").read_text()


def test_palette_is_stable() -> None:
    palette = plot_style.impl_palette(["sdpa", "full", "linear"])
    assert palette == plot_style.impl_palette(["linear", "sdpa", "full", "full"])
    assert len(set(palette.values())) == 3


def test_formatting_helpers() -> None:
    assert [fmt_sig(v) for v in (0.000123, 0.0123, 1.23456, 123.456, 12345.6, float("nan"), 0.0)] == [
        "1.23e-04",
        "0.0123",
        "1.23",
        "123",
        "12,346",
        "–",
        "0",
    ]
    assert (
        markdown_table(["a", "b"], [["x|y", 1]], align_right=[False, True])
        == "| a | b |\n| --- | ---: |\n| x\\|y | 1 |"
    )


# ---------------------------------------------------------------- the command


def test_cli_report(results_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "reports"
    done = attnbench(
        "report", str(results_file.parent), "--out", str(out), "--fit-min-seq-len", "512", "--no-figures", timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "report:" in done.stdout
    assert "n ≥ 512" in (out / "README.md").read_text()


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (None, ["{tmp}/missing.jsonl"], "does not exist"),
        ("empty", ["{tmp}/empty.jsonl"], "no usable result records"),
        ("schema", ["{tmp}/schema.jsonl"], "schema version 7"),
        (None, ["{tmp}/study.jsonl", "--fit-min-seq-len", "0"], "--fit-min-seq-len"),
        (None, ["{tmp}/study.jsonl", "--budget-gb", "-1"], "--budget-gb"),
        ("emptydir", ["{tmp}/emptydir"], "no .jsonl results files"),
    ],
)
def test_cli_report_usage_errors(tmp_path: Path, setup: str | None, args: list[str], message: str) -> None:
    write_results(tmp_path / "study.jsonl", synthetic_study())
    if setup == "empty":
        (tmp_path / "empty.jsonl").write_text("\n")
    elif setup == "schema":
        (tmp_path / "schema.jsonl").write_text('{"schema_version": 7, "case": {}, "status": "ok"}\n')
    elif setup == "emptydir":
        (tmp_path / "emptydir").mkdir()
    done = attnbench("report", *(arg.format(tmp=tmp_path) for arg in args), "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnbench report: error:") and message in lines[0], done.stderr


def test_report_runs_without_torch(results_file: Path, tmp_path: Path) -> None:
    """A PYTHONPATH entry whose torch.py records the attempt and raises: the report must never try."""
    stub = tmp_path / "stub"
    stub.mkdir()
    marker = tmp_path / "torch-was-imported"
    (stub / "torch.py").write_text(
        "import os\n"
        "open(os.environ['TORCH_IMPORT_MARKER'], 'w').write('imported')\n"
        "raise ImportError('torch is deliberately unavailable in this test')\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(stub), str(ROOT)])
    env["TORCH_IMPORT_MARKER"] = str(marker)
    out = tmp_path / "report"
    code = (
        "import sys\n"
        "from bench.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(rc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "report", str(results_file), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert not marker.exists(), "something tried to import torch"
    assert (out / "README.md").exists() and (out / "figures" / "time_vs_seq_len.svg").exists()


def test_report_modules_never_import_torch() -> None:
    """Every module of bench/report (found with pkgutil: a new one is covered too), with bench.cases and
    bench.results, imports without torch."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import bench.report\n"
        "names = ['bench.cases', 'bench.results']\n"
        "names += [m.name for m in pkgutil.iter_modules(bench.report.__path__, 'bench.report.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(len(names))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= 2 + 10  # bench.cases, bench.results and the modules of bench/report


@pytest.mark.slow
def test_end_to_end_from_a_real_run(tmp_path: Path) -> None:
    results = tmp_path / "run.jsonl"
    run = attnbench(
        "run", "--impls", "full,sdpa", "--seq-lens", "64,128", "--modes", "fwd", "--min-time", "0.01",
        "--out", str(results), "--quiet", timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = tmp_path / "report"
    done = attnbench("report", str(results), "--out", str(out), "--fit-min-seq-len", "64", timeout=300)
    assert done.returncode == 0, done.stderr
    text = (out / "README.md").read_text()
    assert "| full | fwd |" in text and "| sdpa | fwd |" in text
    assert (out / "figures" / "time_vs_seq_len.png").exists()
