"""Compiled cases (``attnbench run --compile on``): the module wrapped in ``torch.compile``, its compilation timed
apart from the samples, and recompilations during the timed calls counted.

Each compiled case starts from a reset compiler (``torch._dynamo.reset``): nothing compiled for an earlier case
of the worker serves it, so its first call compiles every graph it runs (PyTorch's on-disk caches stay as they
are: a shape compiled before on this machine, by another process or run, compiles faster). The first call is
made before the timed ones; ``compile_s`` is its wall time less the case's median call. A backend that counts
the graphs handed to Inductor tells how many the first call compiled (more than one: graph breaks) and whether
the timed calls compiled more (``recompiles``: their samples include compilation, and the record says so).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from bench.results import first_line

__all__ = ["CompileFailed", "Compiler", "compile_module"]


class CompileFailed(RuntimeError):
    """torch.compile could not compile the case; the message is the compiler's reason, one line."""


class Compiler:
    """An Inductor backend for ``torch.compile`` that counts the graphs it compiles."""

    def __init__(self) -> None:
        self.graphs = 0
        self.first_call_s: float | None = None
        self.graphs_after_first_call = 0

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        self.graphs += 1
        return compile_fx(graph_module, example_inputs)

    def first_call(self, fn: Callable[[], object], synchronize: Callable[[], None]) -> None:
        """Call ``fn`` once, compiling it; CompileFailed (the compiler's one-line reason) when that fails."""
        started = time.perf_counter()
        try:
            fn()
            synchronize()
        except Exception as exc:  # the compiler's own error types vary with the backend and the version
            root = exc  # dynamo wraps the backend's error (inner_exception, or the cause): the innermost says why
            while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None and inner is not root:
                root = inner
            raise CompileFailed(f"torch.compile failed: {type(root).__name__}: {first_line(root)}") from exc
        self.first_call_s = time.perf_counter() - started
        self.graphs_after_first_call = self.graphs

    def fields(self, median_s: float) -> dict[str, float | int | None]:
        """The record's compilation fields, after the timed calls whose median is ``median_s``."""
        first = self.first_call_s
        return {
            "compile_s": None if first is None else max(first - median_s, 0.0),
            "first_call_s": first,
            "compiled_graphs": self.graphs_after_first_call,
            "recompiles": self.graphs - self.graphs_after_first_call,
        }


def compile_module(module: torch.nn.Module) -> tuple[torch.nn.Module, Compiler]:
    """``module`` compiled for one case's shapes (static: each case is one shape), with its counting backend."""
    torch._dynamo.reset()  # no graph of an earlier case serves this one, and no cache limit is near
    compiler = Compiler()
    return torch.compile(module, backend=compiler, dynamic=False), compiler
