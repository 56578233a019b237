"""The ``ray`` executor: a sweep's lanes as Ray actors, on every node and GPU of a cluster (``attnbench[ray]``).

Each lane is an actor (:class:`LaneHost`) placed on one node (``NodeAffinitySchedulingStrategy``); a GPU
lane asks Ray for one GPU (``num_gpus=1``), so Ray sets its ``CUDA_VISIBLE_DEVICES`` and no two lanes share
a card. Lanes ask for no CPUs of Ray's: the sweep shares each node's cores out itself, as on one machine
(``bench.measure.lanes.place``). Inside the actor the lane's worker process runs as a local lane's does
(``LaneWorker``: pinned, isolated, its time-out, its death classified on its own node), so a case ends the
same way on either executor. The actor process is Ray's worker: when it dies or is killed, the case it
was running is recorded (``crashed``; ``oom`` when Ray's memory monitor killed it), its worker process dies
with it (the parent-death signal), and a new actor takes the lane. Only the driver writes records.

``--ray-address``: none starts a local instance (as ``ray.init()`` does), ``auto`` joins the cluster
running here, an address joins that one. Every node must have attnbench installed, the same version.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import time
from typing import Any

import bench
from bench.cases import device_kind
from bench.measure.lanes import Lane, LaneError, LaneSlot, LaneWorker, place
from bench.measure.process import can_pin, usable_cores
from bench.options import SweepOptions
from bench.results import first_line

# seconds the driver waits past a case's time-out before it gives up on the actor (it kills its worker itself)
DRIVER_GRACE_S = 60.0
# seconds for the actors to start and say where they are
START_TIMEOUT_S = 300.0
# seconds for the actors to end their workers and remove their log folders at the end of a sweep
CLOSE_TIMEOUT_S = 30.0
# environment variables the driver passes to every actor (a cluster's nodes do not share the driver's)
FORWARDED_ENV_PREFIXES = ("ATTNBENCH_",)


class LaneHost:
    """Inside a Ray actor: one lane's worker process on the node Ray placed the actor on."""

    def __init__(self) -> None:
        self.worker: LaneWorker | None = None

    def describe(self) -> dict[str, Any]:
        """Where this actor is: host, the CPUs it may use, its GPU (as Ray set it), attnbench's version."""
        return {
            "host": socket.gethostname(),
            "cores": usable_cores(),
            "can_pin": can_pin(),
            "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "version": bench.__version__,
            "pid": os.getpid(),
        }

    def configure(self, threads: int, cores: list[int] | None, omp_num_threads: str | None) -> None:
        """The lane's worker: its threads and cores; OMP_NUM_THREADS as the driver has it (Ray sets its own)."""
        environ = dict(os.environ)
        environ.pop("OMP_NUM_THREADS", None)
        if omp_num_threads is not None:
            environ["OMP_NUM_THREADS"] = omp_num_threads
        if self.worker is not None:
            self.worker.close()
        self.worker = LaneWorker(threads=threads, cores=tuple(cores) if cores is not None else None, environ=environ)

    def request(self, payload: dict[str, Any], timeout_s: float, device: str) -> dict[str, Any]:
        assert self.worker is not None, "configure the lane first"
        return self.worker.request(payload, timeout_s=timeout_s, device=device)

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()

    def close(self) -> None:
        """End the worker and remove its log folder (before the actor is killed)."""
        if self.worker is not None:
            self.worker.close()
            self.worker = None


def _ray():
    try:
        import ray
    except ImportError:
        raise LaneError("--executor ray needs Ray, which is not installed: pip install 'attnbench[ray]'") from None
    return ray


def actor_died(exc: BaseException) -> dict[str, Any]:
    """The record's status and message for a case whose actor (Ray's worker process) died under it."""
    ray = _ray()
    text = first_line(exc) or type(exc).__name__
    if isinstance(exc, ray.exceptions.OutOfMemoryError) or "OutOfMemory" in str(exc):
        return {"status": "oom", "message": f"the Ray worker was killed by Ray's memory monitor: {text}"}
    return {"status": "crashed", "message": f"the Ray worker died ({type(exc).__name__}): {text}"}


class RayExecutor:
    """Lanes as Ray actors; see the module docstring."""

    name = "ray"

    def __init__(self, devices: list[str], options: SweepOptions) -> None:
        self.devices = devices
        self.options = options
        self._owns_ray = False
        self._actors: dict[str, Any] = {}  # lane name -> actor handle
        self._placement: dict[str, tuple[str, LaneSlot]] = {}  # lane name -> (node id, slot)
        self._lanes: dict[str, Lane] = {}
        self._running: dict[Any, tuple[Lane, float, float]] = {}  # object ref -> lane, deadline, time-out
        self._starting: list[Any] = []  # actors made before the lanes are laid out

    # -- start
    def _connect(self) -> None:
        ray = _ray()
        if ray.is_initialized():
            return
        address = self.options.ray_address
        logging.getLogger("ray").setLevel(logging.ERROR)  # Ray's start-up notices would break one-line errors
        try:
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.ERROR,
                configure_logging=False,
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            raise LaneError(f"could not start or join {where}: {first_line(exc)}") from None
        self._owns_ray = True

    def node_slots(self, resources: dict[str, float]) -> list[LaneSlot]:
        """The lanes one node gets, from its Ray resources: its CPU lanes, a lane per GPU."""
        slots: list[LaneSlot] = []
        for device in self.devices:
            if device_kind(device) == "cpu":
                slots += [LaneSlot("cpu")] * self.options.cpu_lanes
            else:
                slots += [LaneSlot("cuda")] * int(resources.get("GPU", 0))
        return slots

    def check_devices(self) -> None:
        """What --executor ray can not run, refused before Ray starts."""
        for device in self.devices:
            if device_kind(device) not in ("cpu", "cuda"):
                raise LaneError(f"--executor ray runs cpu and cuda lanes, not {device}")
            if device.startswith("cuda:") and device != "cuda:all":
                raise LaneError(
                    f"--executor ray gives each GPU of the cluster a lane: use --devices cuda:all, not {device}"
                )

    def actor_options(self, node_id: str, slot: LaneSlot) -> dict[str, Any]:
        """What the actor of ``slot`` asks Ray for: its node, and a GPU of its own for a GPU lane."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
        return {
            "num_cpus": 0,
            "num_gpus": 1 if slot.device == "cuda" else 0,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False),
            "max_restarts": 0,
            **({"runtime_env": {"env_vars": env}} if env else {}),
        }

    def _new_actor(self, node_id: str, slot: LaneSlot):
        return _remote_lane_host().options(**self.actor_options(node_id, slot)).remote()

    def start(self) -> list[Lane]:
        ray = _ray()
        self.check_devices()
        self._connect()
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        planned = [(node["NodeID"], slot) for node in nodes for slot in self.node_slots(node.get("Resources", {}))]
        if any(device_kind(device) == "cuda" for device in self.devices) and not any(
            slot.device == "cuda" for _, slot in planned
        ):
            raise LaneError("--devices cuda:all: the Ray cluster has no GPU")
        actors = [self._new_actor(node_id, slot) for node_id, slot in planned]
        self._starting = actors  # killed by close() if the start fails
        try:
            described = ray.get([actor.describe.remote() for actor in actors], timeout=START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise LaneError(f"the Ray actors of the lanes did not start within {START_TIMEOUT_S:g} s") from None
        except ray.exceptions.RayError as exc:  # attnbench missing on a node, a runtime environment that failed
            raise LaneError(f"a lane's Ray actor could not start: {first_line(exc)}") from None
        for info in described:
            if info["version"] != bench.__version__:
                raise LaneError(f"{info['host']} runs attnbench {info['version']}, this driver {bench.__version__}")
        lanes: list[Lane] = []
        node_ids = list(dict.fromkeys(node_id for node_id, _ in planned))
        hosts = [described[[nid for nid, _ in planned].index(node_id)]["host"] for node_id in node_ids]
        for node_id, host in zip(node_ids, hosts, strict=True):
            mine = [i for i, (nid, _) in enumerate(planned) if nid == node_id]
            infos = [described[i] for i in mine]
            slots = [
                LaneSlot("cuda", _gpu_index(infos[k]["visible_devices"]))
                if planned[i][1].device == "cuda"
                else planned[i][1]
                for k, i in enumerate(mine)
            ]
            placed = place(
                slots,
                host=host,
                cores=infos[0]["cores"],
                threads=self.options.threads,
                pin=self.options.pin and infos[0]["can_pin"],
                visible=[info["visible_devices"] for info in infos],
            )
            # on a cluster a lane's name says its node: the host, and the node's id when hosts share a name
            prefix = "" if len(node_ids) == 1 else host if hosts.count(host) == 1 else f"{host}-{node_id[:8]}"
            for k, lane in enumerate(placed):
                lane.name = f"{prefix}/{lane.name}" if prefix else lane.name
                self._lanes[lane.name] = lane
                self._actors[lane.name] = actors[mine[k]]
                self._placement[lane.name] = (node_id, planned[mine[k]][1])
                lanes.append(lane)
        try:
            ray.get([self._configure(lane) for lane in lanes], timeout=START_TIMEOUT_S)
        except ray.exceptions.RayError as exc:
            raise LaneError(f"a lane's Ray actor could not start: {first_line(exc)}") from None
        self._starting = []
        return lanes

    def _configure(self, lane: Lane):
        cores = list(lane.cores) if lane.cores is not None else None
        return self._actors[lane.name].configure.remote(lane.threads, cores, os.environ.get("OMP_NUM_THREADS"))

    def _replace(self, lane: Lane) -> None:
        """A new actor for a lane whose actor died, hung or was killed, on the same node (LaneError: it can not
        start there, the node gone, say)."""
        ray = _ray()
        ray.kill(self._actors[lane.name])  # whatever it holds (its GPU) is free for the new one
        node_id, slot = self._placement[lane.name]
        self._actors[lane.name] = self._new_actor(node_id, slot)
        try:
            ray.get(self._configure(lane), timeout=START_TIMEOUT_S)
        except ray.exceptions.RayError as exc:
            raise LaneError(
                f"lane {lane.name} lost its Ray actor and could not start another: {first_line(exc)}"
            ) from None

    # -- run
    def submit(self, lane: Lane, payload: dict[str, Any], *, timeout_s: float) -> None:
        ref = self._actors[lane.name].request.remote(payload, timeout_s, lane.device)
        self._running[ref] = (lane, time.monotonic() + timeout_s + DRIVER_GRACE_S, timeout_s)

    def next_result(self) -> tuple[Lane, dict[str, Any]]:
        ray = _ray()
        while True:
            soonest = min(deadline for _, deadline, _ in self._running.values())
            ready, _ = ray.wait(list(self._running), num_returns=1, timeout=max(0.0, soonest - time.monotonic()))
            if ready:
                lane, _, _ = self._running.pop(ready[0])
                try:
                    return lane, ray.get(ready[0])
                except ray.exceptions.RayActorError as exc:  # the actor's process died under the case
                    self._replace(lane)
                    return lane, actor_died(exc)
                except ray.exceptions.RayError as exc:  # the actor raised: the lane's worker could not start, say
                    self._replace(lane)
                    return lane, {"status": "error", "message": f"the lane's Ray actor failed: {first_line(exc)}"}
            for ref, (lane, deadline, timeout_s) in list(self._running.items()):
                if time.monotonic() >= deadline:  # the actor itself hangs: its worker passed the time-out long ago
                    del self._running[ref]
                    self._replace(lane)
                    message = f"passed the time-out of {timeout_s:g} s; the Ray worker did not answer and was killed"
                    return lane, {"status": "timeout", "message": message, "wall_s": timeout_s}

    def fresh_workers(self) -> None:
        ray = _ray()
        for name, actor in self._actors.items():
            try:
                ray.get(actor.stop.remote())
            except ray.exceptions.RayError:  # the actor died between cases: the lane gets a new one
                self._replace(self._lanes[name])

    def close(self) -> None:
        ray = _ray()
        if not ray.is_initialized():
            return
        closing = [actor.close.remote() for actor in self._actors.values()]
        with contextlib.suppress(ray.exceptions.RayError):
            ray.wait(closing, num_returns=len(closing), timeout=CLOSE_TIMEOUT_S)
        for actor in [*self._actors.values(), *self._starting]:
            ray.kill(actor)  # its worker process dies with it
        self._actors.clear()
        self._starting = []
        self._running.clear()
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False


@functools.cache
def _remote_lane_host():
    """LaneHost as a Ray actor class (made once: Ray exports a class's definition each time it is made)."""
    return _ray().remote(LaneHost)


def _gpu_index(visible: str | None) -> int | None:
    """The GPU Ray gave an actor, as an index (None when it is not one number)."""
    try:
        return int(visible) if visible is not None else None
    except ValueError:
        return None
