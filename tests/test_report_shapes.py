"""The report on the shapes and modes beyond self-attention: decode curves (time per token and cache bytes,
fitted against the step's complexity), grouped key/value heads at one length, cross-attention curves at a
fixed query length, and the headline's column of what each implementation supports."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from test_analysis import make_record, write_results

from bench.report.markdown import write_report

LENGTHS = (1024, 4096, 16384, 65536)
SUPPORTS = {"causal": True, "grouped_heads": True, "cross": True, "decode": True}
DECODE_COMPLEXITY = {"full": "O(n d)", "linear": "O(d^2)"}


def _shaped(record: dict, *, info: dict | None = None, **case) -> dict:
    record["case"].update(case)
    record["impl_info"] = {**record.get("impl_info", {}), **SUPPORTS, **(info or {})}
    return record


def shapes_study() -> list[dict]:
    records = []
    for n in LENGTHS:  # decode: full reads a KV cache growing with n, linear a state of fixed size
        for impl, time_s, cache in (("full", 2e-8 * n, 2048.0 * n), ("linear", 5e-5, 133120.0)):
            record = make_record(impl, n, mode="decode", median_s=time_s, peak_bytes=1e4)
            record["cache_bytes"] = cache
            info = {"decode_complexity": DECODE_COMPLEXITY[impl]}
            records.append(_shaped(record, info=info, causal=True))
    for kv_heads, time_s in ((8, 4.0), (2, 3.6), (1, 3.5)):  # grouped heads at one length
        record = make_record("full", 8192, median_s=time_s, peak_bytes=8e8)
        records.append(_shaped(record, kv_heads=0 if kv_heads == 8 else kv_heads))
    for n in (2048, 4096, 8192, 16384):  # 1024 queries against n keys
        record = make_record("full", n, median_s=1e-9 * 1024 * n, peak_bytes=12.0 * 1024 * n)
        records.append(_shaped(record, q_len=1024))
    return records


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    results = write_results(tmp_path_factory.mktemp("results") / "shapes.jsonl", shapes_study())
    out = tmp_path_factory.mktemp("report")
    write_report([results], out_dir=out)
    return out


def _headline_rows(report: Path) -> list[list[str]]:
    headline = (report / "README.md").read_text().split("## Headline")[1].split("\n## ")[0]
    lines = [line for line in headline.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_decode_rows_fit_time_per_token_and_cache_bytes_against_the_steps_complexity(report: Path) -> None:
    rows = _headline_rows(report)
    header = rows[0]
    decode = {row[header.index("impl")]: row for row in rows[2:] if row[header.index("mode")] == "decode"}
    time_k, memory_k = header.index("time k [CI]"), header.index("memory k [CI]")
    assert decode["full"][time_k].startswith("1.00 [") and decode["full"][time_k + 1] == "1 `O(n d)`"
    assert decode["full"][memory_k].startswith("1.00 [")  # the cache's bytes, not the step's peak
    assert decode["linear"][time_k].startswith("0.00 [") and decode["linear"][time_k + 1] == "0 `O(d^2)`"
    assert decode["linear"][memory_k].startswith("0.00 [")
    assert decode["full"][header.index("supports")] == "causal, GQA, cross, decode"


def test_the_memory_budget_of_a_decode_curve_is_its_cache() -> None:
    from bench.report.analysis import analyze
    from bench.report.load import load_results

    with tempfile.TemporaryDirectory() as folder:
        results = load_results([write_results(Path(folder) / "shapes.jsonl", shapes_study())])
    budget = analyze(results, budget_bytes=100 * 2**20).budget
    decode = budget[budget["mode"] == "decode"].set_index("impl")
    assert decode.loc["full", "basis"] == "measured" and decode.loc["full", "max_seq_len"] == 16384  # 128 MiB at 64K
    assert decode.loc["linear", "basis"] == "at least"  # a cache that does not grow: no length runs out


def test_the_decode_cache_and_grouped_heads_have_sections(report: Path) -> None:
    text = (report / "README.md").read_text()
    cache = text.split("## Decode cache by length (MiB)")[1].split("\n## ")[0]
    full_row = next(line for line in cache.splitlines() if "| full |" in line)
    assert full_row.rstrip().endswith("| 2.00 | 8.00 | 32.0 | 128 |")
    grouped = text.split("## Grouped key/value heads")[1].split("\n## ")[0]
    assert "| 8 kv heads | 2 kv heads | 1 kv heads |" in grouped
    assert "| 4,000 ms / 763 MiB | 3,600 ms / 763 MiB | 3,500 ms / 763 MiB |" in grouped


def test_grouped_heads_have_a_figure_of_time_and_memory_against_the_key_value_heads(report: Path) -> None:
    assert (report / "figures" / "grouped_heads.png").stat().st_size > 0
    text = (report / "README.md").read_text()
    assert "Grouped key/value heads: time and memory" in text.split("## Figures")[1]


def test_cross_attention_curves_get_figures_of_their_own(report: Path) -> None:
    figures = sorted(p.name for p in (report / "figures").glob("time_vs_seq_len*.png"))
    assert any("-q1024" in name for name in figures), figures
    assert any("kv2" in name for name in figures) and any("kv1" in name for name in figures), figures
    rows = _headline_rows(report)
    header = rows[0]
    cross = [row for row in rows[2:] if row[header.index("queries")] == "1024"]
    assert len(cross) == 1 and cross[0][header.index("time k [CI]")].startswith("1.00 [")
    assert cross[0][header.index("time k [CI]") + 1] == "–"  # self-attention's complexity is not theirs
