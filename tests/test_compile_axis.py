"""The compile axis (``attnbench run --compile off,on``): the case field, the grid, the worker's first call,
compile time and recompilations, failures recorded with the compiler's reason, and the report's section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import attnbench
from test_analysis import make_record

from bench.cases import Case, GridError, expand_grid
from bench.measure import compiled
from bench.measure.compiled import Compiler
from bench.measure.worker import run_case
from bench.options import MeasureOptions
from bench.report.compilation import compilation_table
from bench.report.load import load_results
from bench.report.markdown import write_report

QUICK = MeasureOptions(min_time_s=0.05)


def test_an_eager_case_keeps_its_key_and_a_compiled_one_says_so() -> None:
    eager = Case("full", 256)
    assert "compile" not in eager.to_dict() and Case.from_dict(eager.to_dict()) == eager
    built = Case("full", 256, compile=True)
    assert built.to_dict()["compile"] is True and Case.from_dict(built.to_dict()) == built
    assert built.key() != eager.key() and built.label().endswith("compiled")
    with pytest.raises(GridError, match="compile must be true or false"):
        Case("full", 256, compile="yes")


def test_the_grid_has_each_case_eager_and_compiled() -> None:
    cases = expand_grid(
        impls={"full": {}},
        seq_lens=(256, 512),
        devices=("cpu",),
        dtypes=("float32",),
        modes=("fwd",),
        batch=1,
        heads=2,
        head_dim=16,
        causal=False,
        scope="attention",
        compile=(False, True),
    )
    assert [(c.compile, c.seq_len) for c in cases] == [(False, 256), (False, 512), (True, 256), (True, 512)]


def test_a_bad_compile_choice_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    done = attnbench("run", "--impls", "full", "--seq-lens", "64", "--compile", "maybe", "--out", str(out))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["attnbench run: error: unknown compile 'maybe' (choose from off, on)"]
    assert not out.exists()


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_a_compiled_case_times_its_compilation_apart(mode: str) -> None:
    record = run_case(Case("full", 128, mode=mode, heads=2, head_dim=16, compile=True), QUICK)
    assert record["status"] == "ok", record["message"]
    assert record["compiled_graphs"] >= 1 and record["recompiles"] == 0
    assert record["compile_calls"] == 2  # the first compiles; the second compiles nothing new
    # its samples are compiled calls: none of them anywhere near the compilation's time
    assert record["compile_s"] > 10 * max(record["samples"])


def test_an_eager_case_has_no_compilation_fields() -> None:
    record = run_case(Case("full", 128, heads=2, head_dim=16), QUICK)
    assert record["status"] == "ok" and "compile_s" not in record


def test_a_decode_case_is_not_compiled() -> None:
    record = run_case(Case("full", 128, mode="decode", heads=2, head_dim=16, compile=True), QUICK)
    assert record["status"] == "skipped" and "decode steps are measured eager" in record["message"]


def test_a_failed_compilation_is_an_error_with_the_compilers_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(self, graph_module, example_inputs):
        raise RuntimeError("no kernel for this op\nsecond line")

    monkeypatch.setattr(Compiler, "__call__", failing)
    record = run_case(Case("full", 128, heads=2, head_dim=16, compile=True), QUICK)
    assert record["status"] == "error"
    assert record["message"].startswith("torch.compile failed: ") and "no kernel for this op" in record["message"]
    assert "\n" not in record["message"]


def test_a_case_refused_while_compiling_is_skipped_not_failed() -> None:
    """flex_local's training step on the CPU is refused inside its forward, which the first call compiles."""
    record = run_case(Case("flex_local", 128, mode="fwd+bwd", heads=2, head_dim=16, compile=True), QUICK)
    assert record["status"] == "skipped" and record["message"].startswith("FlexAttention has no backward")


def test_recompilations_after_the_compiling_calls_are_counted() -> None:
    """Compiled for static shapes: a call with another shape after the compiling ones compiles anew."""
    module, compiler = compiled.compile_module(torch.nn.Tanh())
    compiler.compile(lambda: module(torch.ones(4)), lambda: None)
    assert compiler.compile_calls == 2 and compiler.graphs_before_timing == 1
    for size in (5, 6):
        module(torch.ones(size))
    fields = compiler.fields(median_s=0.0)
    assert fields["compiled_graphs"] == 1 and fields["recompiles"] == 2


def test_a_module_that_changes_after_its_first_call_is_compiled_until_it_settles() -> None:
    """A cache filled in the first call sends the second down another path: compiled before timing too."""

    class Caching(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cached = None

        def forward(self, x):
            if self.cached is None:
                self.cached = x.sum()
                return x * 2
            return x * 2 + self.cached

    module, compiler = compiled.compile_module(Caching())
    compiler.compile(lambda: module(torch.ones(4)), lambda: None)
    assert compiler.compile_calls == 3 and compiler.graphs_before_timing == 2
    module(torch.ones(4))
    assert compiler.fields(median_s=0.0)["recompiles"] == 0


def _compiled_results(tmp_path: Path) -> Path:
    path = tmp_path / "r.jsonl"
    lines = []
    for seq_len, eager_s, compiled_s in ((1024, 0.010, 0.006), (2048, 0.020, 0.011)):
        lines.append(make_record("local", seq_len, median_s=eager_s))
        record = make_record("local", seq_len, median_s=compiled_s)
        record["case"]["compile"] = True
        record.update(compile_s=3.5, compile_calls=2, compiled_graphs=2, recompiles=0)
        lines.append(record)
    path.write_text("".join(json.dumps({"schema_version": 1, **line}) + "\n" for line in lines))
    return path


def test_the_report_shows_compiled_beside_eager(tmp_path: Path) -> None:
    path = _compiled_results(tmp_path)
    frame = load_results([path]).frame
    assert set(frame["impl"]) == {"local", "local+compiled"}  # a curve of its own in every table and figure
    table = compilation_table(frame)
    assert list(table["seq_len"]) == [1024, 2048]
    assert table["speedup"].round(3).tolist() == [round(0.010 / 0.006, 3), round(0.020 / 0.011, 3)]
    write_report([path], out_dir=tmp_path / "report")
    text = (tmp_path / "report" / "README.md").read_text()
    assert "## Compiled and eager" in text
    assert "| local | fwd | 1024 | 10.0 | 6.00 | 1.67× | 3.50 | 2 | no |" in text
