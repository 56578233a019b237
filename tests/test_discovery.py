"""Built-ins are discovered: a new module in ``attention_impls/`` with ``@register`` needs no edit elsewhere."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import attention_impls
from attention_impls import get, list_impls, registry

REPO = Path(__file__).resolve().parent.parent

NEW_MODULE = '''
"""A mechanism that exists only in this test's copy of the package: full attention under another name."""

from attention_impls.full import FullAttention
from attention_impls.registry import register


@register("tmpattn")
class TmpAttention(FullAttention):
    family = "tmp"
'''


def test_every_mechanism_module_is_registered() -> None:
    """Each module of the package either registers something or is infrastructure; no list to keep."""
    assert not hasattr(registry, "BUILTIN_MODULES")
    builtins = {get(name).module_cls.__module__ for name in list_impls() if get(name).source == registry.BUILTIN_SOURCE}
    assert {
        f"attention_impls.{name}" for name in ("full", "sdpa", "linear", "linformer", "sparse", "local")
    } <= builtins
    assert "attention_impls.reformer" in builtins


def _copy_with_new_module(tmp_path: Path) -> dict[str, str]:
    """The package copied into tmp_path with one new file, and an environment that imports the copy first."""
    shutil.copytree(
        Path(attention_impls.__file__).parent,
        tmp_path / "attention_impls",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    (tmp_path / "attention_impls" / "tmpattn.py").write_text(textwrap.dedent(NEW_MODULE).lstrip())
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("ATTNBENCH_IMPORT", None)
    return env


def test_new_module_in_the_package_is_registered(tmp_path: Path) -> None:
    env = _copy_with_new_module(tmp_path)
    script = (
        "import json, attention_impls;"
        "spec = attention_impls.get('tmpattn');"
        "print(json.dumps([attention_impls.__file__, attention_impls.list_impls(), spec.source]))"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    package_file, names, source = json.loads(done.stdout)
    assert Path(package_file).is_relative_to(tmp_path)  # the copy, not the repository's package
    assert "tmpattn" in names and {"full", "local", "sparse"} <= set(names)
    assert source == registry.BUILTIN_SOURCE


def test_new_module_is_listed_by_the_cli(tmp_path: Path) -> None:
    env = _copy_with_new_module(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "bench.cli", "list", "tmpattn"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()[1:]]
    assert [row[:2] for row in rows] == [["tmpattn", "tmp"]]
