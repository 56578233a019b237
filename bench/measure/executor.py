"""Executors: what runs a sweep's requests on its lanes. The runner decides what runs, where and when.

The interface is small: ``start`` lays out the lanes (``bench.measure.lanes``), ``submit`` hands one
request to an idle lane, ``next_result`` waits for any lane to finish and gives its reply (or what ended
it: ``timeout``, ``crashed``, ``oom``), ``fresh_workers`` replaces every lane's worker (a new round),
``close`` ends them. Everything else (the grid, the budget, the early stop along a curve, resume,
time-outs, the one results writer, progress) stays in ``bench.measure.runner``, the same for every
executor.

``local`` (this module) runs a worker process per lane on this machine, each request in a thread of
its own that waits on the worker's pipe; ``ray`` (``bench.measure.ray_executor``) runs each lane's
worker inside a Ray actor on the node and GPU Ray gives it.
"""

from __future__ import annotations

import os
import socket
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Protocol

from bench.measure.lanes import (
    Lane,
    LaneError,
    LaneWorker,
    lane_slots,
    place,
    visible_device,
    worker_environ,
)
from bench.measure.process import can_pin, usable_cores
from bench.options import SweepOptions


class Executor(Protocol):
    name: str

    def start(self) -> list[Lane]:
        """Lay out the lanes (LaneError or SweepError when they can not be)."""
        ...

    def submit(self, lane: Lane, payload: dict[str, Any], *, timeout_s: float) -> None:
        """Hand ``payload`` to ``lane``, which is idle."""
        ...

    def next_result(self) -> tuple[Lane, dict[str, Any]]:
        """Wait for a lane with a request to finish: the lane and its reply (or what ended the request)."""
        ...

    def fresh_workers(self) -> None:
        """Every lane's next request in a new worker process."""
        ...

    def close(self) -> None: ...


def gpu_count() -> int:
    """GPUs torch can use here (the sweep's process imports torch already)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class LocalExecutor:
    """One worker process per lane on this machine; lanes run in parallel where their cores allow."""

    name = "local"

    def __init__(self, devices: list[str], options: SweepOptions) -> None:
        self.devices = devices
        self.options = options
        self._workers: dict[str, LaneWorker] = {}
        self._running: dict[Future, Lane] = {}
        self._pool: ThreadPoolExecutor | None = None

    def start(self) -> list[Lane]:
        count = gpu_count() if any(device.startswith("cuda") for device in self.devices) else None
        slots = lane_slots(self.devices, cpu_lanes=self.options.cpu_lanes, gpu_count=count)
        for slot in slots:
            if slot.gpu is not None and count and slot.gpu >= count:
                names = ", ".join(f"cuda:{index}" for index in range(count))
                raise LaneError(f"device 'cuda:{slot.gpu}' is not available (this machine has {names})")
        lanes = place(
            slots,
            host=socket.gethostname(),
            cores=usable_cores(),
            threads=self.options.threads,
            pin=self.options.pin and can_pin(),
            visible=[visible_device(slot.gpu, os.environ) if slot.gpu is not None else None for slot in slots],
        )
        self._workers = {
            lane.name: LaneWorker(threads=lane.threads, cores=lane.cores, environ=worker_environ(lane, os.environ))
            for lane in lanes
        }
        self._pool = ThreadPoolExecutor(max_workers=len(lanes), thread_name_prefix="lane")
        return lanes

    def submit(self, lane: Lane, payload: dict[str, Any], *, timeout_s: float) -> None:
        assert self._pool is not None
        worker = self._workers[lane.name]
        worker.start()  # here, in the sweep's main thread: a worker dies with the thread that started it
        future = self._pool.submit(worker.request, payload, timeout_s=timeout_s, device=lane.device)
        self._running[future] = lane

    def next_result(self) -> tuple[Lane, dict[str, Any]]:
        done, _ = wait(list(self._running), return_when=FIRST_COMPLETED)
        future = next(f for f in self._running if f in done)  # the earliest submitted of those done
        return self._running.pop(future), future.result()

    def fresh_workers(self) -> None:
        for worker in self._workers.values():
            worker.stop()

    def close(self) -> None:
        for worker in self._workers.values():
            worker.close()  # a killed worker ends the thread waiting on it
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._running.clear()


def make_executor(name: str, devices: list[str], options: SweepOptions) -> Executor:
    if name == "ray":
        from bench.measure.ray_executor import RayExecutor

        return RayExecutor(devices, options)
    return LocalExecutor(devices, options)
