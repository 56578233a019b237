"""Bad input through the real command line: one clear line on stderr, exit code 2, no traceback, no file left.

One table for every subcommand; ``{tmp}`` is a fresh folder, ``{good}`` a valid results file in it.
The outputs each row names must not exist afterwards (and files given as input are left as they were).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from cli_helpers import attnbench

from bench.cases import Case

RUN = ["run", "--modes", "fwd", "--min-time", "0.01", "--quiet", "--seq-lens", "64"]
OUT = "{tmp}/out.jsonl"

# (id, arguments, fragment the error line must contain, paths that must not exist afterwards)
BAD_INPUTS = [
    # run: the grid
    ("unknown-impl", [*RUN, "--impls", "fulll", "--out", OUT], "did you mean full", [OUT]),
    ("unmatched-wildcard", [*RUN, "--impls", "zz*", "--out", OUT], "no implementation matches", [OUT]),
    ("empty-lengths", [*RUN, "--seq-lens", "", "--out", OUT], "--seq-lens is empty", [OUT]),
    ("negative-length", [*RUN, "--seq-lens", "-5", "--out", OUT], "must be >= 1", [OUT]),
    ("zero-length", [*RUN, "--seq-lens", "0,128", "--out", OUT], "must be >= 1", [OUT]),
    ("huge-length", [*RUN, "--seq-lens", "99999999999", "--out", OUT], "exceeds", [OUT]),
    ("non-integer-length", [*RUN, "--seq-lens", "12.5", "--out", OUT], "must be an integer", [OUT]),
    ("reversed-range", [*RUN, "--seq-lens", "1024:256:x2", "--out", OUT], "malformed range", [OUT]),
    ("bad-range-step", [*RUN, "--seq-lens", "256:1024:y2", "--out", OUT], "malformed range", [OUT]),
    ("range-two-parts", [*RUN, "--seq-lens", "256:1024", "--out", OUT], "malformed range", [OUT]),
    ("unknown-dtype", [*RUN, "--dtypes", "float8", "--out", OUT], "unknown dtype 'float8'", [OUT]),
    ("unknown-mode", [*RUN, "--modes", "train", "--out", OUT], "unknown mode 'train'", [OUT]),
    ("unknown-device", [*RUN, "--devices", "tpu", "--out", OUT], "unknown device 'tpu'", [OUT]),
    ("unavailable-device", [*RUN, "--devices", "cuda:7", "--out", OUT], "available: cpu", [OUT]),
    ("zero-batch", [*RUN, "--batch", "0", "--out", OUT], "--batch must be at least 1", [OUT]),
    ("text-heads", [*RUN, "--heads", "eight", "--out", OUT], "invalid int value", [OUT]),
    ("unknown-scope", [*RUN, "--scope", "model", "--out", OUT], "invalid choice", [OUT]),
    ("zero-depth", [*RUN, "--depths", "0", "--out", OUT], "--depths must be positive", [OUT]),
    ("unknown-residual", [*RUN, "--residual", "sideways", "--out", OUT], "unknown residual", [OUT]),
    ("unknown-flag", [*RUN, "--lengths", "64", "--out", OUT], "unrecognized arguments", [OUT]),
    ("kv-heads-not-divisor", [*RUN, "--kv-heads", "3", "--out", OUT], "--kv-heads must divide --heads (8)", [OUT]),
    ("kv-heads-zero", [*RUN, "--kv-heads", "0", "--out", OUT], "positive integers or 'same'", [OUT]),
    ("kv-heads-text", [*RUN, "--kv-heads", "two", "--out", OUT], "an item of --kv-heads", [OUT]),
    ("q-lens-empty", [*RUN, "--q-lens", ",", "--out", OUT], "--q-lens is empty", [OUT]),
    ("q-lens-negative", [*RUN, "--q-lens", "-4", "--out", OUT], "positive integers or 'same'", [OUT]),
    (
        "layers-with-kv-heads",
        [*RUN, "--scope", "layers", "--kv-heads", "2", "--out", OUT],
        "--kv-heads and --q-lens are for --scope attention",
        [OUT],
    ),
    (
        "decode-with-q-lens",
        ["run", "--modes", "fwd,decode", "--q-lens", "16", "--seq-lens", "64", "--out", OUT],
        "it takes no --q-lens",
        [OUT],
    ),
    (
        "layers-decode",
        ["run", "--modes", "decode", "--scope", "layers", "--seq-lens", "64", "--out", OUT],
        "--modes decode is for --scope attention",
        [OUT],
    ),
    # run: hyperparameters
    ("unknown-param-impl", [*RUN, "--param", "nothere.k=1", "--out", OUT], "unknown attention implementation", [OUT]),
    ("unknown-param-name", [*RUN, "--impls", "full", "--param", "full.k=1", "--out", OUT], "no hyperparameter", [OUT]),
    ("malformed-param", [*RUN, "--param", "linformer", "--out", OUT], "malformed --param", [OUT]),
    ("param-not-run", [*RUN, "--impls", "full", "--param", "linformer.k=8", "--out", OUT], "not among", [OUT]),
    (
        "param-wrong-type",
        [*RUN, "--impls", "linformer", "--param", "linformer.k=abc", "--out", OUT],
        "linformer.k",
        [OUT],
    ),
    ("param-zero", [*RUN, "--impls", "linformer", "--param", "linformer.k=0", "--out", OUT], "linformer.k", [OUT]),
    (
        "param-unknown-layout",
        [*RUN, "--impls", "sparse", "--param", "sparse.layout=zigzag", "--out", OUT],
        "sparse.layout",
        [OUT],
    ),
    # run: options
    ("timeout-nan", [*RUN, "--timeout", "nan", "--out", OUT], "--timeout must be a positive number", [OUT]),
    ("timeout-zero", [*RUN, "--timeout", "0", "--out", OUT], "--timeout must be a positive number", [OUT]),
    ("min-time-negative", [*RUN, "--min-time", "-1", "--out", OUT], "--min-time must be a number >= 0", [OUT]),
    ("min-time-inf", [*RUN, "--min-time", "inf", "--out", OUT], "--min-time must be a number >= 0", [OUT]),
    ("budget-nan", [*RUN, "--budget-gb", "nan", "--out", OUT], "--budget-gb must be a positive number", [OUT]),
    ("budget-zero", [*RUN, "--budget-gb", "0", "--out", OUT], "--budget-gb must be a positive number", [OUT]),
    ("threads-zero", [*RUN, "--threads", "0", "--out", OUT], "--threads must be an integer >= 1", [OUT]),
    ("min-samples-two", [*RUN, "--min-samples", "2", "--out", OUT], "--min-samples must be an integer >= 5", [OUT]),
    ("error-max-len-negative", [*RUN, "--error-max-len", "-1", "--out", OUT], "--error-max-len must be", [OUT]),
    ("cpu-lanes-zero", [*RUN, "--cpu-lanes", "0", "--out", OUT], "--cpu-lanes must be an integer >= 1", [OUT]),
    (
        "cpu-lanes-past-the-cores",
        [*RUN, "--cpu-lanes", "4096", "--threads", "1", "--out", OUT],
        "4096 CPU lanes of 1 threads need 4096 cores",
        [OUT],
    ),
    ("cpu-lanes-unpinned", [*RUN, "--cpu-lanes", "2", "--no-pin", "--out", OUT], "needs pinning", [OUT]),
    ("cuda-all-and-one", [*RUN, "--devices", "cuda:all,cuda:1", "--out", OUT], "already names every GPU", [OUT]),
    ("unknown-executor", [*RUN, "--executor", "dask", "--out", OUT], "invalid choice", [OUT]),
    ("ray-address-local", [*RUN, "--ray-address", "auto", "--out", OUT], "--ray-address is for --executor ray", [OUT]),
    # run: what the ray executor can not run, refused before Ray starts (or, without Ray, Ray is missing)
    *(
        [
            (
                "ray-mps",
                [*RUN, "--executor", "ray", "--devices", "mps", "--out", OUT],
                "runs cpu and cuda lanes",
                [OUT],
            ),
            ("ray-gpu-index", [*RUN, "--executor", "ray", "--devices", "cuda:1", "--out", OUT], "cuda:all", [OUT]),
        ]
        if importlib.util.find_spec("ray")
        else [("ray-missing", [*RUN, "--executor", "ray", "--out", OUT], "pip install 'attnbench[ray]'", [OUT])]
    ),
    # run: the results file
    ("out-missing-proc-dir", [*RUN, "--out", "/proc/nope/x.jsonl"], "cannot write /proc/nope/x.jsonl", []),
    ("out-in-proc", [*RUN, "--out", "/proc/x.jsonl"], "cannot write /proc/x.jsonl", []),
    ("out-device", [*RUN, "--out", "/dev/full"], "not a regular file", []),
    ("out-directory", [*RUN, "--out", "{tmp}"], "is a directory", []),
    ("out-under-a-file", [*RUN, "--out", "{good}/x.jsonl"], "Not a directory", []),
    # report
    ("report-missing-file", ["report", "{tmp}/none.jsonl", "--out", "{tmp}/rep"], "does not exist", ["{tmp}/rep"]),
    ("report-empty-folder", ["report", "{tmp}/empty", "--out", "{tmp}/rep"], "no .jsonl results files", ["{tmp}/rep"]),
    ("report-device", ["report", "/dev/full", "--out", "{tmp}/rep"], "not a regular file", ["{tmp}/rep"]),
    (
        "report-no-records",
        ["report", "{tmp}/junk.jsonl", "--out", "{tmp}/rep"],
        "no usable result records",
        ["{tmp}/rep"],
    ),
    ("report-out-proc", ["report", "{good}", "--out", "/proc/nope/rep"], "cannot write", []),
    ("report-out-file", ["report", "{good}", "--out", "{good}"], "is not a directory", []),
    (
        "report-confidence",
        ["report", "{good}", "--confidence", "1.5", "--out", "{tmp}/rep"],
        "--confidence",
        ["{tmp}/rep"],
    ),
    (
        "report-fit-min",
        ["report", "{good}", "--fit-min-seq-len", "0", "--out", "{tmp}/rep"],
        "--fit-min-seq-len",
        ["{tmp}/rep"],
    ),
    (
        "report-budget-nan",
        ["report", "{good}", "--budget-gb", "nan", "--out", "{tmp}/rep"],
        "--budget-gb",
        ["{tmp}/rep"],
    ),
    # compare
    ("compare-missing", ["compare", "{good}", "{tmp}/none.jsonl"], "does not exist", []),
    ("compare-alpha", ["compare", "{good}", "{good}", "--alpha", "2"], "--alpha must be between 0 and 1", []),
    ("compare-min-change", ["compare", "{good}", "{good}", "--min-change", "1.5"], "--min-change", []),
    ("compare-fail-above", ["compare", "{good}", "{good}", "--fail-above", "0"], "--fail-above", []),
    ("compare-csv-proc", ["compare", "{good}", "{good}", "--csv", "/proc/nope/x.csv"], "cannot write", []),
    ("compare-csv-dir", ["compare", "{good}", "{good}", "--csv", "{tmp}"], "is a directory", []),
    ("compare-csv-no-match", ["compare", "{good}", "{other}", "--csv", "{tmp}/c/x.csv"], "no case", ["{tmp}/c"]),
    # export
    ("export-out-proc", ["export", "{good}", "--out", "/proc/nope/x.json"], "cannot write", []),
    (
        "export-unknown-env",
        ["export", "{good}", "--env", "nosuch", "--out", "{tmp}/e/x.json"],
        "unknown environment",
        ["{tmp}/e"],
    ),
    (
        "export-format",
        ["export", "{good}", "--format", "csv", "--out", "{tmp}/x.json"],
        "invalid choice",
        ["{tmp}/x.json"],
    ),
    ("export-no-out", ["export", "{good}"], "required: --out", []),
    # list
    ("list-no-match", ["list", "zz*"], "no implementation matches", []),
    ("list-unknown-flag", ["list", "--yaml"], "unrecognized arguments", []),
    ("no-command", [], "required: COMMAND", []),
]


def _record(**case) -> dict:
    env = {"host": "h", "cpu_model": "c", "gpu_name": None, "torch_version": "t", "num_threads": 1}
    return {
        "schema_version": 1,
        "case": Case(impl="full", seq_len=64, **case).to_dict(),
        "status": "ok",
        "median_s": 1e-3,
        "samples": [1e-3] * 5,
        "env": env,
    }


@pytest.fixture
def paths(tmp_path) -> dict[str, str]:
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(_record()) + "\n")
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps(_record(heads=2)) + "\n")
    (tmp_path / "junk.jsonl").write_text("{not json\n")
    (tmp_path / "empty").mkdir()
    return {"tmp": str(tmp_path), "good": str(good), "other": str(other)}


def _inputs(paths: dict[str, str]) -> dict[str, bytes]:
    return {name: Path(path).read_bytes() for name, path in paths.items() if name != "tmp"}


def _error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {result.stderr!r}"
    return lines[0]


@pytest.mark.parametrize(("args", "fragment", "absent"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_clear_line(paths, args, fragment, absent) -> None:
    before = _inputs(paths)
    result = attnbench(*(arg.format(**paths) for arg in args), timeout=120)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    line = _error_line(result)
    assert "Traceback" not in result.stderr
    assert fragment in line, line
    for path in absent:
        assert not os.path.exists(path.format(**paths)), f"{path} was left behind"
    assert _inputs(paths) == before, "input files are left as they were"


def test_the_table_covers_every_subcommand() -> None:
    commands = {row[1][0] if row[1] else None for row in BAD_INPUTS}
    assert {"run", "report", "compare", "export", "list"} <= commands
    assert len(BAD_INPUTS) >= 30


def test_incompatible_schema(tmp_path) -> None:
    out = tmp_path / "old.jsonl"
    out.write_text(json.dumps({"schema_version": 999, "case": {}, "status": "ok"}) + "\n")
    result = attnbench(*RUN, "--out", str(out))
    assert result.returncode == 2
    assert "schema version 999" in _error_line(result)
    assert out.read_text().count("\n") == 1, "the file is left as it was"
