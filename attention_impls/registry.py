"""The registry of attention implementations.

Adding one is a decorator::

    @register("myattn")
    class MyAttention(AttentionModule): ...

Built-ins are discovered: on first use of the registry every module of the ``attention_impls`` package
is imported (``pkgutil.iter_modules`` over its ``__path__``), so a new file there whose class carries
``@register`` is registered with no edit anywhere else; infrastructure modules (base, registry, blocks,
lsh) simply register nothing.

``list_impls("lin*")`` filters by wildcard; ``get(name)`` returns a fresh
:class:`ImplSpec` (its own config copy, never a handle into the registry);
an unknown name raises :class:`UnknownImplError` naming the close matches;
a name registered twice raises :class:`DuplicateImplError` naming both places;
``get(name, params)`` with a bad hyperparameter raises :class:`ConfigError`,
one line naming ``name.param`` (the class's ``config_error``).

Other installed packages add implementations through the entry-point group
``attention_impls``: the entry point names a module (importing it registers
its classes) or an ``AttentionModule`` subclass (registered under the entry
point's name). Modules listed in the environment variable ``ATTNBENCH_IMPORT``
(comma-separated) are imported too; the sweep runner's workers inherit it.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import importlib
import importlib.metadata
import inspect
import os
import pkgutil
import re
import types
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from attention_impls.base import AttentionModule

__all__ = [
    "ENTRY_POINT_GROUP",
    "ConfigError",
    "DuplicateImplError",
    "ImplSpec",
    "RegistryError",
    "UnknownImplError",
    "get",
    "list_impls",
    "load_errors",
    "register",
]

ENTRY_POINT_GROUP = "attention_impls"
IMPORT_ENV_VAR = "ATTNBENCH_IMPORT"
BUILTIN_SOURCE = "built-in"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# keywords of memory_bytes that an implementation may leave out of its signature (AttentionModule.memory_bytes)
_OPTIONAL_ESTIMATE_KEYWORDS = frozenset({"device", "dtype"})
# keywords of the constructor, flops and memory_bytes passed only for cases beyond self-attention with as many
# key/value heads as query heads: classes that support none of those need not declare them
_SHAPE_KEYWORDS = frozenset({"q_len", "kv_heads"})


class RegistryError(Exception):
    """Base class of registry errors; str() is one clear line."""


class UnknownImplError(RegistryError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DuplicateImplError(RegistryError):
    pass


class ConfigError(RegistryError, ValueError):
    """A hyperparameter value the implementation rejects: ``name.param ...``, one line."""


@dataclasses.dataclass
class _Entry:
    name: str
    module_cls: type[AttentionModule]
    source: str  # "built-in" or the distribution that provides it
    origin: str  # "file:line" of the class, for duplicate errors


_entries: dict[str, _Entry] = {}
_load_errors: list[str] = []
_loaded = False
_current_source: str | None = None  # set while a plugin's entry point is loading


def _origin_of(cls: type) -> str:
    try:
        path = inspect.getsourcefile(cls) or "?"
        line = inspect.getsourcelines(cls)[1]
        return f"{path}:{line}"
    except (OSError, TypeError):
        return f"{cls.__module__}.{cls.__qualname__}"


def _source_of(cls: type) -> str:
    if _current_source is not None:
        return _current_source
    return BUILTIN_SOURCE if cls.__module__.startswith("attention_impls.") else cls.__module__


def _add(name: str, cls: type[AttentionModule]) -> None:
    if not _NAME_RE.match(name):
        raise RegistryError(f"invalid implementation name {name!r}: use lower case letters, digits and _")
    if not (isinstance(cls, type) and issubclass(cls, AttentionModule)):
        raise RegistryError(f"{name!r}: registered object must subclass AttentionModule, got {cls!r}")
    if not dataclasses.is_dataclass(cls.Config):
        raise RegistryError(f"{name!r}: {cls.__name__}.Config must be a dataclass")
    origin = _origin_of(cls)
    if name in _entries:
        if _entries[name].module_cls is cls:
            return  # the same class seen twice (module imported by two routes)
        raise DuplicateImplError(
            f"attention implementation {name!r} registered twice: at {_entries[name].origin} "
            f"({_entries[name].source}) and at {origin} ({_source_of(cls)})"
        )
    _entries[name] = _Entry(name=name, module_cls=cls, source=_source_of(cls), origin=origin)


def register(name: str) -> Callable[[type[AttentionModule]], type[AttentionModule]]:
    """Class decorator: register an AttentionModule subclass under ``name``."""

    def decorator(cls: type[AttentionModule]) -> type[AttentionModule]:
        _add(name, cls)
        return cls

    return decorator


def _load_entry_points() -> None:
    global _current_source
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist_name = ep.dist.name if ep.dist is not None else ep.value
        _current_source = dist_name
        try:
            loaded = ep.load()
            if isinstance(loaded, type) and issubclass(loaded, AttentionModule):
                _add(ep.name, loaded)
            elif not isinstance(loaded, types.ModuleType):
                raise RegistryError(
                    f"entry point {ep.name!r} = {ep.value!r} is neither a module nor an AttentionModule"
                )
        except DuplicateImplError:
            raise
        except Exception as exc:  # a broken plugin must not take the others down
            message = f"plugin {dist_name} ({ep.name} = {ep.value}) failed to load: {type(exc).__name__}: {exc}"
            _load_errors.append(message)
            warnings.warn(message, stacklevel=2)
        finally:
            _current_source = None


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import attention_impls  # the package this module belongs to: its __path__ holds the built-in modules

    for module in pkgutil.iter_modules(attention_impls.__path__, prefix="attention_impls."):
        importlib.import_module(module.name)
    _load_entry_points()
    for module_name in filter(None, (m.strip() for m in os.environ.get(IMPORT_ENV_VAR, "").split(","))):
        importlib.import_module(module_name)


def load_errors() -> list[str]:
    """Messages of plugins that failed to load (they are skipped, not fatal)."""
    _ensure_loaded()
    return list(_load_errors)


def list_impls(pattern: str | list[str] = "*") -> list[str]:
    """Sorted names matching one wildcard pattern (or any of several)."""
    _ensure_loaded()
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    return sorted(name for name in _entries if any(fnmatch.fnmatchcase(name, p) for p in patterns))


def _coerce(field: dataclasses.Field, value: Any) -> Any:
    """Convert a command-line string to the type of the field's default (ValueError: "must be ..., got ...")."""
    if not isinstance(value, str):
        return value
    default = field.default if field.default is not dataclasses.MISSING else None
    if isinstance(default, bool):
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"must be true or false, got {value!r}")
    for kind, convert in ((int, int), (float, float)):
        if isinstance(default, kind):
            try:
                return convert(value)
            except ValueError:
                raise ValueError(f"must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    if default is None and value.lower() == "none":
        return None
    if default is None:
        for convert in (int, float):
            try:
                return convert(value)
            except ValueError:
                pass
    return value


def _beyond_self_attention(*, seq_len: int, heads: int, q_len: int | None, kv_heads: int | None) -> dict[str, int]:
    """``q_len`` and ``kv_heads`` where they differ from self-attention's (seq_len, heads), else nothing."""
    shape = {}
    if q_len is not None and q_len != seq_len:
        shape["q_len"] = q_len
    if kv_heads is not None and kv_heads != heads:
        shape["kv_heads"] = kv_heads
    return shape


@functools.cache
def _declared_keywords(method: Callable[..., Any], optional: frozenset[str]) -> frozenset[str]:
    """Which of the ``optional`` keywords a class's estimate (``flops``, ``memory_bytes``) declares."""
    try:
        parameters = inspect.signature(method).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin or C callable): pass none of them
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return optional
    return optional & parameters.keys()


@dataclasses.dataclass(frozen=True)
class ImplSpec:
    """One implementation with one config: what ``get`` returns. A fresh value each time."""

    name: str
    module_cls: type[AttentionModule]
    config: Any
    source: str
    origin: str

    # metadata, read from the class
    @property
    def family(self) -> str:
        return self.module_cls.family

    @property
    def paper(self) -> str:
        return self.module_cls.paper

    @property
    def time_complexity(self) -> str:
        return self.module_cls.time_complexity

    @property
    def memory_complexity(self) -> str:
        return self.module_cls.memory_complexity

    @property
    def exact(self) -> bool:
        return self.module_cls.exact

    @property
    def supports_causal(self) -> bool:
        return self.module_cls.supports_causal

    @property
    def shared_qk(self) -> bool:
        return self.module_cls.shared_qk

    @property
    def supports_grouped_heads(self) -> bool:
        return self.module_cls.supports_grouped_heads

    @property
    def supports_cross(self) -> bool:
        return self.module_cls.supports_cross

    @property
    def supports_decode(self) -> bool:
        return self.module_cls.supports_decode

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def with_params(self, **overrides: Any) -> ImplSpec:
        """A copy with some hyperparameters changed; strings are converted to the field's type.

        Raises :class:`ConfigError` (one line, ``name.param ...``) when the class's ``config_error`` rejects
        the result, so no estimate or build ever sees an invalid config.
        """
        fields = {f.name: f for f in dataclasses.fields(self.config)}
        converted = {}
        for key, value in overrides.items():
            if key not in fields:
                valid = ", ".join(fields) or "none"
                raise RegistryError(f"{self.name} has no hyperparameter {key!r} (valid: {valid})")
            try:
                converted[key] = _coerce(fields[key], value)
            except ValueError as exc:
                raise ConfigError(f"{self.name}.{key} {exc}") from None
        try:
            config = dataclasses.replace(self.config, **converted)
        except (TypeError, ValueError) as exc:  # a plugin's Config checking itself in __post_init__
            raise ConfigError(f"{self.name}: {exc}") from None
        problem = self.module_cls.config_error(config)
        if problem is not None:
            raise ConfigError(f"{self.name}.{problem}")
        return dataclasses.replace(self, config=config)

    def build(
        self,
        *,
        seq_len: int,
        heads: int,
        head_dim: int,
        q_len: int | None = None,
        kv_heads: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> AttentionModule:
        """The module for these shapes, on this device and dtype (``seq_len``: the key/value length).

        ``q_len`` and ``kv_heads`` reach the constructor only when they differ from self-attention's, so a
        class written before them builds as it did for every case it supports.
        """
        shape = _beyond_self_attention(seq_len=seq_len, heads=heads, q_len=q_len, kv_heads=kv_heads)
        module = self.module_cls(self.config, seq_len=seq_len, heads=heads, head_dim=head_dim, **shape)
        return module.to(device=device, dtype=dtype)

    def unsupported_reason(
        self,
        *,
        seq_len: int,
        head_dim: int,
        causal: bool,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        heads: int | None = None,
        q_len: int | None = None,
        kv_heads: int | None = None,
        decode: bool = False,
    ) -> str | None:
        """None when the case can run; otherwise one line saying why not (the case is skipped with it).

        Beyond the class's own ``unsupported_reason``: grouped heads, cross lengths and decoding need the
        class to declare them (and its ``shape_problem`` to accept the shapes); a causal case with more
        queries than keys is refused for every implementation (its first queries would see no key).
        """
        cls, name = self.module_cls, self.name
        q_len = seq_len if q_len is None else q_len
        heads = heads if heads is not None else (kv_heads or 1)
        kv_heads = heads if kv_heads is None else kv_heads
        if kv_heads < 1 or heads % kv_heads:
            return f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})"
        if causal and q_len > seq_len:
            return (
                f"causal attention needs q_len <= seq_len (the first queries would see no key), got {q_len} > {seq_len}"
            )
        wanted = [
            (kv_heads != heads, cls.supports_grouped_heads, "grouped key/value heads (kv_heads < heads)"),
            (q_len != seq_len, cls.supports_cross, "queries and keys of different lengths (cross-attention)"),
            (decode, cls.supports_decode, "decoding"),
        ]
        for needed, supported, what in wanted:
            if needed and not supported:
                return f"{name} does not support {what}"
        if decode and not causal:
            return "decoding is causal: a new token sees only the tokens before it"
        reason = cls.unsupported_reason(
            self.config, seq_len=seq_len, head_dim=head_dim, causal=causal, device=str(device), dtype=dtype
        )
        if reason is None and (kv_heads != heads or q_len != seq_len or decode):
            reason = cls.shape_problem(
                self.config, q_len=q_len, seq_len=seq_len, heads=heads, kv_heads=kv_heads, causal=causal, decode=decode
            )
        return reason

    def flops(
        self,
        *,
        batch: int,
        heads: int,
        seq_len: int,
        head_dim: int,
        causal: bool = False,
        q_len: int | None = None,
        kv_heads: int | None = None,
    ) -> float:
        """FLOPs of one forward; ``q_len`` and ``kv_heads`` reach the class's ``flops`` when they differ from
        self-attention's (it declares them when it supports such cases)."""
        shape = _beyond_self_attention(seq_len=seq_len, heads=heads, q_len=q_len, kv_heads=kv_heads)
        accepted = _declared_keywords(self.module_cls.flops, _SHAPE_KEYWORDS)
        return float(
            self.module_cls.flops(
                self.config,
                batch=batch,
                heads=heads,
                seq_len=seq_len,
                head_dim=head_dim,
                causal=causal,
                **{key: value for key, value in shape.items() if key in accepted},
            )
        )

    def memory_bytes(
        self,
        *,
        batch: int,
        heads: int,
        seq_len: int,
        head_dim: int,
        itemsize: int,
        causal: bool = False,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        q_len: int | None = None,
        kv_heads: int | None = None,
    ) -> float:
        """The class's estimate; ``device`` ("cuda:1" or a torch.device is fine) reaches it as its type, ``dtype``
        as its name ("float16"), each only if its ``memory_bytes`` declares it; ``q_len`` and ``kv_heads`` as
        ``flops`` passes them."""
        optional = {
            "device": torch.device(device).type,
            "dtype": str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype,
            **_beyond_self_attention(seq_len=seq_len, heads=heads, q_len=q_len, kv_heads=kv_heads),
        }
        accepted = _declared_keywords(self.module_cls.memory_bytes, _OPTIONAL_ESTIMATE_KEYWORDS | _SHAPE_KEYWORDS)
        return float(
            self.module_cls.memory_bytes(
                self.config,
                batch=batch,
                heads=heads,
                seq_len=seq_len,
                head_dim=head_dim,
                itemsize=itemsize,
                causal=causal,
                **{key: value for key, value in optional.items() if key in accepted},
            )
        )

    def decode_flops(self, *, batch: int, heads: int, kv_heads: int, seq_len: int, head_dim: int) -> float | None:
        """FLOPs of one decode step against ``seq_len`` tokens; None when the class does not count them."""
        try:
            value = self.module_cls.decode_flops(
                self.config, batch=batch, heads=heads, kv_heads=kv_heads, seq_len=seq_len, head_dim=head_dim
            )
        except NotImplementedError:
            return None
        return float(value)

    def cache_bytes(
        self, *, batch: int, heads: int, kv_heads: int, seq_len: int, head_dim: int, itemsize: int
    ) -> float | None:
        """The estimated bytes of the decoding cache at ``seq_len`` tokens; None when the class gives none."""
        try:
            value = self.module_cls.cache_bytes(
                self.config,
                batch=batch,
                heads=heads,
                kv_heads=kv_heads,
                seq_len=seq_len,
                head_dim=head_dim,
                itemsize=itemsize,
            )
        except NotImplementedError:
            return None
        return float(value)

    def describe(self) -> dict[str, Any]:
        """Metadata as plain values (for ``attnbench list --json``)."""
        return {
            "name": self.name,
            "family": self.family,
            "paper": self.paper,
            "time_complexity": self.time_complexity,
            "memory_complexity": self.memory_complexity,
            "exact": self.exact,
            "causal": self.supports_causal,
            "grouped_heads": self.supports_grouped_heads,
            "cross": self.supports_cross,
            "decode": self.supports_decode,
            "decode_complexity": self.module_cls.decode_complexity,
            "source": self.source,
            "params": self.params(),
        }


def get(name: str, params: Mapping[str, Any] | None = None) -> ImplSpec:
    """A fresh spec of the implementation ``name`` with its default config (updated by ``params``)."""
    _ensure_loaded()
    if name not in _entries:
        close = difflib.get_close_matches(name, list(_entries), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; registered: {', '.join(sorted(_entries))}"
        raise UnknownImplError(f"unknown attention implementation {name!r}{hint}")
    entry = _entries[name]
    spec = ImplSpec(
        name=entry.name,
        module_cls=entry.module_cls,
        config=entry.module_cls.Config(),
        source=entry.source,
        origin=entry.origin,
    )
    return spec.with_params(**params) if params else spec
