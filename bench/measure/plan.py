"""From a request to cases, with the registry: which implementations, configs and residuals, on which devices.

Also what the runner decides about a case before it runs: whether the implementation can run it at all,
how much memory it should need (for the budget), and the metadata its record carries.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
from typing import Any

import torch

from attention_impls import registry
from bench.cases import DEFAULT_DTYPES, Case, GridError, GridRequest, device_kind, expand_grid
from bench.measure.env import TORCH_DTYPES

# fwd+bwd keeps the forward's intermediates for the backward and adds gradients
BACKWARD_MEMORY_FACTOR = 3.0


def nvidia_gpu_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU (``nvidia-smi -L`` lists one), whether torch can use it or not."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def default_devices() -> tuple[str, ...]:
    """CUDA, else Apple's MPS, else the CPU; GridError when a GPU is visible that this torch can not use."""
    if torch.cuda.is_available():
        return ("cuda",)
    if nvidia_gpu_visible():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise GridError(
            f"an NVIDIA GPU is visible (nvidia-smi) but torch {torch.__version__} ({build}) can not use it: "
            "install a CUDA build of torch (README, GPU set-up) or pass --devices cpu"
        )
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return ("mps",)
    return ("cpu",)


def resolve_impls(patterns: tuple[str, ...]) -> list[str]:
    """Registered names for names and wildcards, in the order asked, each once."""
    names: list[str] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            matched = registry.list_impls(pattern)
            if not matched:
                registered = ", ".join(registry.list_impls())
                raise GridError(f"no implementation matches {pattern!r} (registered: {registered})")
            names.extend(matched)
        else:
            names.append(registry.get(pattern).name)  # raises UnknownImplError with suggestions
    return list(dict.fromkeys(names))


def _non_default_params(names: list[str], request: GridRequest) -> dict[str, dict[str, Any]]:
    """Per implementation, the overridden hyperparameters that differ from the defaults (checked, typed).

    Only what differs is kept: the case key and the report label stay short, and a default passed
    explicitly names the same case as no --param at all.
    """
    chosen: dict[str, dict[str, Any]] = {name: {} for name in names}
    for impl, params in request.overrides().items():
        spec = registry.get(impl)
        if impl not in names:
            raise GridError(f"--param names {impl!r}, which is not among the implementations to run")
        defaults = spec.params()
        values = spec.with_params(**params).params()  # raises RegistryError naming impl.param
        chosen[impl] = {key: value for key, value in values.items() if value != defaults[key]}
    return chosen


def plan_cases(request: GridRequest, *, by_kind: bool = True) -> list[Case]:
    """Every case of the request, each curve from short to long; GridError or RegistryError on bad input.

    ``by_kind``: a sweep's cases say the kind of device (``cuda``), and its lanes which one measures them
    (``bench.measure.lanes``), so one case is made for ``cuda:0,cuda:1``; the cross-check keeps the name given.
    """
    names = resolve_impls(request.impls)
    devices = request.devices or default_devices()
    if by_kind:
        devices = tuple(dict.fromkeys(device_kind(device) for device in devices))
    cases: list[Case] = []
    for device, (name, params) in itertools.product(devices, _non_default_params(names, request).items()):
        # without --residual each implementation gets its own default (the Reformer: reversible)
        residuals = request.residuals or (registry.get(name).module_cls.default_residual,)
        cases += expand_grid(
            impls={name: params},
            seq_lens=request.seq_lens,
            devices=(device,),
            dtypes=request.dtypes or (DEFAULT_DTYPES[torch.device(device).type],),
            modes=request.modes,
            batch=request.batch,
            heads=request.heads,
            head_dim=request.head_dim,
            causal=request.causal,
            scope=request.scope,
            depths=request.depths,
            residuals=residuals,
            kv_heads=request.kv_heads,
            q_lens=request.q_lens,
            compile=request.compile,
        )
    return cases


def unsupported_reason(case: Case) -> str | None:
    """Why the implementation can not run this case (None when it can): the case is recorded as skipped."""
    spec = registry.get(case.impl, case.params_dict())
    return spec.unsupported_reason(
        seq_len=case.seq_len,
        head_dim=case.head_dim,
        causal=case.causal,
        device=case.device,
        dtype=TORCH_DTYPES[case.dtype],
        heads=case.heads,
        q_len=case.query_len,
        kv_heads=case.key_value_heads,
        decode=case.mode == "decode",
    )


def estimate_bytes(case: Case) -> float:
    """What a case should need, from the implementation's own estimate (bytes)."""
    spec = registry.get(case.impl, case.params_dict())
    if case.scope == "layers":
        from bench.measure.stack import stack_memory_bytes

        return stack_memory_bytes(
            spec,
            batch=case.batch,
            seq_len=case.seq_len,
            d_model=case.d_model,
            heads=case.heads,
            depth=case.depth,
            itemsize=case.itemsize,
            causal=case.causal,
            residual=case.residual,
            mode=case.mode,
            device=case.device,
            dtype=case.dtype,
        )
    queries = 1 if case.mode == "decode" else case.query_len  # a decode step has the new token's query only
    attention = spec.memory_bytes(
        batch=case.batch,
        heads=case.heads,
        seq_len=case.seq_len,
        head_dim=case.head_dim,
        itemsize=case.itemsize,
        causal=case.causal,
        device=case.device,
        dtype=case.dtype,
        q_len=queries,
        kv_heads=case.key_value_heads,
    )
    keys_and_values = 2 * case.batch * case.key_value_heads * case.seq_len * case.head_dim * case.itemsize
    inputs = case.batch * case.heads * queries * case.head_dim * case.itemsize + keys_and_values
    if case.mode == "decode":
        # the keys and values the cache is filled from, the cache (its estimate, else a KV cache's), one step
        cache = spec.cache_bytes(
            batch=case.batch,
            heads=case.heads,
            kv_heads=case.key_value_heads,
            seq_len=case.seq_len,
            head_dim=case.head_dim,
            itemsize=case.itemsize,
        )
        return inputs + (keys_and_values if cache is None else cache) + attention
    if case.mode == "fwd+bwd":
        return BACKWARD_MEMORY_FACTOR * attention + 2 * inputs
    return attention + inputs


def impl_info(name: str) -> dict[str, Any]:
    """The implementation's metadata, stored in each record so reports need no registry (and no torch)."""
    info = registry.get(name).describe()
    info.pop("params")
    return info
