"""Compiled cases (``attnbench run --compile on``): the module wrapped in ``torch.compile``, its compilation timed
apart from the samples, and recompilations during the timed calls counted.

Each compiled case starts from a reset compiler (``torch._dynamo.reset``) with Inductor's caches off
(``force_disable_caches``): nothing compiled for an earlier case, by this worker or by any run on the machine,
serves it, so its first call compiles every graph it runs, as on a fresh machine, and ``compile_s`` repeats
from run to run (with the on-disk caches, a second run of the same sweep compiled several times faster). The
worker keeps the setting for its life, so FlexAttention's own compilation, in its untimed first call, is cold
too. The first call is made before the timed ones, and more while a call compiles something new (an
implementation that fills a cache in its first call traces another path in its second): ``compile_s`` is the
wall time of those calls less as many median calls. A backend that counts the graphs handed to Inductor tells how many were compiled before
timing (more than one: graph breaks) and whether the timed calls compiled more (``recompiles``: their samples
include compilation, and the record says so).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from attention_impls import UnsupportedCase
from bench.results import first_line

__all__ = ["CompileFailed", "Compiler", "compile_module"]


class CompileFailed(RuntimeError):
    """torch.compile could not compile the case; the message is the compiler's reason, one line."""


class Compiler:
    """An Inductor backend for ``torch.compile`` that counts the graphs it compiles."""

    # calls before timing, at most: the first compiles; a call after it may compile again where the module's
    # state changed in the first (a cache it filled), and those graphs are compilation too, not samples
    MAX_COMPILE_CALLS = 3

    def __init__(self) -> None:
        self.graphs = 0
        self.compile_calls = 0
        self.compile_calls_s: float | None = None
        self.graphs_before_timing = 0

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        self.graphs += 1
        return compile_fx(graph_module, example_inputs)

    def compile(self, fn: Callable[[], object], synchronize: Callable[[], None]) -> None:
        """Call ``fn`` until a call compiles nothing new (``MAX_COMPILE_CALLS`` at most), untimed by the samples;
        CompileFailed (the compiler's one-line reason) when compiling fails."""
        started = time.perf_counter()
        while self.compile_calls < self.MAX_COMPILE_CALLS:
            before = self.graphs
            try:
                fn()
                synchronize()
            except Exception as exc:  # the compiler's own error types vary with the backend and the version
                raise _reason(exc) from exc
            self.compile_calls += 1
            if self.compile_calls > 1 and self.graphs == before:
                break
        self.compile_calls_s = time.perf_counter() - started
        self.graphs_before_timing = self.graphs

    def fields(self, median_s: float) -> dict[str, float | int | None]:
        """The record's compilation fields, after the timed calls whose median is ``median_s``."""
        spent = self.compile_calls_s
        return {
            "compile_s": None if spent is None else max(spent - self.compile_calls * median_s, 0.0),
            "compile_calls": self.compile_calls,
            "compiled_graphs": self.graphs_before_timing,
            "recompiles": self.graphs - self.graphs_before_timing,
        }


def _reason(exc: Exception) -> Exception:
    """What a failed first call raises: the case's own refusal or out-of-memory as they are, else CompileFailed
    with the innermost exception's first line (dynamo wraps the backend's error: inner_exception, or the cause)."""
    root = exc
    while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None and inner is not root:
        root = inner
    if isinstance(root, (UnsupportedCase, MemoryError, torch.OutOfMemoryError)):
        return root  # the case can not run, or ran out of memory: the same with or without compiling
    return CompileFailed(f"torch.compile failed: {type(root).__name__}: {first_line(root)}")


def compile_module(module: torch.nn.Module) -> tuple[torch.nn.Module, Compiler]:
    """``module`` compiled for one case's shapes (static: each case is one shape), with its counting backend."""
    torch._dynamo.reset()  # no graph of an earlier case serves this one, and no cache limit is near
    torch._inductor.config.force_disable_caches = True  # nor any compiled on this machine before: a cold compile
    compiler = Compiler()
    return torch.compile(module, backend=compiler, dynamic=False), compiler
