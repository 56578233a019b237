"""Time and peak memory are measured soundly: checked against arithmetic, not assumed."""

from __future__ import annotations

import time

import pytest
import torch

from bench.cases import Case
from bench.measure.memory import measure_peak
from bench.measure.timing import summarize, time_callable
from bench.measure.worker import run_case
from bench.options import MeasureOptions

MiB = 2**20
QUICK = MeasureOptions(min_time_s=0.0, min_samples=5)


def test_summarize_statistics() -> None:
    stats = summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert stats.median_s == 3.0
    assert stats.min_s == 1.0
    assert stats.mean_s == pytest.approx(22.0)
    assert stats.iqr_s == pytest.approx(2.0)
    assert stats.noisy
    assert not summarize([1.0, 1.0, 1.01, 1.0, 1.0]).noisy


def test_time_callable_measures_a_known_sleep() -> None:
    stats = time_callable(lambda: time.sleep(0.02), min_time_s=0.1, min_samples=5)
    assert stats.n_samples >= 5
    assert 0.02 <= stats.median_s < 0.05
    assert stats.measured_s >= 0.1


def test_time_callable_calls_only_warmup_and_samples() -> None:
    """No hidden warm-up per sample: every call is the warm-up or inside a sample."""
    calls = []
    stats = time_callable(lambda: calls.append(time.sleep(0.01)), min_time_s=0.0, min_samples=5, warmup_calls=1)
    assert stats.calls_per_sample == 1
    assert len(calls) == 1 + stats.n_samples * stats.calls_per_sample == 6


def test_cpu_peak_sees_a_known_allocation() -> None:
    def allocate():
        a = torch.ones(64 * MiB // 4)  # 64 MiB
        b = a * 2  # another 64 MiB while a is alive
        return float(b[0])

    stats = measure_peak(allocate, device="cpu")
    assert 128 * MiB <= stats.peak_bytes < 140 * MiB, stats
    if stats.rss_peak_bytes is not None:
        # pages freed earlier may still be resident and reused, so RSS need not grow by the full 128 MiB
        assert stats.rss_peak_bytes >= stats.rss_before_bytes, stats


@pytest.mark.slow
def test_full_attention_peak_is_at_least_its_score_matrix() -> None:
    """full, fwd, n=4096, batch 1, 8 heads, float32: the score matrix alone is 512 MiB."""
    record = run_case(Case(impl="full", seq_len=4096, heads=8, head_dim=64), QUICK)
    assert record["status"] == "ok", record
    assert record["n_samples"] >= 5
    score_matrix = 1 * 8 * 4096 * 4096 * 4
    assert score_matrix <= record["peak_bytes"] < 2 * 2**30
    sdpa = run_case(Case(impl="sdpa", seq_len=4096, heads=8, head_dim=64), QUICK)
    assert sdpa["status"] == "ok", sdpa
    assert sdpa["peak_bytes"] * 8 < record["peak_bytes"], (sdpa["peak_bytes"], record["peak_bytes"])


def test_fwd_bwd_needs_more_memory_than_fwd() -> None:
    fwd = run_case(Case(impl="full", seq_len=512, heads=2, head_dim=32), QUICK)
    train = run_case(Case(impl="full", seq_len=512, heads=2, head_dim=32, mode="fwd+bwd"), QUICK)
    assert fwd["status"] == train["status"] == "ok"
    assert train["peak_bytes"] > fwd["peak_bytes"]
    assert train["flops"] == pytest.approx(3 * fwd["flops"])


def test_unsupported_case_is_skipped_with_its_reason() -> None:
    pytest.importorskip("attention_impls.linformer")
    record = run_case(Case(impl="linformer", seq_len=64, causal=True, heads=2, head_dim=16), QUICK)
    assert record["status"] == "skipped"
    assert "causal" in record["message"]


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["full", "sdpa"])
def test_cuda_case_and_peak(impl) -> None:
    for mode in ("fwd", "fwd+bwd"):
        record = run_case(Case(impl=impl, seq_len=4096, device="cuda", mode=mode), QUICK)
        assert record["status"] == "ok", record
        assert record["memory_method"] == "cuda-allocator"
        if impl == "full":
            assert record["peak_bytes"] >= 8 * 4096 * 4096 * 4


@pytest.mark.cuda
def test_cuda_oom_is_recorded_as_oom() -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    seq_len = 1 << 16
    while 3 * 8 * seq_len * seq_len * 4 < 2 * total:
        seq_len *= 2
    record = run_case(Case(impl="full", seq_len=seq_len, device="cuda"), QUICK)
    assert record["status"] == "oom", record
