"""--param overrides: a case records only what differs from the implementation's defaults."""

from __future__ import annotations

import json

from cli_helpers import attnbench


def test_param_records_only_the_overrides(tmp_path) -> None:
    out = tmp_path / "params.jsonl"
    common = ["run", "--seq-lens", "64", "--modes", "fwd", "--min-time", "0.01", "--quiet", "--processes", "1"]
    common += ["--out", str(out)]
    first = attnbench(*common, "--impls", "linformer", "--param", "linformer.k=32")
    assert first.returncode == 0, first.stderr
    # the default value passed explicitly names the same case as no --param at all
    second = attnbench(*common, "--impls", "linformer", "--param", "linformer.k=256")
    assert second.returncode == 0, second.stderr
    third = attnbench(*common, "--impls", "linformer")
    assert third.returncode == 0, third.stderr
    assert "1 already done" in third.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["case"]["params"] for r in records] == [{"k": 32}, {}]
