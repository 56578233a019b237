"""``attnbench list`` and ``attnbench run``: the commands that ask the registry and measure."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

from bench import cases as grid
from bench.cli.common import HelpWithDefaults, UsageError, warn
from bench.options import MeasureOptions, OptionsError, SweepOptions, cli_fields
from bench.results import ResultsError, supports_text


def cmd_list(args: argparse.Namespace) -> int:
    from attention_impls import registry

    try:
        specs = [registry.get(name) for name in registry.list_impls(args.pattern or "*")]
    except registry.RegistryError as exc:
        raise UsageError(str(exc)) from None
    warn(f"warning: {message}" for message in registry.load_errors())
    if not specs:
        raise UsageError(f"no implementation matches {args.pattern!r} (registered: {', '.join(registry.list_impls())})")
    rows = [spec.describe() for spec in specs]
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    header = ("name", "family", "time", "memory", "kind", "supports", "source")
    table = [
        (
            row["name"],
            row["family"],
            row["time_complexity"],
            row["memory_complexity"],
            "exact" if row["exact"] else "approximate",
            supports_text(row),
            row["source"],
        )
        for row in rows
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *table, strict=True)]
    for line in (header, *table):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    return 0


def _grid_request(args: argparse.Namespace) -> grid.GridRequest:
    """The grid flags, parsed (GridError on malformed text); checked against the registry later."""
    for flag, value in (("--batch", args.batch), ("--heads", args.heads), ("--head-dim", args.head_dim)):
        if value < 1:
            raise grid.GridError(f"{flag} must be at least 1, got {value}")
    depths = tuple(grid.parse_int(d, what="a depth") for d in args.depths.split(",") if d.strip())
    if not depths or min(depths) < 1:
        raise grid.GridError(f"--depths must be positive integers, got {args.depths!r}")
    kv_heads = tuple(grid.parse_counts(args.kv_heads, what="--kv-heads", same="as many as --heads"))
    for count in kv_heads:
        if count and args.heads % count:
            raise grid.GridError(f"--kv-heads must divide --heads ({args.heads}), got {count}")
    q_lens = tuple(grid.parse_counts(args.q_lens, what="--q-lens", same="self-attention"))
    grouped = any(count not in (0, args.heads) for count in kv_heads)  # fewer key/value heads than heads
    if args.scope == "layers" and (grouped or any(q_lens)):
        raise grid.GridError("--kv-heads and --q-lens are for --scope attention (the layer stack is self-attention)")
    modes = tuple(grid.parse_list(args.modes, allowed=grid.MODES, what="mode"))
    if args.scope == "layers" and "decode" in modes:
        raise grid.GridError("--modes decode is for --scope attention")
    if "decode" in modes and any(q_lens):
        raise grid.GridError("--modes decode has one query per step against seq_len tokens: it takes no --q-lens")
    return grid.GridRequest(
        impls=grid.parse_impls(args.impls),
        seq_lens=tuple(grid.parse_seq_lens(args.seq_lens)),
        dtypes=tuple(grid.parse_list(args.dtypes, allowed=grid.DTYPES, what="dtype"))
        if args.dtypes is not None
        else None,
        modes=modes,
        batch=args.batch,
        heads=args.heads,
        head_dim=args.head_dim,
        causal=args.causal,
        scope=args.scope,
        depths=depths,
        params=grid.parse_param_overrides(args.param),
        devices=tuple(grid.parse_devices(args.devices, sweep=True)) if args.devices else None,
        residuals=(
            tuple(grid.parse_list(args.residual, allowed=grid.RESIDUALS, what="residual")) if args.residual else None
        ),
        kv_heads=kv_heads,
        q_lens=q_lens,
        compile=tuple(
            grid.COMPILE[choice] for choice in grid.parse_list(args.compile, allowed=grid.COMPILE, what="compile")
        ),
    )


def _options(cls: type, args: argparse.Namespace, **extra):
    """An options dataclass from the flags its fields declare (OptionsError when a value is out of range)."""
    return cls(**{f.name: getattr(args, f.name) for f in cli_fields(cls)}, **extra)


def _cmd_run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:
        request = _grid_request(args)
        options = _options(SweepOptions, args, measure=_options(MeasureOptions, args))
    except (grid.GridError, OptionsError) as exc:
        raise UsageError(str(exc)) from None

    if options.executor == "ray" and importlib.util.find_spec("ray") is None:
        raise UsageError("--executor ray needs Ray, which is not installed: pip install 'attnbench[ray]'")

    from attention_impls.registry import RegistryError
    from bench.measure.lanes import LaneError
    from bench.measure.plan import default_devices, plan_cases
    from bench.measure.runner import Sweep, SweepError

    try:
        cases = plan_cases(request)
        devices = list(request.devices or default_devices())
    except (grid.GridError, RegistryError) as exc:
        raise UsageError(str(exc)) from None
    sweep = Sweep(cases, options, devices=devices, log=lambda line: print(line, file=sys.stderr))
    try:
        summary = sweep.run(started=started)
    except (SweepError, LaneError, ResultsError) as exc:
        raise UsageError(str(exc)) from None
    finally:
        sweep.close()
    for line in summary.lines():
        print(line)
    print(f"results: {options.out}")
    return 0


def _add_option_flags(p: argparse.ArgumentParser, cls: type) -> None:
    """One flag per options field: its flag, default, help and type all come from the field."""
    types = {
        "float": float,
        "int": int,
        "float | None": float,
        "int | None": int,
        "Path": Path,
        "str": str,
        "str | None": str,
    }
    for f in cli_fields(cls):
        meta = f.metadata
        help_text = meta["help"].replace("%", "%%")
        if f.type == "bool":
            action = "store_false" if f.default else "store_true"  # a flag turns its default around
            p.add_argument(meta["flag"], dest=f.name, action=action, help=help_text)
        else:
            p.add_argument(
                meta["flag"],
                dest=f.name,
                type=types[f.type],
                default=f.default,
                choices=getattr(meta["check"], "choices", None),
                metavar=meta["metavar"] or meta["flag"].lstrip("-").replace("-", "_").upper(),
                help=help_text,
            )


def add_run_parser(sub) -> None:
    p = sub.add_parser(
        "run", help="run a sweep of cases and append the results to a JSONL file", formatter_class=HelpWithDefaults
    )
    p.add_argument("--impls", default="*", help="names or wildcards, comma-separated")
    p.add_argument(
        "--seq-lens", default="256:16384:x2", help="list and/or ranges: 256,512 or 256:16384:x2 or 1024:8192:+1024"
    )
    p.add_argument(
        "--devices",
        help="cpu, cuda, cuda:1, cuda:all, mps, comma-separated; GPUs named together run in parallel, a case on each "
        "(default: cuda, else mps, else cpu)",
    )
    p.add_argument("--dtypes", help=grid.DTYPES_HELP)
    p.add_argument(
        "--modes",
        default="fwd,fwd+bwd",
        help=f"comma-separated, from {', '.join(grid.MODES)} (decode: one new token against a cache of seq_len "
        "tokens, always causal)",
    )
    p.add_argument("--batch", type=int, default=grid.Case.batch, help="batch size")
    p.add_argument("--heads", type=int, default=grid.Case.heads, help="attention heads")
    p.add_argument("--head-dim", type=int, default=grid.Case.head_dim, help="dimension of each head")
    p.add_argument(
        "--kv-heads",
        default="same",
        help="key/value heads, comma-separated divisors of --heads (grouped-query attention; 1: multi-query); "
        "same: as many as --heads",
    )
    p.add_argument(
        "--q-lens",
        default="same",
        help="query lengths, comma-separated (cross-attention: the queries attend to --seq-lens keys); "
        "same: self-attention",
    )
    p.add_argument("--causal", action="store_true", help="causal masking")
    p.add_argument("--scope", choices=grid.SCOPES, default="attention", help="the kernel alone, or a layer stack")
    p.add_argument("--depths", default="1", help="layer-stack depths, comma-separated (--scope layers)")
    p.add_argument(
        "--residual",
        help=f"comma-separated, from {', '.join(grid.RESIDUALS)} (--scope layers; default: the implementation's own)",
    )
    p.add_argument(
        "--param", action="append", default=[], metavar="IMPL.NAME=VALUE", help="hyperparameter override, repeatable"
    )
    p.add_argument(
        "--compile",
        default="off",
        help="off, on or off,on: each implementation as it is, or wrapped in torch.compile for its case's shapes "
        "(compiled before timing; the compilation's time is recorded apart, as compile_s) (default: off)",
    )
    _add_option_flags(p, SweepOptions)
    _add_option_flags(p, MeasureOptions)
    p.set_defaults(func=_cmd_run)
