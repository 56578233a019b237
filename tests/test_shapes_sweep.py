"""A sweep of the shapes and modes beyond self-attention, through the real command line: decode steps record
their cache's bytes, grouped heads and cross lengths run where an implementation supports them, and the rest
are recorded as skipped with the reason."""

from __future__ import annotations

import json
from pathlib import Path

from cli_helpers import attnbench

from bench.cases import Case

SWEEP = ["run", "--impls", "full,linear,local,sparse", "--seq-lens", "64,128", "--processes", "1"]
FAST = ["--min-time", "0.01", "--min-samples", "5", "--quiet"]


def _records(path: Path) -> dict[tuple, dict]:
    found = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        case = Case.from_dict(record["case"])
        found[(case.impl, case.mode, case.key_value_heads, case.q_len, case.seq_len)] = record
    return found


def test_decode_and_grouped_heads_through_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "shapes.jsonl"
    done = attnbench(*SWEEP, "--modes", "decode,fwd", "--kv-heads", "same,2", *FAST, "--out", str(out))
    assert done.returncode == 0, done.stderr
    records = _records(out)
    for n in (64, 128):
        for kv_heads in (8, 2):
            full = records[("full", "decode", kv_heads, 0, n)]
            assert full["status"] == "ok" and full["case"]["causal"] is True
            assert full["cache_bytes"] == 2 * kv_heads * n * 64 * 4  # every key and value, float32
            linear = records[("linear", "decode", kv_heads, 0, n)]
            assert linear["cache_bytes"] == kv_heads * 64 * 65 * 4  # (S | z), whatever n
            local = records[("local", "decode", kv_heads, 0, n)]
            assert local["cache_bytes"] == 2 * kv_heads * min(129, n) * 64 * 4  # the window of 128 + 1
            assert records[("full", "fwd", kv_heads, 0, n)]["status"] == "ok"
            assert records[("full", "fwd", kv_heads, 0, n)].get("cache_bytes") is None
        sparse = records[("sparse", "decode", 8, 0, n)]
        assert sparse["status"] == "skipped" and sparse["message"] == "sparse does not support decoding"
        grouped = records[("sparse", "fwd", 2, 0, n)]
        assert grouped["message"] == "sparse does not support grouped key/value heads (kv_heads < heads)"
    assert records[("full", "decode", 8, 0, 128)]["flops"] == 4.0 * 8 * 128 * 64  # one query against 128 keys


def test_cross_lengths_through_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "cross.jsonl"
    done = attnbench(*SWEEP, "--modes", "fwd", "--q-lens", "32,96", "--causal", *FAST, "--out", str(out))
    assert done.returncode == 0, done.stderr
    records = _records(out)
    assert records[("full", "fwd", 8, 32, 128)]["flops"] == 4.0 * 8 * 32 * 128 * 64
    assert records[("local", "fwd", 8, 96, 128)]["status"] == "ok"
    more_queries = records[("full", "fwd", 8, 96, 64)]  # causal: the first queries would see no key
    assert more_queries["status"] == "skipped" and "q_len <= seq_len" in more_queries["message"]
    sparse = records[("sparse", "fwd", 8, 32, 64)]
    assert sparse["message"] == "sparse does not support queries and keys of different lengths (cross-attention)"


def test_a_decode_case_is_budgeted_for_its_one_query_its_cache_and_its_step() -> None:
    from bench.measure.plan import estimate_bytes

    case = Case(impl="full", seq_len=65536, mode="decode", kv_heads=1)
    keys_and_values = cache = 2 * 65536 * 64 * 4  # one key/value head, float32
    step = 3 * 8 * 65536 * 4 + 8 * 64 * 4  # one query row of scores per head, and the output
    assert estimate_bytes(case) == 8 * 64 * 4 + keys_and_values + cache + step


def test_key_value_heads_as_many_as_heads_name_the_one_case(tmp_path: Path) -> None:
    out = tmp_path / "same.jsonl"
    done = attnbench(
        "run", "--impls", "full", "--seq-lens", "64", "--modes", "fwd", "--kv-heads", "same,8,4", "--processes", "1",
        *FAST, "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert sorted(_records(out)) == [("full", "fwd", 4, 0, 64), ("full", "fwd", 8, 0, 64)]
    assert len(out.read_text().splitlines()) == 2  # measured once each
