"""The registry: decorator, wildcard listing, fresh copies, errors, entry-point plugins."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os

import pytest

from attention_impls import AttentionModule, EmptyConfig, get, list_impls, register, registry
from attention_impls.full import FullAttention

PLUGIN_DIST = "attnbench-example-plugin"


def test_builtins_registered() -> None:
    assert {"full", "sdpa"} <= set(list_impls())


def test_wildcard_listing() -> None:
    assert list_impls("fu*") == ["full"]
    assert list_impls("flex_*") == ["flex_local", "flex_sparse"]
    assert list_impls(["sd*", "fu?l"]) == ["full", "sdpa"]
    assert list_impls("nothing*") == []


def test_get_returns_a_fresh_object() -> None:
    first, second = get("sdpa"), get("sdpa")
    assert first == second
    assert first is not second
    assert first.config is not second.config or not dataclasses.fields(first.config)


def test_get_with_params_does_not_touch_the_registry() -> None:
    spec = get("chunked") if "chunked" in list_impls() else None
    if spec is None:
        pytest.skip("example plugin not installed")
    changed = spec.with_params(query_chunk="64")
    assert changed.config.query_chunk == 64
    assert get("chunked").config.query_chunk == 256


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(registry.UnknownImplError, match=r"did you mean.*full"):
        get("ful")


def test_unknown_hyperparameter_names_the_valid_ones() -> None:
    with pytest.raises(registry.RegistryError, match=r"no hyperparameter 'bogus'"):
        get("full").with_params(bogus=1)


def test_duplicate_name_is_an_error_naming_both_places() -> None:
    @dataclasses.dataclass(frozen=True)
    class Cfg:
        pass

    class Another(AttentionModule):
        Config = Cfg

    with pytest.raises(registry.DuplicateImplError) as info:
        register("full")(Another)
    message = str(info.value)
    assert "full.py" in message and "test_registry.py" in message
    assert get("full").module_cls is FullAttention


def test_invalid_name_rejected() -> None:
    class Bad(AttentionModule):
        Config = EmptyConfig

    with pytest.raises(registry.RegistryError, match="invalid implementation name"):
        register("Bad Name")(Bad)


def _plugin_installed() -> bool:
    try:
        importlib.metadata.distribution(PLUGIN_DIST)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_plugin_discovered_through_entry_point() -> None:
    """The example plugin under tests/plugin_pkg, installed as a real distribution by `nox -s tests`."""
    if not _plugin_installed():
        if os.environ.get("ATTNBENCH_REQUIRE_PLUGIN"):
            pytest.fail(f"{PLUGIN_DIST} is not installed in this environment")
        pytest.skip(f"{PLUGIN_DIST} not installed (pip install tests/plugin_pkg)")
    assert "chunked" in list_impls()
    spec = get("chunked")
    assert spec.source == PLUGIN_DIST
    assert spec.exact
