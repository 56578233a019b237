"""bench.measure.peers without the peer packages: both modes time what they say, and the table shows them."""

from __future__ import annotations

import pytest
import torch

from bench.measure import peers


def _counting_side(calls: list[str]):
    def make(seq_len: int):
        q = torch.randn(1, 2, seq_len, 4)
        weight = torch.nn.Parameter(torch.randn(4, 4))

        def call():
            calls.append("grad" if torch.is_grad_enabled() else "no_grad")
            return q @ weight

        return call, [q, weight]

    return make


@pytest.mark.parametrize("mode", peers.MODES)
def test_each_mode_times_its_call(mode: str) -> None:
    calls: list[str] = []
    side = _counting_side(calls)
    fn = peers._timed(side, 8, mode)
    fn()
    if mode == "fwd":
        assert calls == ["no_grad"]
    else:
        assert calls == ["grad"]
    pair = peers.Pair("self", side, side, note="the same on both sides")
    row = peers.measure(pair, 8, mode, rounds=1, min_time_s=0.0, threads=1)
    assert row["mode"] == mode and row["seq_len"] == 8 and row["n_samples"] >= 3
    assert row["ours_over_peer"] == pytest.approx(row["ours_median_s"] / row["peer_median_s"])
    table = peers.markdown([row], threads=1, allocator="MALLOC_TRIM_THRESHOLD_=1")
    assert f"| self | {mode} | 8 |" in table
    assert "C allocator: MALLOC_TRIM_THRESHOLD_=1." in table  # which heap the timings had, in the table


def test_a_training_step_fills_every_leafs_gradient() -> None:
    calls: list[str] = []
    make = _counting_side(calls)
    call, leaves = make(8)
    step = peers._timed(lambda seq_len: (call, leaves), 8, "fwd+bwd")
    step()
    assert all(leaf.grad is not None for leaf in leaves)


def test_unknown_mode_is_one_line() -> None:
    with pytest.raises(SystemExit) as raised:
        peers.main(["--modes", "fwd,backward"])
    assert raised.value.code == 2


def test_unknown_pair_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        peers.main(["--pairs", "performer,flash"])
    assert raised.value.code == 2
    assert "unknown pair 'flash'" in capsys.readouterr().err


def test_every_pair_names_a_registered_mechanism() -> None:
    """--pairs selects by the label's first word: each is a registered implementation."""
    from attention_impls import list_impls

    assert {peers.mechanism(pair) for pair in peers.pairs()} <= set(list_impls())
