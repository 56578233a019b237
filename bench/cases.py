"""What to run: the ``Case`` key and the parsing and validation of the grid.

A case is frozen and hashable; its ``key()`` (canonical JSON) identifies it
in results files, so a sweep that is run again skips what is already done.
This module imports neither torch nor the registry: the grid is plain data.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

# "decode": one new token's output against a cache of seq_len tokens (causal by nature; built untimed)
MODES = ("fwd", "fwd+bwd", "decode")
SCOPES = ("attention", "layers")
RESIDUALS = ("standard", "reversible", "checkpoint")
# --compile: each implementation as it is (eager), or wrapped in torch.compile for its case's shapes
COMPILE = {"off": False, "on": True}
DTYPES = ("float32", "float64", "float16", "bfloat16")
# without --dtypes: float32 on the CPU; bfloat16 on a GPU, where the fused kernels (FlashAttention) need half precision
DEFAULT_DTYPES = {"cpu": "float32", "cuda": "bfloat16", "mps": "bfloat16"}
# the --dtypes help of every command that takes one
DTYPES_HELP = (
    f"comma-separated, from {', '.join(DTYPES)} (default: "
    + ", ".join(f"{dtype} on {device}" for device, dtype in DEFAULT_DTYPES.items())
    + ")"
)
DTYPE_BYTES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}
MAX_SEQ_LEN = 1 << 24
_DEVICE_RE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")
# a sweep's --devices may also name every GPU at once
_SWEEP_DEVICE_RE = re.compile(r"^(cpu|mps|cuda(:\d+|:all)?)$")


class GridError(ValueError):
    """A malformed grid argument; the message is one line for the user."""


@dataclasses.dataclass(frozen=True, order=True)
class Case:
    """One measurement: an implementation with its config, at one shape, device, dtype, mode and scope."""

    impl: str
    seq_len: int
    mode: str = "fwd"  # "fwd" (no autograd) or "fwd+bwd" (forward + backward of a scalar loss)
    device: str = "cpu"
    dtype: str = "float32"
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    kv_heads: int = 0  # key/value heads, a divisor of heads; 0: as many as heads (a value equal to heads is 0)
    q_len: int = 0  # the queries' length; 0: seq_len's (self-attention); seq_len is the keys' (the context)
    causal: bool = False  # always True for decode
    scope: str = "attention"  # "attention": the kernel alone; "layers": a stack of transformer layers
    depth: int = 1  # layers in the stack (1 for the attention scope)
    residual: str = "standard"  # one of RESIDUALS (layers scope only)
    params: tuple[tuple[str, Any], ...] = ()  # the implementation's config, sorted (name, value) pairs
    compile: bool = False  # wrapped in torch.compile (compiled once before timing; its time recorded apart)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise GridError(f"unknown mode {self.mode!r} (choose from {', '.join(MODES)})")
        if self.scope not in SCOPES:
            raise GridError(f"unknown scope {self.scope!r} (choose from {', '.join(SCOPES)})")
        if self.residual not in RESIDUALS:
            raise GridError(f"unknown residual {self.residual!r} (choose from {', '.join(RESIDUALS)})")
        if self.dtype not in DTYPES:
            raise GridError(f"unknown dtype {self.dtype!r} (choose from {', '.join(DTYPES)})")
        for name in ("seq_len", "batch", "heads", "head_dim", "depth", "kv_heads", "q_len"):
            value = getattr(self, name)
            low = 0 if name in ("kv_heads", "q_len") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise GridError(f"{name} must be a {'non-negative' if low == 0 else 'positive'} integer, got {value!r}")
        if self.heads % self.key_value_heads:
            raise GridError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.kv_heads == self.heads:
            object.__setattr__(self, "kv_heads", 0)  # one name for one shape
        if self.mode == "decode":
            if self.q_len:
                raise GridError("a decode step has one query: it takes no q_len")
            object.__setattr__(self, "causal", True)  # a new token sees only the tokens before it
        if not isinstance(self.compile, bool):
            raise GridError(f"compile must be true or false, got {self.compile!r}")
        if self.scope == "layers" and (self.kv_heads or self.q_len or self.mode == "decode"):
            raise GridError(
                "the layer scope measures self-attention training and inference (no kv_heads, q_len, decode)"
            )

    @property
    def itemsize(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def key_value_heads(self) -> int:
        """The key/value heads (``kv_heads`` resolved)."""
        return self.kv_heads or self.heads

    @property
    def query_len(self) -> int:
        """The queries' length (``q_len`` resolved; a decode step's one query is its mode's, not this)."""
        return self.q_len or self.seq_len

    @property
    def d_model(self) -> int:
        return self.heads * self.head_dim

    def params_dict(self) -> dict[str, Any]:
        return dict(self.params)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["params"] = self.params_dict()
        if not self.compile:  # eager cases keep the keys they had before the field existed
            del data["compile"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Case:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise GridError(f"unknown case fields: {', '.join(sorted(unknown))}")
        values = dict(data)
        values["params"] = tuple(sorted(dict(values.get("params") or {}).items()))
        return cls(**values)

    def key(self) -> str:
        """Canonical JSON of every field: equal cases have equal keys."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def label(self) -> str:
        """Short human-readable name for progress lines."""
        parts = [self.impl, f"n={self.seq_len}", self.mode, self.device, self.dtype]
        if self.causal:
            parts.append("causal")
        if self.kv_heads:
            parts.append(f"kv_heads={self.kv_heads}")
        if self.q_len:
            parts.append(f"q_len={self.q_len}")
        if self.scope == "layers":
            parts.append(f"{self.residual}x{self.depth}")
        if self.compile:
            parts.append("compiled")
        return " ".join(parts)

    def family_key(self) -> tuple:
        """Everything but seq_len: cases on one scaling curve share it."""
        return dataclasses.astuple(dataclasses.replace(self, seq_len=1))


def parse_int(text: str, *, what: str) -> int:
    text = text.strip()
    if not re.fullmatch(r"[+-]?\d+", text):
        raise GridError(f"{what} must be an integer, got {text!r}")
    return int(text)


def parse_seq_lens(text: str) -> list[int]:
    """``"256,1024"``, ``"256:16384:x2"`` (geometric) or ``"1024:8192:+1024"`` (arithmetic), combinable by commas."""
    if not text or not text.strip():
        raise GridError("--seq-lens is empty")
    lengths: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise GridError(f"empty item in --seq-lens {text!r}")
        if ":" in part:
            lengths.extend(_parse_range(part))
        else:
            lengths.append(parse_int(part, what="a sequence length"))
    for n in lengths:
        if n < 1:
            raise GridError(f"sequence lengths must be >= 1, got {n}")
        if n > MAX_SEQ_LEN:
            raise GridError(f"sequence length {n} exceeds {MAX_SEQ_LEN}")
    return sorted(set(lengths))


def _parse_range(part: str) -> list[int]:
    pieces = part.split(":")
    if len(pieces) != 3:
        raise GridError(f"malformed range {part!r}: use START:STOP:xFACTOR or START:STOP:+STEP")
    start = parse_int(pieces[0], what=f"range start in {part!r}")
    stop = parse_int(pieces[1], what=f"range stop in {part!r}")
    step = pieces[2].strip()
    if start < 1 or stop < start:
        raise GridError(f"malformed range {part!r}: need 1 <= START <= STOP")
    values = []
    if step.startswith("x"):
        factor = parse_int(step[1:], what=f"range factor in {part!r}")
        if factor < 2:
            raise GridError(f"malformed range {part!r}: the factor must be at least 2")
        n = start
        while n <= stop:
            values.append(n)
            n *= factor
    elif step.startswith("+"):
        increment = parse_int(step[1:], what=f"range step in {part!r}")
        if increment < 1:
            raise GridError(f"malformed range {part!r}: the step must be at least 1")
        values = list(range(start, stop + 1, increment))
    else:
        raise GridError(f"malformed range {part!r}: the step must be xFACTOR or +STEP")
    return values


def parse_counts(text: str, *, what: str, same: str) -> list[int]:
    """``"8,2,1"`` -> [8, 2, 1]; the word ``same`` is 0 (``same``: what it means for this flag)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise GridError(f"{what} is empty")
    values = []
    for item in items:
        value = (
            0 if item == "same" else parse_int(item, what=f"an item of {what} (a positive integer or 'same': {same})")
        )
        if value < 0 or (value == 0 and item != "same"):
            raise GridError(f"{what} must be positive integers or 'same' ({same}), got {item!r}")
        values.append(value)
    return list(dict.fromkeys(values))


def parse_list(text: str, *, allowed: Iterable[str], what: str) -> list[str]:
    allowed = tuple(allowed)
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise GridError(f"{what} is empty")
    for item in items:
        if item not in allowed:
            raise GridError(f"unknown {what} {item!r} (choose from {', '.join(allowed)})")
    return list(dict.fromkeys(items))


def parse_devices(text: str, *, sweep: bool = False) -> list[str]:
    """Device names, comma-separated; a sweep's may also say ``cuda:all`` (every GPU, one worker each)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise GridError("--devices is empty")
    pattern, names = (
        (_SWEEP_DEVICE_RE, "cpu, cuda, cuda:N, cuda:all or mps") if sweep else (_DEVICE_RE, "cpu, cuda, cuda:N or mps")
    )
    for item in items:
        if not pattern.match(item):
            raise GridError(f"unknown device {item!r} (use {names})")
    items = list(dict.fromkeys(items))
    if "cuda:all" in items and len([item for item in items if item.startswith("cuda")]) > 1:
        raise GridError("--devices cuda:all already names every GPU: name no other cuda device beside it")
    return items


def device_kind(device: str) -> str:
    """What a case says it runs on: ``cuda`` for any GPU (``cuda:1``, ``cuda:all``); the lane says which one."""
    return device.partition(":")[0]


def parse_param_overrides(items: Iterable[str]) -> tuple[tuple[str, str, str], ...]:
    """``["linformer.k=128"]`` -> ``(("linformer", "k", "128"),)`` (values converted later, by field type)."""
    overrides = []
    for item in items:
        match = re.fullmatch(r"([a-z][a-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)=(.+)", item.strip())
        if not match:
            raise GridError(f"malformed --param {item!r}: use IMPL.NAME=VALUE, e.g. linformer.k=128")
        overrides.append(match.groups())
    return tuple(overrides)


def parse_impls(text: str) -> tuple[str, ...]:
    """Implementation names or wildcards, comma-separated; ``*`` (every one) when none is given."""
    return tuple(item.strip() for item in text.split(",") if item.strip()) or ("*",)


@dataclasses.dataclass(frozen=True)
class GridRequest:
    """What the user asked to run, parsed; ``bench.measure.plan.plan_cases`` checks it against the registry."""

    impls: tuple[str, ...]  # names or wildcards
    seq_lens: tuple[int, ...]  # the key/value length
    dtypes: tuple[str, ...] | None  # None: each device's default (DEFAULT_DTYPES)
    modes: tuple[str, ...]
    batch: int
    heads: int
    head_dim: int
    causal: bool
    scope: str
    depths: tuple[int, ...]
    params: tuple[tuple[str, str, str], ...] = ()  # (impl, hyperparameter, value as typed) overrides
    devices: tuple[str, ...] | None = None  # None: the default device
    residuals: tuple[str, ...] | None = None  # None: each implementation's own default
    kv_heads: tuple[int, ...] = (0,)  # key/value heads (0: as many as heads)
    q_lens: tuple[int, ...] = (0,)  # query lengths (0: self-attention)
    compile: tuple[bool, ...] = (False,)  # eager, compiled or both

    def overrides(self) -> dict[str, dict[str, str]]:
        """``{"linformer": {"k": "128"}}``: the --param overrides by implementation."""
        grouped: dict[str, dict[str, str]] = {}
        for impl, name, value in self.params:
            grouped.setdefault(impl, {})[name] = value
        return grouped


def expand_grid(
    *,
    impls: Mapping[str, Mapping[str, Any]],
    seq_lens: Iterable[int],
    devices: Iterable[str],
    dtypes: Iterable[str],
    modes: Iterable[str],
    batch: int,
    heads: int,
    head_dim: int,
    causal: bool,
    scope: str,
    depths: Iterable[int] = (1,),
    residuals: Iterable[str] = ("standard",),
    kv_heads: Iterable[int] = (0,),
    q_lens: Iterable[int] = (0,),
    compile: Iterable[bool] = (False,),
) -> list[Case]:
    """Every combination, ordered so each curve runs from short to long (the runner may stop a curve early).

    Each case once: two values that name one shape (``kv_heads`` equal to ``heads`` and 0) give one case. A
    decode step has one query: decode cases are made once, for self-attention's q_len (0) only.
    """
    if scope == "attention":
        depths, residuals = (1,), ("standard",)
    cases = []
    for device, dtype, (impl, params), compiled, mode, kv, q_len, depth, residual, seq_len in itertools.product(
        devices, dtypes, impls.items(), compile, modes, kv_heads, q_lens, depths, residuals, sorted(seq_lens)
    ):
        if mode == "decode" and q_len:
            continue
        cases.append(
            Case(
                impl=impl,
                seq_len=seq_len,
                mode=mode,
                device=device,
                dtype=dtype,
                batch=batch,
                heads=heads,
                head_dim=head_dim,
                kv_heads=kv,
                q_len=q_len,
                causal=causal,
                scope=scope,
                depth=depth,
                residual=residual,
                params=tuple(sorted(params.items())),
                compile=compiled,
            )
        )
    return list(dict.fromkeys(cases))  # Case normalizes a shape to one key; the first place is kept
