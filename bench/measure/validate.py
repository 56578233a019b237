"""``attnbench validate``: the one command that validates a GPU machine (torch installed, no network, no nox).

The steps (``plan_steps``), each printed as it starts, every output under one folder:

1. the CUDA tests: ``python -m pytest -q -m cuda tests/`` in a child process, from the checkout this
   package lives in; the output goes to ``DIR/cuda-tests.txt`` (and to the screen), its summary line is kept;
2. a CUDA sweep of every implementation (``attnbench run``, resumable) into ``DIR/sweep.jsonl``;
3. decoding on CUDA (``--modes decode``, 8 and 1 key/value heads) into the same file;
4. the crosscheck of ``sdpa`` and ``full`` against independent timers into ``DIR/crosscheck.csv``;
5. the report of the sweep (``attnbench report``) into ``reports/gpu/<slug>/``;

then a summary: the tests' result line, the report's path, the crosscheck table. The ``attnbench`` steps
run in this process through ``bench.cli.main``, the same code path as the command line. A step that
fails is reported and the next runs (the report only when the sweep wrote results); the exit code is
1 when any step failed, 0 otherwise. ``DIR`` is ``results/gpu/<slug>``, the slug made of the GPU's
name (``NVIDIA H200`` -> ``nvidia-h200``).
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent.parent  # the checkout: tests/ lives here
RESULTS_ROOT = Path("results/gpu")
REPORTS_ROOT = Path("reports/gpu")
SWEEP_SEQ_LENS = "1024:32768:x2"
QUICK_SEQ_LENS = "1024:4096:x2"
DECODE_SEQ_LENS = "1024:65536:x4"  # decoding: one token against caches of these lengths
QUICK_DECODE_SEQ_LENS = "1024:4096:x4"
CROSSCHECK_SEQ_LENS = "4096,16384"
QUICK_CROSSCHECK_SEQ_LENS = "4096"
# a pytest summary line: "12 passed, 3 skipped in 4.20s" (possibly between '=' rules)
_SUMMARY_RE = re.compile(r"\b\d+ (passed|failed|skipped|errors?|deselected|xfailed|xpassed)\b|no tests ran")


class NoCuda(Exception):
    """No CUDA device: one line for the user."""


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of the validation: a child process (``argv`` is its command) or an ``attnbench`` command."""

    name: str  # tests | sweep | crosscheck | report
    title: str  # what is printed as it starts
    argv: tuple[str, ...]  # the child's command line, or the arguments of attnbench
    output: Path  # the file or folder it writes
    child: bool = False  # True: run argv as a child process in the checkout; False: bench.cli.main(argv)


def gpu_slug(gpu_name: str) -> str:
    """A folder name for a GPU: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") or "gpu"


def default_dirs(gpu_name: str) -> tuple[Path, Path]:
    """Where the results and the report go without ``--out`` and ``--report-dir``."""
    slug = gpu_slug(gpu_name)
    return RESULTS_ROOT / slug, REPORTS_ROOT / slug


def plan_steps(
    gpu_name: str,
    out_dir: Path,
    report_dir: Path,
    *,
    skip_tests: bool = False,
    quick: bool = False,
    python: str = sys.executable,
) -> list[Step]:
    """The steps of the validation of ``gpu_name``, in order; no step runs here."""
    out_dir, report_dir = Path(out_dir), Path(report_dir)
    sweep = out_dir / "sweep.jsonl"
    crosscheck = out_dir / "crosscheck.csv"
    seq_lens = QUICK_SEQ_LENS if quick else SWEEP_SEQ_LENS
    steps = []
    if not skip_tests:
        tests = out_dir / "cuda-tests.txt"
        steps.append(
            Step(
                "tests",
                f"the CUDA tests (output in {tests})",
                (python, "-m", "pytest", "-q", "-m", "cuda", "tests/"),
                tests,
                child=True,
            )
        )
    sweep_argv = (
        "run", "--impls", "*", "--seq-lens", seq_lens, "--modes", "fwd,fwd+bwd", "--dtypes", "bfloat16,float32",
        "--devices", "cuda:all", "--out", str(sweep),
    )  # fmt: skip
    decode_argv = (
        "run", "--impls", "*", "--seq-lens", QUICK_DECODE_SEQ_LENS if quick else DECODE_SEQ_LENS, "--modes", "decode",
        "--kv-heads", "same,1", "--dtypes", "bfloat16", "--devices", "cuda:all", "--out", str(sweep),
    )  # fmt: skip
    crosscheck_argv = (
        "crosscheck", "--impls", "sdpa,full", "--seq-lens", QUICK_CROSSCHECK_SEQ_LENS if quick else CROSSCHECK_SEQ_LENS,
        "--modes", "fwd,fwd+bwd", "--devices", "cuda", "--dtypes", "bfloat16", "--out", str(crosscheck),
    )  # fmt: skip
    steps += [
        Step(
            "sweep",
            f"a CUDA sweep of every implementation on {gpu_name}, {seq_lens} tokens (resumable)",
            sweep_argv,
            sweep,
        ),
        Step(
            "decode",
            "decoding on CUDA: one token against caches of growing length, 8 and 1 key/value heads (bfloat16)",
            decode_argv,
            sweep,
        ),
        Step(
            "crosscheck",
            "the harness's timings beside independent timers (sdpa, full; bfloat16)",
            crosscheck_argv,
            crosscheck,
        ),
        Step(
            "report",
            f"the report of the sweep into {report_dir}",
            ("report", str(sweep), "--out", str(report_dir)),
            report_dir,
        ),
    ]
    return steps


def cuda_gpu_name() -> str:
    """The name of CUDA device 0; NoCuda (one line) when this torch sees no CUDA device."""
    if not torch.cuda.is_available():
        raise NoCuda(f"attnbench validate needs a CUDA device; this torch ({torch.__version__}) sees none")
    return torch.cuda.get_device_name(0)


def summary_line(output: str) -> str:
    """pytest's last summary line ("3 passed, 1 skipped in 2.0s"), without its '=' rules; else the last line."""
    lines = [line.strip().strip("=").strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if _SUMMARY_RE.search(line):
            return line
    return lines[-1] if lines else "(no output)"


def run_child(step: Step, *, cwd: Path = ROOT, echo: Callable[[str], None] = print) -> tuple[int, str]:
    """Run a child step, its output to ``step.output`` and to ``echo`` line by line; (exit code, summary line)."""
    if not (cwd / "tests").is_dir():
        return 4, f"no tests/ folder in {cwd} (attnbench installed without its checkout)"
    with (
        open(step.output, "w") as log,
        subprocess.Popen(
            list(step.argv), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        ) as proc,
    ):
        assert proc.stdout is not None
        text = []
        for line in proc.stdout:
            log.write(line)
            text.append(line)
            echo(line.rstrip("\n"))
        code = proc.wait()
    return code, summary_line("".join(text))


@dataclasses.dataclass(frozen=True)
class Outcome:
    step: Step
    code: int | None  # exit code; None: the step did not run
    note: str  # one line: the tests' summary, or what the step wrote, or why it did not run


def _shown(step: Step) -> str:
    """The step as one would type it."""
    if step.child:
        return " ".join(["python", *step.argv[1:]])  # argv[0] is this interpreter
    return "attnbench " + " ".join(f"'{arg}'" if arg == "*" else arg for arg in step.argv)


def run_steps(steps: list[Step], *, echo: Callable[[str], None] = print) -> list[Outcome]:
    """Run each step in turn (see the module docstring); KeyboardInterrupt stops them."""
    from bench.cli import main as attnbench

    sweep = next((step.output for step in steps if step.name == "sweep"), None)
    outcomes = []
    for number, step in enumerate(steps, 1):
        echo(f"\n== [{number}/{len(steps)}] {step.title}")
        echo(f"$ {_shown(step)}")
        if step.name == "report" and sweep is not None and not sweep.is_file():
            outcomes.append(Outcome(step, None, f"not run: the sweep wrote no {sweep}"))
            echo(outcomes[-1].note)
            continue
        if step.child:
            code, note = run_child(step, echo=echo)
        else:
            code = attnbench(list(step.argv))
            note = str(step.output / "README.md" if step.name == "report" else step.output)
        if code == 130:
            raise KeyboardInterrupt
        outcomes.append(Outcome(step, code, note))
        echo(f"-> {step.name}: {'done' if code == 0 else f'FAILED (exit {code})'}; {note}")
    return outcomes


def summary(outcomes: list[Outcome], *, gpu_name: str, skip_tests: bool) -> list[str]:
    """The lines printed at the end: the tests' result, the report's headline, the crosscheck table."""
    from bench.measure import crosscheck

    by_name = {outcome.step.name: outcome for outcome in outcomes}
    lines = [f"== summary: {gpu_name}, torch {torch.__version__}, CUDA {torch.version.cuda}"]
    tests = by_name.get("tests")
    if tests is None:
        lines.append("tests: not run (--skip-tests)" if skip_tests else "tests: not run")
    else:
        lines.append(f"tests: {tests.note} (exit {tests.code}; output in {tests.step.output})")
    for name in ("sweep", "decode", "report"):
        outcome = by_name.get(name)
        if outcome is None:
            continue
        label = "headline" if name == "report" else name
        failed = f"FAILED (exit {outcome.code}); " if outcome.code else ""  # code None: the note says why not run
        lines.append(f"{label}: {failed}{outcome.note}")
    check = by_name.get("crosscheck")
    if check is not None:
        path = check.step.output
        if check.code == 0 and path.is_file():
            lines += [f"crosscheck: {path}", crosscheck.markdown_table(crosscheck.read_csv(path.read_text()))]
        else:
            lines.append(f"crosscheck: FAILED (exit {check.code})")
    return lines


def exit_code(outcomes: list[Outcome]) -> int:
    return 0 if all(outcome.code == 0 for outcome in outcomes) else 1
