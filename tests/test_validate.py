"""``attnbench crosscheck`` and ``attnbench validate``, checked on the CPU: the crosscheck's numbers and table,
the one-line errors, and the validation's steps (planned, never run: they need a GPU)."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import attnbench

from bench.cli import build_parser, main
from bench.measure import crosscheck, validate

# ---------------------------------------------------------------- crosscheck


def test_crosscheck_on_the_cpu_writes_the_csv_and_prints_the_table(tmp_path) -> None:
    out = tmp_path / "deep" / "crosscheck.csv"
    result = attnbench(
        "crosscheck", "--impls", "sdpa", "--seq-lens", "512", "--min-time", "0.05", "--rounds", "2", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    with out.open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames or ()) == crosscheck.CSV_FIELDS
    assert len(rows) == 1
    row = rows[0]
    assert (row["impl"], row["seq_len"], row["mode"], row["device"], row["dtype"]) == (
        "sdpa",
        "512",
        "fwd",
        "cpu",
        "float32",
    )
    assert row["status"] == "ok", row
    harness, independent, ratio = (float(row[k]) for k in ("harness_median_s", "independent_median_s", "ratio"))
    assert harness > 0 and independent > 0
    assert math.isfinite(ratio) and ratio > 0
    assert ratio == pytest.approx(harness / independent, rel=1e-4)
    assert row["within"] in ("yes", "no")
    assert row["harness_timer"] == "clock" and row["independent_method"] == crosscheck.CPU_METHOD
    assert len(row["harness_rounds_s"].split(";")) == len(row["independent_rounds_s"].split(";")) == 2
    assert "| impl | n | mode |" in result.stdout and "| sdpa | 512 | fwd | cpu | float32 |" in result.stdout
    assert f"table: {out}" in result.stdout
    assert not list(out.parent.glob(".*.tmp"))  # the temporary file was renamed into place


def test_crosscheck_alternates_the_methods_and_takes_each_ones_best_round(monkeypatch) -> None:
    from bench.cases import Case
    from bench.options import MeasureOptions

    order: list[str] = []
    harness_values = iter([3.0, 1.0, 2.0])
    independent_values = iter([2.0, 2.0, 5.0])

    class Stats:
        timer = "clock"

        def __init__(self, median_s):
            self.median_s = median_s

    monkeypatch.setattr(crosscheck, "time_callable", lambda fn, **kw: order.append("h") or Stats(next(harness_values)))
    monkeypatch.setattr(
        crosscheck, "cpu_timer_median_s", lambda fn, **kw: order.append("i") or next(independent_values)
    )
    result = crosscheck.crosscheck_case(Case("sdpa", 16, heads=1, head_dim=8), MeasureOptions(min_time_s=0.0), rounds=3)
    assert result.status == "ok", result
    assert order == ["h", "i", "i", "h", "h", "i"]
    assert result.harness_median_s == 1.0 and result.independent_median_s == 2.0
    assert result.ratio == 0.5 and result.within is False
    row = result.row()
    assert row["rounds"] == 3 and row["triton_median_s"] is None
    assert crosscheck.CrosscheckResult.from_json(json.loads(json.dumps(result.to_json()))) == result


def test_crosscheck_runs_each_case_in_a_worker_and_goes_on_after_one_dies(tmp_path) -> None:
    out = tmp_path / "crosscheck.csv"
    result = attnbench(
        "crosscheck", "--impls", "fault_abort,fault_raise,sdpa", "--seq-lens", "64", "--min-time", "0.01",
        "--rounds", "2", "--out", str(out), ATTNBENCH_IMPORT="fault_impls",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = {row["impl"]: row for row in csv.DictReader(out.open())}
    assert rows["fault_abort"]["status"] == "crashed" and "SIGABRT" in rows["fault_abort"]["message"]
    assert rows["fault_raise"]["status"] == "error"
    assert rows["sdpa"]["status"] == "ok" and float(rows["sdpa"]["ratio"]) > 0 and rows["sdpa"]["rounds"] == "2"


def test_crosscheck_replaces_the_worker_where_a_sweep_would(monkeypatch) -> None:
    """After a case that fails on an accelerator (a broken CUDA context) the next case gets a new worker."""
    from bench.cases import Case
    from bench.options import MeasureOptions

    started = []

    class Counted(crosscheck.WorkerProcess):
        def __init__(self, **kwargs) -> None:
            started.append(1)
            super().__init__(**kwargs)

    monkeypatch.setattr(crosscheck, "WorkerProcess", Counted)
    monkeypatch.setattr(crosscheck, "needs_new_worker", lambda case, status: status == "error")  # as on CUDA
    monkeypatch.setenv("ATTNBENCH_IMPORT", "fault_impls")
    tests = Path(__file__).parent
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tests), str(tests.parent)]))
    cases = [Case("fault_raise", 16, heads=1, head_dim=8), Case("sdpa", 16, heads=1, head_dim=8)]
    results = crosscheck.run_crosscheck(cases, MeasureOptions(min_time_s=0.01), rounds=1, log=lambda line: None)
    assert [r.status for r in results] == ["error", "ok"] and len(started) == 2


def test_a_case_that_fails_is_a_row_with_its_status() -> None:
    from bench.cases import Case
    from bench.options import MeasureOptions

    result = crosscheck.crosscheck_case(
        Case("linformer", 64, causal=True, heads=1, head_dim=8), MeasureOptions(min_time_s=0.0), rounds=1
    )
    assert result.status == "skipped" and "causal" in result.message
    assert result.ratio is None and result.within is None
    table = crosscheck.markdown_table([result.row()])
    assert "skipped" in table and table.count("\n") == 2
    assert crosscheck.read_csv(crosscheck.to_csv([result]))[0]["status"] == "skipped"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--impls", "fulll"], "did you mean full"),
        (["--impls", "zz*"], "no implementation matches"),
        (["--seq-lens", "1024:256:x2"], "malformed range"),
        (["--seq-lens", ""], "--seq-lens is empty"),
        (["--modes", "train"], "unknown mode"),
        (["--dtypes", "float8"], "unknown dtype"),
        (["--devices", "tpu"], "unknown device"),
        (["--min-time", "0"], "--min-time must be a positive number"),
        (["--min-time", "nan"], "--min-time must be a positive number"),
        (["--rounds", "0"], "--rounds must be at least 1"),
    ],
)
def test_crosscheck_bad_input_is_one_line_and_no_file(tmp_path, capsys, args, fragment) -> None:
    out = tmp_path / "sub" / "c.csv"
    code = main(["crosscheck", *args, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("attnbench crosscheck: error: ") and fragment in err[0], err
    assert not out.exists() and not out.parent.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_crosscheck_on_an_absent_device_is_one_line(tmp_path, capsys) -> None:
    out = tmp_path / "c.csv"
    assert main(["crosscheck", "--impls", "sdpa", "--devices", "cuda", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not available" in err[0], err
    assert not out.exists()


def test_crosscheck_output_that_can_not_be_written_is_one_line(tmp_path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["crosscheck", "--impls", "sdpa", "--seq-lens", "64", "--out", str(blocker / "c.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot" in err[0] and "c.csv" in err[0], err


# ---------------------------------------------------------------- validate


def test_validate_without_cuda_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu"
    assert main(["validate", "--out", str(out), "--report-dir", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"attnbench validate needs a CUDA device; this torch ({torch.__version__}) sees none"]
    assert not out.exists() and not (tmp_path / "report").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_validate_command_without_cuda(tmp_path) -> None:
    result = attnbench("validate", "--quick", "--out", str(tmp_path / "gpu"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"attnbench validate needs a CUDA device; this torch ({torch.__version__}) sees none"
    ]
    assert not (tmp_path / "gpu").exists()


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("NVIDIA H200", "nvidia-h200"),
        ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
        ("NVIDIA GeForce RTX 4090", "nvidia-geforce-rtx-4090"),
        ("  Tesla V100-SXM2-16GB ", "tesla-v100-sxm2-16gb"),
        ("NVIDIA A100-SXM4-80GB (MIG 1g.10gb)", "nvidia-a100-sxm4-80gb-mig-1g-10gb"),
        ("???", "gpu"),
    ],
)
def test_gpu_slug(name, slug) -> None:
    assert validate.gpu_slug(name) == slug


def test_default_dirs_are_named_after_the_gpu() -> None:
    assert validate.default_dirs("NVIDIA H200") == (Path("results/gpu/nvidia-h200"), Path("reports/gpu/nvidia-h200"))


def test_plan_steps_in_order_with_every_output_under_the_folder(tmp_path) -> None:
    out, report = tmp_path / "results", tmp_path / "report"
    steps = validate.plan_steps("NVIDIA H200", out, report, python="/py/bin/python")
    assert [step.name for step in steps] == ["tests", "sweep", "decode", "crosscheck", "report"]
    tests, sweep, decode, check, rep = steps
    assert tests.child and tests.argv == ("/py/bin/python", "-m", "pytest", "-q", "-m", "cuda", "tests/")
    assert tests.output == out / "cuda-tests.txt"
    assert sweep.output == out / "sweep.jsonl" and check.output == out / "crosscheck.csv" and rep.output == report
    assert all(step.output.parent == out for step in steps[:4])
    assert decode.output == sweep.output  # one results file, one report

    def flags(step):
        return dict(zip(step.argv[1::2], step.argv[2::2], strict=False))

    assert sweep.argv[0] == "run" and not sweep.child
    assert flags(sweep) == {
        "--impls": "*",
        "--seq-lens": "1024:32768:x2",
        "--modes": "fwd,fwd+bwd",
        "--dtypes": "bfloat16,float32",
        "--devices": "cuda:all",  # every GPU of the machine, a lane each
        "--out": str(out / "sweep.jsonl"),
    }
    assert flags(decode)["--modes"] == "decode" and flags(decode)["--seq-lens"] == "1024:65536:x4"
    assert flags(decode)["--kv-heads"] == "same,1" and flags(decode)["--devices"] == "cuda:all"
    assert check.argv[0] == "crosscheck"
    assert flags(check)["--impls"] == "sdpa,full" and flags(check)["--seq-lens"] == "4096,16384"
    assert flags(check)["--devices"] == "cuda" and flags(check)["--dtypes"] == "bfloat16"
    assert rep.argv == ("report", str(out / "sweep.jsonl"), "--out", str(report))
    parser = build_parser()
    for step in steps[1:]:  # every attnbench step is a valid command line
        args = parser.parse_args(list(step.argv))
        assert args.command == step.argv[0]


def test_plan_steps_quick_and_without_tests(tmp_path) -> None:
    steps = validate.plan_steps("NVIDIA H100 80GB HBM3", tmp_path, tmp_path / "r", skip_tests=True, quick=True)
    assert [step.name for step in steps] == ["sweep", "decode", "crosscheck", "report"]
    assert "1024:4096:x2" in steps[0].argv and "1024:32768:x2" not in steps[0].argv
    assert "1024:4096:x4" in steps[1].argv and "1024:65536:x4" not in steps[1].argv
    assert "4096" in steps[2].argv and "4096,16384" not in steps[2].argv


def test_pytest_summary_line() -> None:
    text = "....s.\n=== short test summary info ===\nSKIPPED [1] x\n===== 5 passed, 1 skipped in 3.21s =====\n"
    assert validate.summary_line(text) == "5 passed, 1 skipped in 3.21s"
    assert validate.summary_line("1 failed, 2 passed in 0.5s\n") == "1 failed, 2 passed in 0.5s"
    assert validate.summary_line("") == "(no output)"


def test_run_child_keeps_the_output_and_its_summary_line(tmp_path) -> None:
    (tmp_path / "tests").mkdir()
    step = validate.Step(
        "tests",
        "a child",
        (sys.executable, "-c", "print('..'); print('== 2 passed in 0.01s ==')"),
        tmp_path / "out.txt",
        child=True,
    )
    lines: list[str] = []
    code, note = validate.run_child(step, cwd=tmp_path, echo=lines.append)
    assert code == 0 and note == "2 passed in 0.01s"
    assert (tmp_path / "out.txt").read_text() == "..\n== 2 passed in 0.01s ==\n"
    assert lines == ["..", "== 2 passed in 0.01s =="]
    code, note = validate.run_child(step, cwd=tmp_path / "elsewhere", echo=lines.append)
    assert code != 0 and "no tests/ folder" in note


def test_run_steps_goes_on_after_a_failure_and_sums_up(tmp_path, monkeypatch) -> None:
    import bench.cli
    from bench.cases import Case

    steps = validate.plan_steps("NVIDIA H200", tmp_path / "r", tmp_path / "rep", skip_tests=True)
    calls = []

    def fake_main(argv):
        calls.append(argv[0])
        if argv[0] != "crosscheck":
            return 2  # the sweep fails before it writes anything
        row = crosscheck.CrosscheckResult(
            Case("sdpa", 4096, device="cuda", dtype="bfloat16"),
            "ok",
            harness_rounds_s=(1.0e-3,),
            independent_rounds_s=(1.05e-3,),
            harness_timer="cuda-events",
            independent_method=crosscheck.CUDA_METHOD,
        )
        out = Path(argv[argv.index("--out") + 1])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(crosscheck.to_csv([row]))
        return 0

    monkeypatch.setattr(bench.cli, "main", fake_main)
    lines: list[str] = []
    outcomes = validate.run_steps(steps, echo=lines.append)
    assert calls == ["run", "run", "crosscheck"]  # the report needs the sweep's results
    assert [outcome.code for outcome in outcomes] == [2, 2, 0, None]
    assert validate.exit_code(outcomes) == 1
    assert any(line.startswith("$ attnbench run --impls '*'") for line in lines)
    text = "\n".join(validate.summary(outcomes, gpu_name="NVIDIA H200", skip_tests=True))
    assert "tests: not run (--skip-tests)" in text
    assert "sweep: FAILED (exit 2)" in text and "decode: FAILED (exit 2)" in text
    assert "headline: not run: the sweep wrote no" in text
    assert "| sdpa | 4096 | fwd | cuda | bfloat16 |" in text and "| 0.952 | yes |" in text
