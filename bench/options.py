"""How a sweep runs and how each case is measured: every option's default, check, flag and help, in one home.

Torch-free. The CLI builds its ``run`` flags from these fields (so ``attnbench run --help`` shows every
default), the runner keeps :class:`SweepOptions`, and :class:`MeasureOptions` crosses the pipe to the
worker as JSON. A value that fails its check raises :class:`OptionsError` with one line naming the flag.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

# the timers of bench.measure.timing ("auto": cuda-events on CUDA, clock elsewhere); here, to stay torch-free
TIMERS = ("auto", "clock", "cuda-events")
# samples per worker process at least (a case's min_samples are dealt out among its processes)
MIN_SAMPLES_PER_PROCESS = 2
# without --budget-gb, a case estimated above this share of the memory free at start is skipped
BUDGET_FRACTION = 0.6
DEFAULT_OUT = Path("results/sweep.jsonl")
# what runs a sweep's cases (bench.measure.executor): worker processes on this machine, or Ray's cluster
EXECUTORS = ("local", "ray")

Check = Callable[[Any], str | None]


class OptionsError(ValueError):
    """An option out of its range: one line for the user."""


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def positive(value: Any) -> str | None:
    return None if _number(value) and value > 0 else "must be a positive number"


def non_negative(value: Any) -> str | None:
    return None if _number(value) and value >= 0 else "must be a number >= 0"


def at_least(minimum: int) -> Check:
    def check(value: Any) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
        return None if ok else f"must be an integer >= {minimum}"

    return check


def one_of(choices: tuple[str, ...]) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    check.choices = choices  # type: ignore[attr-defined]
    return check


def option(default: Any, *, flag: str, help: str, check: Check | None = None, metavar: str | None = None) -> Any:
    """A dataclass field that also says its command-line flag, its help text and its check."""
    return dataclasses.field(default=default, metadata={"flag": flag, "help": help, "check": check, "metavar": metavar})


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of an options class that are command-line flags, in declaration order."""
    return [f for f in dataclasses.fields(cls) if "flag" in f.metadata]


def _check_fields(instance: Any) -> None:
    for f in cli_fields(type(instance)):
        value = getattr(instance, f.name)
        check = f.metadata["check"]
        problem = check(value) if check is not None and value is not None else None
        if problem:
            raise OptionsError(f"{f.metadata['flag']} {problem}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class MeasureOptions:
    """How one case is measured (the worker's part of the options)."""

    min_time_s: float = option(0.5, flag="--min-time", help="minimum timed seconds per case", check=non_negative)
    min_samples: int = option(5, flag="--min-samples", help="minimum timing samples per case", check=at_least(5))
    seed: int = option(0, flag="--seed", help="seed of the random inputs and projections", check=at_least(0))
    error_max_len: int = option(
        4096,
        flag="--error-max-len",
        help="measure the approximation error on every input family up to this length (0: never)",
        check=at_least(0),
    )
    timer: str = option(
        "auto",
        flag="--timer",
        help="clock: perf_counter after syncing the case's device; cuda-events: CUDA events; auto: events on CUDA",
        check=one_of(TIMERS),
    )
    flush_cache: bool = option(
        False, flag="--flush-cache", help="overwrite a buffer larger than the L2/L3 cache before every timed call"
    )
    tf32: bool = option(
        False, flag="--tf32", help="let float32 matmuls and convolutions on CUDA use TF32 tensor cores (off: IEEE fp32)"
    )

    def __post_init__(self) -> None:
        _check_fields(self)

    def samples_for(self, process: int, processes: int) -> int:
        """The samples worker process ``process`` of ``processes`` takes: min_samples dealt out in turn, 2 at least."""
        return max(MIN_SAMPLES_PER_PROCESS, math.ceil((self.min_samples - process) / processes))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MeasureOptions:
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class SweepOptions:
    """How the sweep runs: where results go, time-outs, budget, threads, what to run again."""

    out: Path = option(DEFAULT_OUT, flag="--out", help="results file (appended; a run resumes)", metavar="FILE")  # noqa: RUF009
    timeout_s: float = option(
        300.0, flag="--timeout", help="seconds per case before its worker is killed", check=positive
    )
    budget_gb: float | None = option(
        None,
        flag="--budget-gb",
        help=f"skip cases estimated above this many GiB (default: {BUDGET_FRACTION:.0%} of the memory free at start)",
        check=positive,
    )
    threads: int | None = option(
        None, flag="--threads", help="intra-op threads of the worker (default: physical cores)", check=at_least(1)
    )
    processes: int = option(
        4,
        flag="--processes",
        help="worker processes that measure each case, one round of the sweep each; the samples and minimum "
        "time are shared among them, and a case whose processes disagree is flagged unstable",
        check=at_least(1),
    )
    pin: bool = option(
        True,
        flag="--no-pin",
        help="do not pin the worker's threads to cores (pinned: one OpenMP thread per core, the worker on the first cores)",
    )
    cpu_lanes: int = option(
        1,
        flag="--cpu-lanes",
        help="CPU workers that run cases at the same time, each pinned to --threads cores of its own (disjoint)",
        check=at_least(1),
    )
    executor: str = option(
        "local",
        flag="--executor",
        help="local: a worker per device of this machine; ray: a Ray actor per device of the cluster "
        "(pip install 'attnbench[ray]')",
        check=one_of(EXECUTORS),
    )
    ray_address: str | None = option(
        None,
        flag="--ray-address",
        help="--executor ray: the cluster to join (auto: the one started here with `ray start`; default: Ray's own "
        "choice, RAY_ADDRESS or a cluster started here, else a new local instance)",
        metavar="ADDRESS",
    )
    force: bool = option(False, flag="--force", help="run again cases already in the results file")
    retry_failed: bool = option(
        False, flag="--retry-failed", help="run again cases that ended in error, timeout, oom or crashed"
    )
    quiet: bool = option(False, flag="--quiet", help="no progress bar (for CI logs)")
    measure: MeasureOptions = dataclasses.field(default_factory=MeasureOptions)

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.ray_address is not None and self.executor != "ray":
            raise OptionsError("--ray-address is for --executor ray")

    def budget_bytes(self, free_bytes: float) -> float:
        """The memory budget of one device, given what was free on it at start."""
        return self.budget_gb * 2**30 if self.budget_gb is not None else BUDGET_FRACTION * free_bytes
