"""Grid parsing and the Case key."""

from __future__ import annotations

import pytest

from bench.cases import Case, GridError, GridRequest, expand_grid, parse_param_overrides, parse_seq_lens


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("256", [256]),
        ("512,256,256", [256, 512]),
        ("256:2048:x2", [256, 512, 1024, 2048]),
        ("256:2000:x2", [256, 512, 1024]),
        ("1000:3000:+1000", [1000, 2000, 3000]),
        ("1,3:27:x3", [1, 3, 9, 27]),
    ],
)
def test_parse_seq_lens(text, expected) -> None:
    assert parse_seq_lens(text) == expected


@pytest.mark.parametrize(
    "text", ["", " ", "0", "-1", "1.5", "a", "4:2:x2", "2:4:x1", "2:4:+0", "2:4:*2", "2:4", "1,,2"]
)
def test_parse_seq_lens_rejects(text) -> None:
    with pytest.raises(GridError):
        parse_seq_lens(text)


def test_case_key_round_trip_and_hash() -> None:
    case = Case(impl="linformer", seq_len=1024, params=(("k", 128),))
    again = Case.from_dict(case.to_dict())
    assert again == case and hash(again) == hash(case) and again.key() == case.key()
    assert Case(impl="linformer", seq_len=2048).key() != case.key()
    assert case.family_key() == Case(impl="linformer", seq_len=4096, params=(("k", 128),)).family_key()


def test_case_validates() -> None:
    with pytest.raises(GridError, match="unknown mode"):
        Case(impl="full", seq_len=8, mode="train")
    with pytest.raises(GridError, match="seq_len must be a positive integer"):
        Case(impl="full", seq_len=0)


def test_param_overrides() -> None:
    request = GridRequest(
        impls=("*",),
        seq_lens=(64,),
        dtypes=("float32",),
        modes=("fwd",),
        batch=1,
        heads=1,
        head_dim=8,
        causal=False,
        scope="attention",
        depths=(1,),
        params=parse_param_overrides(["linformer.k=128", "linformer.share_kv=true"]),
    )
    assert request.overrides() == {"linformer": {"k": "128", "share_kv": "true"}}
    with pytest.raises(GridError):
        parse_param_overrides(["linformer.k"])


def test_expand_grid_orders_curves_short_to_long() -> None:
    cases = expand_grid(
        impls={"full": {}, "sdpa": {}},
        seq_lens=[512, 256],
        devices=["cpu"],
        dtypes=["float32"],
        modes=["fwd"],
        batch=1,
        heads=2,
        head_dim=8,
        causal=False,
        scope="attention",
    )
    assert [(c.impl, c.seq_len) for c in cases] == [("full", 256), ("full", 512), ("sdpa", 256), ("sdpa", 512)]


def test_key_value_heads_and_query_length_name_one_shape_each() -> None:
    base = Case(impl="full", seq_len=1024)
    assert (base.kv_heads, base.key_value_heads, base.q_len, base.query_len) == (0, 8, 0, 1024)
    assert Case(impl="full", seq_len=1024, kv_heads=8) == base  # as many as heads: the same case
    grouped = Case(impl="full", seq_len=1024, kv_heads=2, q_len=256)
    assert (grouped.key_value_heads, grouped.query_len) == (2, 256)
    assert "kv_heads=2" in grouped.label() and "q_len=256" in grouped.label()
    assert Case.from_dict(grouped.to_dict()) == grouped
    old = {k: v for k, v in base.to_dict().items() if k not in ("kv_heads", "q_len")}  # a record from before them
    assert Case.from_dict(old) == base


def test_decode_cases_are_causal_and_take_no_query_length() -> None:
    assert Case(impl="full", seq_len=64, mode="decode").causal is True
    with pytest.raises(GridError, match="one query"):
        Case(impl="full", seq_len=64, mode="decode", q_len=16)
    with pytest.raises(GridError, match="multiple of kv_heads"):
        Case(impl="full", seq_len=64, kv_heads=3)
    with pytest.raises(GridError, match="layer scope"):
        Case(impl="full", seq_len=64, scope="layers", kv_heads=2)


def test_expand_grid_crosses_key_value_heads_and_query_lengths_and_keeps_decode_self_attention() -> None:
    common = dict(devices=["cpu"], dtypes=["float32"], batch=1, heads=8, head_dim=64, causal=False, scope="attention")
    cases = expand_grid(
        impls={"full": {}}, seq_lens=[128, 64], modes=["fwd", "decode"], kv_heads=(0, 2), q_lens=(0, 32), **common
    )
    fwd = [(c.kv_heads, c.q_len, c.seq_len) for c in cases if c.mode == "fwd"]
    assert fwd == [
        (0, 0, 64),
        (0, 0, 128),
        (0, 32, 64),
        (0, 32, 128),
        (2, 0, 64),
        (2, 0, 128),
        (2, 32, 64),
        (2, 32, 128),
    ]
    decode = [(c.kv_heads, c.q_len, c.seq_len, c.causal) for c in cases if c.mode == "decode"]
    assert decode == [(0, 0, 64, True), (0, 0, 128, True), (2, 0, 64, True), (2, 0, 128, True)]
