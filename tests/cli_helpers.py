"""Run the real ``attnbench`` command in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent


# where the fault_hang implementation (tests/fault_impls.py) writes its pid as it starts hanging, when set
HANG_MARKER_ENV = "ATTNBENCH_TEST_HANG_MARKER"


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), str(ROOT), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def attnbench(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(**env),
        cwd=ROOT,
    )
