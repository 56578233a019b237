"""A sweep over four GPUs that Ray declares and this machine does not have: where did each case run?

Ray lays the lanes out as on a GPU node (one actor per GPU, ``num_gpus=1``, so Ray sets each one's
``CUDA_VISIBLE_DEVICES``); the cases are CPU cases, since the GPUs exist only as Ray's resources.

    python tests/fake_gpus.py results/executors/fake-gpus.jsonl    # then read the records' lane and env
"""

from __future__ import annotations

import sys
from pathlib import Path

import ray

from bench.cases import Case
from bench.measure.ray_executor import RayExecutor
from bench.measure.runner import Sweep
from bench.options import MeasureOptions, SweepOptions

FAKE_GPUS = 4


class CpuCasesOnGpuLanes(RayExecutor):
    """GPU lanes as Ray lays them out, running CPU cases."""

    def start(self):
        lanes = super().start()
        for lane in lanes:
            lane.device = "cpu"
        return lanes


def spread_sweep(out: Path, *, gpus: int = FAKE_GPUS) -> None:
    """Eight CPU cases on a local Ray instance that declares ``gpus`` GPUs, one lane per GPU."""
    ray.init(num_cpus=2, num_gpus=gpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        options = SweepOptions(out=out, quiet=True, processes=1, measure=MeasureOptions(min_time_s=0.01))
        cases = [Case(impl, n, heads=1, head_dim=8) for impl in ("full", "linear") for n in (32, 64, 128, 256)]
        sweep = Sweep(cases, options, log=print, executor=CpuCasesOnGpuLanes(["cuda:all"], options))
        try:
            sweep.run()
        finally:
            sweep.close()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    spread_sweep(Path(sys.argv[1]))
