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
