"""Lanes: where a sweep's cases run, each lane one isolated worker on a device of its own.

``--devices`` names them: ``cpu`` is one lane on the first ``--threads`` cores (``--cpu-lanes N``: N lanes
on disjoint sets of physical cores), ``cuda:0,cuda:1`` or ``cuda:all`` one lane per GPU (its worker sees that GPU
alone, as ``cuda``), ``mps`` one lane. A case says the kind of device (``cuda``); its record says which
lane measured it (``lane``) and the lane's environment which host and GPU (``env.host``, ``env.gpu_uuid``).

Two lanes of one host run at the same time only when their cores are disjoint (cores are physical: a
lane never shares one through its hyperthreads): a CPU case never shares its cores with another case (that
would corrupt both timings). GPU lanes of one host share its cores out among themselves (each worker's
threads on cores of their own), so they run in parallel; a CPU lane runs alone beside them. Unpinned
lanes (``--no-pin``, or no CPU affinity on the system) run one at a time.

:class:`LaneWorker` holds a lane's worker process and turns what happens to a request into a result
(``timeout``, ``crashed``, ``oom`` when the worker dies); the local executor runs one per lane, a Ray
lane runs one inside its actor, so both classify a case's end the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.measure.process import WorkerDied, WorkerProcess, WorkerTimeout, cpu_list


class LaneError(Exception):
    """Lanes that can not be laid out as asked: one line for the user."""


@dataclasses.dataclass(frozen=True)
class LaneSlot:
    """A lane asked for, before it is placed on a host: its device kind and, for a GPU, which one."""

    device: str  # cpu, cuda, mps
    gpu: int | None = None  # the GPU's index among those this process sees (local executor)


@dataclasses.dataclass
class Lane:
    name: str  # what records call it: cpu, cpu[2-3], cuda:1, mps (on a cluster: host/name)
    device: str  # the kind of device its cases say
    host: str
    cores: tuple[int, ...] | None  # the CPUs its worker is pinned to (None: not pinned)
    threads: int  # intra-op threads of its worker
    visible_devices: str | None = None  # CUDA_VISIBLE_DEVICES of its worker (a GPU lane)
    env: dict[str, Any] | None = None  # its environment probe, once the sweep has asked

    def conflicts(self, other: Lane) -> bool:
        """Whether the two may not run at the same time: on one host, a CPU lane beside a lane of another device
        (its case would share the CPU with that worker's threads), or cores in common (or unpinned)."""
        if self.host != other.host:
            return False
        if (self.device == "cpu") != (other.device == "cpu"):
            return True
        if self.cores is None or other.cores is None:
            return True
        return bool(set(self.cores) & set(other.cores))


def lane_slots(devices: list[str] | tuple[str, ...], *, cpu_lanes: int, gpu_count: int | None) -> list[LaneSlot]:
    """The lanes ``--devices`` asks for on one host (``gpu_count``: GPUs visible here, for ``cuda:all``)."""
    slots: list[LaneSlot] = []
    for device in devices:
        kind, _, index = device.partition(":")
        if kind == "cpu":
            slots += [LaneSlot("cpu")] * cpu_lanes if not any(slot.device == "cpu" for slot in slots) else []
        elif kind == "cuda":
            if index == "all":
                if not gpu_count:
                    raise LaneError("--devices cuda:all: this machine has no GPU that torch can use")
                slots += [LaneSlot("cuda", gpu) for gpu in range(gpu_count)]
            else:
                slots.append(LaneSlot("cuda", int(index or 0)))
        else:
            slots.append(LaneSlot(kind))
    gpus = list(dict.fromkeys(slot for slot in slots if slot.device == "cuda"))  # cuda and cuda:0 are one GPU
    return (
        [slot for slot in slots if slot.device == "cpu"] + gpus + [s for s in slots if s.device not in ("cpu", "cuda")]
    )


def visible_device(gpu: int, environ: Mapping[str, str]) -> str:
    """What a worker's CUDA_VISIBLE_DEVICES must say for it to see GPU ``gpu`` of this process as ``cuda``."""
    visible = [item.strip() for item in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if item.strip()]
    if "CUDA_VISIBLE_DEVICES" not in environ:
        return str(gpu)
    if gpu >= len(visible):
        raise LaneError(
            f"cuda:{gpu} is not among the GPUs CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']!r} shows"
        )
    return visible[gpu]


def place(
    slots: list[LaneSlot],
    *,
    host: str,
    cores: list[int],
    threads: int | None,
    pin: bool,
    visible: list[str | None] | None = None,
) -> list[Lane]:
    """Lanes of one host: cores, threads and names for ``slots``.

    ``cores``: one CPU per physical core the sweep may use there (``process.usable_cores``), so no two lanes share a
    core through its hyperthreads. CPU lanes get ``threads`` cores each (default: the cores shared out among
    them), disjoint, from the first; GPU lanes share the cores out among themselves (threads: at most their
    share); an MPS lane is pinned as a CPU lane. ``visible``: each slot's CUDA_VISIBLE_DEVICES when already
    set (a Ray actor's). ``pin`` False (``--no-pin``, or no CPU affinity here): no lane is pinned.
    """
    cpu_slots = [slot for slot in slots if slot.device == "cpu"]
    gpu_slots = [slot for slot in slots if slot.device == "cuda"]
    per_cpu_lane = threads or max(1, len(cores) // max(1, len(cpu_slots)))
    if len(cpu_slots) > 1:
        if not pin:
            raise LaneError(
                "--cpu-lanes above 1 needs pinning (CPU affinity, on by default where the system has it): "
                "lanes on shared cores would corrupt each other's timings"
            )
        if len(cpu_slots) * per_cpu_lane > len(cores):
            raise LaneError(
                f"{len(cpu_slots)} CPU lanes of {per_cpu_lane} threads need {len(cpu_slots) * per_cpu_lane} "
                f"cores; {host} lets the sweep use {len(cores)}: lower --cpu-lanes or --threads"
            )
    lanes = []
    cpu_seen = gpu_seen = 0
    for position, slot in enumerate(slots):
        if slot.device == "cpu":
            count = per_cpu_lane
            mine = tuple(cores[cpu_seen * count : (cpu_seen + 1) * count])
            name = "cpu" if len(cpu_slots) == 1 else f"cpu[{cpu_list(list(mine))}]"
            cpu_seen += 1
        elif slot.device == "cuda":
            share = max(1, len(cores) // len(gpu_slots))
            count = min(threads or len(cores), share)
            start = (gpu_seen * share) % len(cores)
            mine = tuple(cores[start : start + count])
            name = f"cuda:{slot.gpu if slot.gpu is not None else gpu_seen}"
            gpu_seen += 1
        else:
            count = threads or len(cores)
            mine = tuple(cores[:count])
            name = slot.device
        lanes.append(
            Lane(
                name=name,
                device=slot.device,
                host=host,
                cores=mine if pin else None,
                threads=max(1, len(mine)) if pin else count,
                visible_devices=(visible[position] if visible else None) if slot.device == "cuda" else None,
            )
        )
    return lanes


def needs_new_worker(device: str, status: str) -> bool:
    """On an accelerator a case that ran and did not finish ok may leave the device context broken."""
    return status not in ("ok", "skipped") and not device.startswith("cpu")


class LaneWorker:
    """A lane's worker process: started when a request comes, replaced when a case ends badly."""

    def __init__(self, *, threads: int, cores: tuple[int, ...] | None, environ: Mapping[str, str]) -> None:
        self.threads = threads
        self.cores = cores
        self.environ = dict(environ)
        self._log_dir = Path(tempfile.mkdtemp(prefix="attnbench-"))
        self._worker: WorkerProcess | None = None

    def start(self) -> None:
        """A worker ready for the next request (start it from the thread that lives as long as the sweep)."""
        if self._worker is None or self._worker.proc.poll() is not None:
            self._worker = WorkerProcess(
                threads=self.threads,
                log_dir=self._log_dir,
                pin=self.cores is not None,
                cores=self.cores,
                environ=self.environ,
            )

    def request(self, payload: dict[str, Any], *, timeout_s: float, device: str) -> dict[str, Any]:
        """The worker's reply, or what ended it: ``timeout`` (the worker is killed), ``crashed``, ``oom``."""
        self.start()
        assert self._worker is not None
        try:
            result = self._worker.request(payload, timeout_s=timeout_s)
        except WorkerTimeout:
            self.stop()
            return {"status": "timeout", "message": f"passed the time-out of {timeout_s:g} s", "wall_s": timeout_s}
        except WorkerDied as exc:
            self.stop()
            return {"status": exc.status, "message": exc.message}
        if needs_new_worker(device, str(result.get("status", "ok"))):
            self.stop()
        return result

    def stop(self) -> None:
        """End the worker (a new round, a broken context, the end of the sweep)."""
        if self._worker is not None:
            self._worker.kill()
            self._worker.close()
            self._worker = None

    def close(self) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(self._log_dir)


def worker_environ(lane: Lane, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment a lane's worker starts with: this process's, with the lane's GPU alone visible."""
    env = dict(environ)
    if lane.visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = lane.visible_devices
    return env
