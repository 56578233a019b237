"""Sessions: `nox -s tests` (the suite), `nox -s lint`, `nox -s bench` (the default sweep + report)."""

from __future__ import annotations

from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")
CONSTRAINTS = ("-c", str(ROOT / "constraints.txt"))
PLUGIN = str(ROOT / "tests" / "plugin_pkg")

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_venv = "yes"


def _install_project(session: nox.Session, *groups: str) -> None:
    """The package (editable) and the named dependency groups, torch pinned by constraints.txt."""
    requirements = [req for group in groups for req in nox.project.dependency_groups(PYPROJECT, group)]
    session.install(*CONSTRAINTS, "-e", ".", *requirements)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the whole pytest suite (conformance, registry, runner, analysis); posargs go to pytest."""
    _install_project(session, "test")
    session.install(*CONSTRAINTS, PLUGIN)  # a real plugin distribution, found through its entry point
    session.run("pytest", *session.posargs, env={"ATTNBENCH_REQUIRE_PLUGIN": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and common bugs with ruff."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".", *session.posargs)
    session.run("ruff", "format", "--check", ".")
