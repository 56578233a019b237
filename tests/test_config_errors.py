"""Bad hyperparameters are refused the same way by every built-in, before any estimate or build.

``get(name, params)`` (and ``ImplSpec.with_params``) raises a one-line ``RegistryError`` naming
``impl.param``; the estimates of every built-in's default config are finite at any length.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from attention_impls import get, list_impls, registry

# per built-in, per hyperparameter: values that must be refused (strings as on the command line, or Python values)
BAD_VALUES: dict[str, dict[str, list[object]]] = {
    "full": {},
    "sdpa": {},
    "linear": {
        "feature_map": ["zigzag", "", "nan", 0],
        "chunk_size": [0, -1, "0", "zigzag", "nan", 2.5],
        "eps": [0, -1e-6, "0", "zigzag", "nan", "inf", float("nan")],
    },
    "linformer": {
        "k": [0, -1, "0", "-3", "zigzag", "nan", 1.5],
        "share_kv": ["zigzag", "nan", "2", 1],
        "init": ["zigzag", "", "nan", "orthogonal"],
    },
    "local": {
        "window": [-1, "-5", "zigzag", "nan", 2.5],
        "block_size": [0, -1, "0", "zigzag", "nan", "inf"],
        "kernel": ["triton", "", "nan", 0],
    },
    "sparse": {  # flex_sparse's too (below)
        "layout": ["zigzag", "", "nan", 1],
        "block_size": [0, -1, "0", "zigzag", "nan"],
        "window_blocks": [-1, "-2", "zigzag", "nan"],
        "global_blocks": [-1, "-2", "zigzag", "nan"],
        "random_blocks": [-1, "-2", "zigzag", "nan"],
        "stride": [0, -1, "0", "zigzag", "nan", "1.5"],
        "summary_blocks": [0, -1, "0", "zigzag", "nan"],
        "seed": [-1, "-1", "zigzag", "nan", 2**64],
        "kernel": ["triton", "", "nan"],
    },
    "flex_local": {
        "window": [-1, "-5", "zigzag", "nan", 2.5],
        "block_size": [0, -1, "0", "zigzag", "nan"],
        "kernel": ["triton", "", "nan", 0],
    },
    "performer": {
        "features": [0, -1, "0", "zigzag", "nan", 2.5],
        "chunk_size": [0, -1, "0", "zigzag", "nan"],
    },
    "nystrom": {
        "landmarks": [0, -1, "0", "zigzag", "nan", 1.5],
        "pinv_iterations": [-1, "-2", "zigzag", "nan", 2.5],
    },
    "reformer": {
        "bucket_size": [0, -1, "0", "zigzag", "nan"],
        "n_hashes": [0, -1, "0", "zigzag", "nan"],
        "n_buckets": [0, -2, 3, "3", "zigzag", "nan", "inf", 2.0],
    },
}
# flex_sparse: sparse's layout, and a kernel of its own (sparse's kernels are not its)
BAD_VALUES["flex_sparse"] = {**BAD_VALUES["sparse"], "kernel": ["sdpa", "matmul", "", "nan"]}

BUILTINS = sorted(name for name in list_impls() if get(name).source == registry.BUILTIN_SOURCE)
CASES = [
    pytest.param(impl, param, value, id=f"{impl}.{param}={value!r}")
    for impl, params in BAD_VALUES.items()
    for param, values in params.items()
    for value in values
]


def test_every_builtin_hyperparameter_has_bad_values() -> None:
    """A new built-in (or a new hyperparameter) must add its bad values here, and so its checks."""
    assert sorted(BAD_VALUES) == BUILTINS
    for impl in BUILTINS:
        assert sorted(BAD_VALUES[impl]) == sorted(get(impl).params()), impl


@pytest.mark.parametrize(("impl", "param", "value"), CASES)
def test_bad_value_is_one_line_naming_impl_and_param(impl: str, param: str, value: object) -> None:
    for attempt in (lambda: get(impl, {param: value}), lambda: get(impl).with_params(**{param: value})):
        with pytest.raises(registry.RegistryError) as info:
            attempt()
        message = str(info.value)
        assert f"{impl}.{param}" in message, message
        assert "\n" not in message and message.strip() == message, message


@pytest.mark.parametrize("impl", sorted(BAD_VALUES))
def test_defaults_and_their_strings_are_accepted(impl: str) -> None:
    spec = get(impl)
    assert spec.module_cls.config_error(spec.config) is None
    as_strings = {key: str(value) for key, value in spec.params().items()}
    assert get(impl, as_strings).params() == spec.params()


@pytest.mark.parametrize("impl", sorted(BAD_VALUES))
@pytest.mark.parametrize("seq_len", [1, 3, 127, 1000])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_estimates_are_finite_at_default_config(impl: str, seq_len: int, causal: bool) -> None:
    spec = get(impl)
    shape = {"batch": 2, "heads": 3, "seq_len": seq_len, "head_dim": 16, "causal": causal}
    flops = spec.flops(**shape)
    memory = spec.memory_bytes(**shape, itemsize=4)
    for value in (flops, memory):
        assert math.isfinite(value) and value >= 0, (impl, seq_len, causal, flops, memory)


def test_length_dependent_problem_is_a_skip_reason_not_an_error() -> None:
    spec = get("linformer", {"init": "identity", "k": "64"})  # valid at any length up to 64
    assert spec.unsupported_reason(seq_len=64, head_dim=16, causal=False) is None
    reason = spec.unsupported_reason(seq_len=65, head_dim=16, causal=False)
    assert reason is not None and "identity" in reason


def test_direct_construction_is_refused_too() -> None:
    spec = get("reformer")
    bad = dataclasses.replace(spec.config, n_buckets=3)
    with pytest.raises(ValueError, match="n_buckets"):
        spec.module_cls(bad, seq_len=16, heads=1, head_dim=8)
    reason = spec.module_cls.unsupported_reason(
        bad, seq_len=16, head_dim=8, causal=False, device="cpu", dtype=torch.float32
    )
    assert reason is not None and "n_buckets" in reason
