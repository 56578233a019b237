"""The worker process: measure one case at a time and reply with the measured fields of its record.

The parent (``bench.measure.runner``) starts ``python -m bench.measure.worker`` and speaks JSON lines to
it: a request on stdin, a reply on the protocol stream (the process's original stdout; anything the
measured code prints goes to stderr). The worker only measures; the parent decides what to run,
enforces time-outs and replaces a worker that dies.

Requests:
  {"op": "env", "devices": [...], "dtypes": [...], "options": {...}} -> bench.measure.env.collect_env
  {"op": "case", "case": {...}, "options": {...},
   "peak_flops_per_s": x}                                         -> the measured fields of one record
  {"op": "exit"}
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from attention_impls import UnsupportedCase, get, registry
from bench.cases import Case
from bench.measure.accuracy import approximation_errors
from bench.measure.compiled import CompileFailed, Compiler, compile_module
from bench.measure.env import BACKWARD_FLOP_FACTOR, TORCH_DTYPES, collect_env, set_tf32
from bench.measure.memory import measure_peak
from bench.measure.plan import unsupported_reason
from bench.measure.timing import synchronize, time_callable
from bench.options import MeasureOptions
from bench.results import first_line

# what an allocation failure says when it is not a torch.OutOfMemoryError: the CPU allocator, cuBLAS and
# cuDNN failing to get their workspace, MPS
OOM_MESSAGES = (
    "out of memory",
    "can't allocate memory",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "cusolver_status_alloc_failed",
    "mps backend out of memory",
)
# the aten operators of torch.nn.functional.scaled_dot_product_attention's backends
SDPA_BACKENDS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash-cpu",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_fused_attention_overrideable": "fused-overrideable",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_attention_math_for_mps": "math-mps",
}


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(message in text for message in OOM_MESSAGES)


def sdpa_backend(ops: frozenset[str]) -> str | None:
    """Which scaled_dot_product_attention backends a call ran (``+``-joined), None when it ran none."""
    used = sorted({name for op, name in SDPA_BACKENDS.items() if op in ops})
    return "+".join(used) or None


def _layer_stack(spec, case: Case, dtype: torch.dtype) -> torch.nn.Module:
    from bench.measure.stack import TransformerStack

    stack = TransformerStack(
        spec,
        depth=case.depth,
        d_model=case.d_model,
        heads=case.heads,
        seq_len=case.seq_len,
        residual=case.residual,
        causal=case.causal,
    )
    return stack.to(device=case.device, dtype=dtype)


def layer_stack_flops(spec, case: Case) -> float:
    """FLOPs of one call of the layer stack (projections, feed-forward and attention; backward included)."""
    from bench.measure.stack import stack_flops

    return float(
        stack_flops(
            spec,
            depth=case.depth,
            batch=case.batch,
            seq_len=case.seq_len,
            d_model=case.d_model,
            heads=case.heads,
            causal=case.causal,
            residual=case.residual,
            mode=case.mode,
        )
    )


@dataclasses.dataclass(frozen=True)
class Prepared:
    fn: Callable[[], object]  # one call of the case
    flops: float | None  # FLOPs of one call (FLOP_CONVENTION); None when the implementation does not count them
    errors: Callable[[], dict[str, float]] | None  # the approximation error against float64, or None
    reset: Callable[[], None]  # drops what a call leaves for the next to free (the gradients)
    cache_bytes: int | None = None  # decode: the bytes of the cache the step reads (after the step)
    compiler: Compiler | None = None  # --compile on: its counting backend (the first calls compile)


def _no_reset() -> None:
    return None


def _prepare_decode(spec, module, case: Case, dtype: torch.dtype) -> Prepared:
    """A decode step: the cache filled with seq_len - 1 tokens (untimed), then one new token's step, timed.

    The step is called again and again with the same cache and token (``decode_step``'s contract: the same
    output each time); the recorded cache is the one holding all seq_len tokens.
    """
    module.requires_grad_(False)
    kv_shape = (case.batch, case.key_value_heads, case.seq_len, case.head_dim)
    q = torch.randn(case.batch, case.heads, 1, case.head_dim, device=case.device, dtype=dtype)
    k, v = (torch.randn(kv_shape, device=case.device, dtype=dtype) for _ in range(2))
    before = case.seq_len - 1
    with torch.no_grad():
        cache = module.prefill(k[:, :, :before], v[:, :, :before], capacity=case.seq_len)
        k_new, v_new = k[:, :, before:].clone(), v[:, :, before:].clone()  # (batch, kv_heads, 1, head_dim)
        del k, v  # the cache holds what the step needs
        cache_bytes = module.decode_step(q, k_new, v_new, cache)[1].nbytes()

    def step():
        with torch.no_grad():
            return module.decode_step(q, k_new, v_new, cache)[0]

    flops = spec.decode_flops(
        batch=case.batch,
        heads=case.heads,
        kv_heads=case.key_value_heads,
        seq_len=case.seq_len,
        head_dim=case.head_dim,
    )
    return Prepared(step, flops, None, _no_reset, cache_bytes=cache_bytes)


def prepare(case: Case, *, seed: int) -> Prepared:
    """The callable to measure, its FLOPs, how to compute its approximation error, and how to reset it."""
    spec = get(case.impl, case.params_dict())
    dtype = TORCH_DTYPES[case.dtype]
    reason = unsupported_reason(case)
    if reason:
        raise UnsupportedCase(reason)
    if case.compile and case.mode == "decode":
        raise UnsupportedCase("--compile on covers fwd and fwd+bwd: decode steps are measured eager")
    torch.manual_seed(seed)
    grad = case.mode == "fwd+bwd"
    if case.scope == "layers":
        module = _layer_stack(spec, case, dtype)
        inputs = [torch.randn(case.batch, case.seq_len, case.d_model, device=case.device, dtype=dtype)]
        flops = layer_stack_flops(spec, case)

        def forward():
            return called(inputs[0])

    else:
        module = spec.build(
            seq_len=case.seq_len,
            heads=case.heads,
            head_dim=case.head_dim,
            q_len=case.query_len,
            kv_heads=case.key_value_heads,
            device=case.device,
            dtype=dtype,
        )
        if case.mode == "decode":
            return _prepare_decode(spec, module, case, dtype)
        q_shape = (case.batch, case.heads, case.query_len, case.head_dim)
        kv_shape = (case.batch, case.key_value_heads, case.seq_len, case.head_dim)
        inputs = [torch.randn(shape, device=case.device, dtype=dtype) for shape in (q_shape, kv_shape, kv_shape)]
        flops = spec.flops(
            batch=case.batch,
            heads=case.heads,
            seq_len=case.seq_len,
            head_dim=case.head_dim,
            causal=case.causal,
            q_len=case.query_len,
            kv_heads=case.key_value_heads,
        )

        def forward():
            return called(*inputs, causal=case.causal)

    called, compiler = compile_module(module) if case.compile else (module, None)  # what forward() calls
    errors = None
    if case.scope == "attention" and not spec.exact and case.mode == "fwd":

        def errors():
            return approximation_errors(module, spec, *inputs, causal=case.causal, seed=seed)

    if not grad:
        module.requires_grad_(False)

        def fn():
            with torch.no_grad():
                return forward()

        return Prepared(fn, flops, errors, _no_reset, compiler=compiler)
    for tensor in inputs:
        tensor.requires_grad_(True)
    leaves = [*inputs, *module.parameters()]

    def reset():
        for leaf in leaves:
            leaf.grad = None

    def step():
        reset()
        out = forward()
        out.float().sum().backward()

    if case.scope == "layers":  # stack_flops counts the backward (and the reversible recomputation)
        return Prepared(step, flops, errors, reset, compiler=compiler)
    return Prepared(step, (1 + BACKWARD_FLOP_FACTOR) * flops, errors, reset, compiler=compiler)


def run_case(
    case: Case,
    options: MeasureOptions,
    *,
    peak_flops_per_s: float | None = None,
    process: int = 0,
    processes: int = 1,
) -> dict[str, Any]:
    """Measure one case; never raises (the outcome is in ``status``). Returns the measured fields of its record.

    The case is measured in ``processes`` worker processes, this one being ``process``: each takes its
    share of the minimum time and samples, and only process 0 measures memory and the approximation error.
    """
    started = time.perf_counter()
    result: dict[str, Any] = {"status": "ok", "message": None}
    try:
        set_tf32(options.tf32)
        prepared = prepare(case, seed=options.seed)
        if prepared.compiler is not None:
            prepared.compiler.compile(prepared.fn, lambda: synchronize(case.device))
        flops = prepared.flops
        stats = time_callable(
            prepared.fn,
            device=case.device,
            min_time_s=options.min_time_s / processes,
            min_samples=options.samples_for(process, processes),
            timer=options.timer,
            flush_cache=options.flush_cache,
        )
        peak_flops = peak_flops_per_s
        counted = flops is not None and stats.median_s > 0  # a decode step's may not be counted
        result.update(
            median_s=stats.median_s,
            iqr_s=stats.iqr_s,
            min_s=stats.min_s,
            mean_s=stats.mean_s,
            samples=stats.samples,
            n_samples=stats.n_samples,
            calls_per_sample=stats.calls_per_sample,
            timer=stats.timer,
            noisy=stats.noisy,
            measured_s=stats.measured_s,
            flops=flops,
            achieved_flops_per_s=flops / stats.median_s if counted else None,
            roofline=(flops / stats.median_s / peak_flops) if counted and peak_flops else None,
        )
        if prepared.cache_bytes is not None:
            result["cache_bytes"] = prepared.cache_bytes
        if prepared.compiler is not None:
            result.update(prepared.compiler.fields(stats.median_s))
        if process == 0:
            memory = measure_peak(prepared.fn, device=case.device, reset=prepared.reset)
            result.update(
                peak_bytes=memory.peak_bytes,
                rss_peak_bytes=memory.rss_peak_bytes,
                rss_before_bytes=memory.rss_before_bytes,
                memory_method=memory.method,
                sdpa_backend=sdpa_backend(memory.ops),
            )
        if process == 0 and prepared.errors is not None and case.seq_len <= options.error_max_len:
            result.update(prepared.errors())
    except UnsupportedCase as exc:
        result = {"status": "skipped", "message": first_line(exc)}
    except CompileFailed as exc:  # the compiler's one-line reason; the sweep goes on
        result = {"status": "error", "message": str(exc)}
    except registry.RegistryError as exc:
        result = {"status": "error", "message": first_line(exc)}
    except Exception as exc:
        status = "oom" if is_oom(exc) else "error"
        result = {"status": status, "message": f"{type(exc).__name__}: {first_line(exc)}"}
        if status == "error":
            traceback.print_exc(file=sys.stderr)
    finally:
        # after a sticky CUDA error these raise too: the runner replaces this worker anyway
        with contextlib.suppress(Exception):
            synchronize(case.device)
            if torch.device(case.device).type == "cuda":
                torch.cuda.empty_cache()
    result["wall_s"] = time.perf_counter() - started
    return result


# ---------------------------------------------------------------- protocol


def serve(proto_in, proto_out) -> None:
    for line in proto_in:
        if not line.strip():
            continue
        request = json.loads(line)
        op = request.get("op")
        if op == "exit":
            return
        if op == "env":
            reply = collect_env(
                request["devices"],
                request["dtypes"],
                num_threads=torch.get_num_threads(),
                tf32=MeasureOptions.from_json(request["options"]).tf32,
            )
        elif op == "case":
            reply = run_case(
                Case.from_dict(request["case"]),
                MeasureOptions.from_json(request["options"]),
                peak_flops_per_s=request.get("peak_flops_per_s"),
                process=request.get("process", 0),
                processes=request.get("processes", 1),
            )
        elif op == "crosscheck":
            from bench.measure.crosscheck import crosscheck_case  # it imports this module

            reply = crosscheck_case(
                Case.from_dict(request["case"]), MeasureOptions.from_json(request["options"]), rounds=request["rounds"]
            ).to_json()
        else:
            reply = {"status": "error", "message": f"unknown op {op!r}"}
        proto_out.write(json.dumps(reply) + "\n")
        proto_out.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="attnbench worker (started by the sweep runner)")
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # the protocol keeps the original stdout; whatever the measured code prints goes to stderr
    proto_out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin, proto_out)


if __name__ == "__main__":
    main()
