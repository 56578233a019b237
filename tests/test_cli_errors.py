"""Bad input through the real command line: one clear line on stderr, exit code 2, no traceback, no file."""

from __future__ import annotations

import json

import pytest
from cli_helpers import attnbench

BASE = ["run", "--modes", "fwd", "--min-time", "0.01", "--quiet"]

# (id, extra arguments, fragment the error line must contain)
BAD_INPUTS = [
    ("unknown-impl", ["--impls", "fulll"], "did you mean full"),
    ("unmatched-wildcard", ["--impls", "zz*"], "no implementation matches"),
    ("empty-lengths", ["--seq-lens", ""], "--seq-lens is empty"),
    ("negative-length", ["--seq-lens", "-5"], "must be >= 1"),
    ("zero-length", ["--seq-lens", "0,128"], "must be >= 1"),
    ("non-integer-length", ["--seq-lens", "12.5"], "must be an integer"),
    ("reversed-range", ["--seq-lens", "1024:256:x2"], "malformed range"),
    ("bad-range-step", ["--seq-lens", "256:1024:y2"], "malformed range"),
    ("range-two-parts", ["--seq-lens", "256:1024"], "malformed range"),
    ("unknown-dtype", ["--dtypes", "float8"], "unknown dtype 'float8'"),
    ("unknown-mode", ["--modes", "train"], "unknown mode 'train'"),
    ("unknown-device", ["--devices", "tpu"], "unknown device 'tpu'"),
    ("unavailable-device", ["--devices", "cuda:7"], "available: cpu"),
    ("unknown-param-impl", ["--param", "nothere.k=1"], "unknown attention implementation 'nothere'"),
    ("unknown-param-name", ["--impls", "full", "--param", "full.k=1"], "no hyperparameter 'k'"),
    ("malformed-param", ["--param", "linformer"], "malformed --param"),
    ("zero-batch", ["--batch", "0"], "--batch must be at least 1"),
]


def _error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {result.stderr!r}"
    return lines[0]


@pytest.mark.parametrize(("extra", "fragment"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_clear_line(tmp_path, extra, fragment) -> None:
    out = tmp_path / "out.jsonl"
    args = [*BASE, "--seq-lens", "64", "--out", str(out), *extra]
    result = attnbench(*args, timeout=120)
    assert result.returncode == 2, (result.returncode, result.stderr)
    line = _error_line(result)
    assert "Traceback" not in result.stderr
    assert fragment in line, line
    assert not out.exists(), "no partial output file"


def test_unwritable_output_path(tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "out.jsonl"
    result = attnbench(*BASE, "--seq-lens", "64", "--out", str(out))
    assert result.returncode == 2
    assert "not a writable directory" in _error_line(result)


def test_incompatible_schema(tmp_path) -> None:
    out = tmp_path / "old.jsonl"
    out.write_text(json.dumps({"schema_version": 999, "case": {}, "status": "ok"}) + "\n")
    result = attnbench(*BASE, "--seq-lens", "64", "--out", str(out))
    assert result.returncode == 2
    assert "schema version 999" in _error_line(result)
    assert out.read_text().count("\n") == 1, "the file is left as it was"
