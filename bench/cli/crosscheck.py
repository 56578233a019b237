"""``attnbench crosscheck``: the harness's timings beside independent timers (``bench.measure.crosscheck``)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from bench import cases as grid
from bench.cli.common import HelpWithDefaults, UsageError
from bench.options import SweepOptions
from bench.outputs import AtomicFile, OutputError

DEFAULT_IMPLS = "sdpa,full,local,linear"
DEFAULT_SEQ_LENS = "2048,8192"
DEFAULT_MODES = "fwd"
DEFAULT_DEVICES = "cpu"
DEFAULT_MIN_TIME_S = 0.5
DEFAULT_ROUNDS = SweepOptions().processes  # as many rounds as a sweep's worker processes
DEFAULT_OUT = Path("results/crosscheck.csv")


def _request(args: argparse.Namespace) -> grid.GridRequest:
    """The flags, parsed (GridError on malformed text); the registry checks the names later."""
    if not (math.isfinite(args.min_time) and args.min_time > 0):
        raise grid.GridError(f"--min-time must be a positive number, got {args.min_time!r}")
    if args.rounds < 1:
        raise grid.GridError(f"--rounds must be at least 1, got {args.rounds}")
    return grid.GridRequest(
        impls=grid.parse_impls(args.impls),
        seq_lens=tuple(grid.parse_seq_lens(args.seq_lens)),
        dtypes=tuple(grid.parse_list(args.dtypes, allowed=grid.DTYPES, what="dtype")) if args.dtypes else None,
        modes=tuple(grid.parse_list(args.modes, allowed=grid.MODES, what="mode")),
        batch=grid.Case.batch,  # the shape of a sweep's default case
        heads=grid.Case.heads,
        head_dim=grid.Case.head_dim,
        causal=grid.Case.causal,
        scope=grid.Case.scope,
        depths=(grid.Case.depth,),
        devices=tuple(grid.parse_devices(args.devices or DEFAULT_DEVICES)),
    )


def _cmd_crosscheck(args: argparse.Namespace) -> int:
    try:
        request = _request(args)
    except grid.GridError as exc:
        raise UsageError(str(exc)) from None

    from attention_impls.registry import RegistryError
    from bench.measure import crosscheck
    from bench.measure.env import device_problem
    from bench.measure.plan import plan_cases
    from bench.options import MeasureOptions, OptionsError

    try:
        cases = plan_cases(request, by_kind=False)
        options = MeasureOptions(min_time_s=args.min_time)
    except (grid.GridError, RegistryError, OptionsError) as exc:
        raise UsageError(str(exc)) from None
    for device, dtype in dict.fromkeys((case.device, case.dtype) for case in cases):
        problem = device_problem(device, dtype)
        if problem:
            raise UsageError(problem)
    try:
        out = AtomicFile(args.out)
    except OutputError as exc:
        raise UsageError(str(exc)) from None
    try:
        results = crosscheck.run_crosscheck(cases, options, rounds=args.rounds)
    except BaseException:
        out.discard()
        raise
    try:
        out.commit(crosscheck.to_csv(results))
    except OutputError as exc:
        raise UsageError(str(exc)) from None
    print(crosscheck.markdown_table([result.row() for result in results]))
    outside = [r for r in results if r.within is False]
    low, high = crosscheck.RATIO_RANGE
    print(f"\n{len(outside)} of {sum(r.status == 'ok' for r in results)} cases outside [{low}, {high}]")
    print(f"table: {out.path}")
    return 0


def add_crosscheck_parser(sub) -> None:
    p = sub.add_parser(
        "crosscheck",
        help="time cases by the harness and by independent timers, side by side (a report, not a test)",
        formatter_class=HelpWithDefaults,
    )
    p.add_argument("--impls", default=DEFAULT_IMPLS, help="names or wildcards, comma-separated")
    p.add_argument("--seq-lens", default=DEFAULT_SEQ_LENS, help="list and/or ranges: 2048,8192 or 1024:16384:x2")
    p.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated, from {', '.join(grid.MODES)}")
    p.add_argument("--devices", help=f"cpu, cuda, cuda:1, mps, comma-separated (default: {DEFAULT_DEVICES})")
    p.add_argument("--dtypes", help=grid.DTYPES_HELP)
    p.add_argument(
        "--min-time",
        type=float,
        default=DEFAULT_MIN_TIME_S,
        help="timed seconds per case and method, shared among the rounds as a sweep shares it among its processes",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=DEFAULT_ROUNDS,
        help="rounds of harness and independent timing, interleaved (each method: its best round)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="FILE", help="CSV file written (replaced)")
    p.set_defaults(func=_cmd_crosscheck)
