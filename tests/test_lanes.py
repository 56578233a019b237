"""Lanes from --devices: which workers a sweep starts, their cores, their GPU, and which may run together."""

from __future__ import annotations

import pytest

from bench import cases as grid
from bench.measure.lanes import Lane, LaneError, LaneSlot, lane_slots, place, visible_device, worker_environ


def _place(slots, *, cores=16, threads=None, pin=True, host="h"):
    return place(slots, host=host, cores=list(range(cores)), threads=threads, pin=pin)


def test_devices_name_one_lane_per_gpu_and_cpu_lanes_by_count() -> None:
    assert lane_slots(["cpu"], cpu_lanes=1, gpu_count=None) == [LaneSlot("cpu")]
    assert lane_slots(["cpu"], cpu_lanes=3, gpu_count=None) == [LaneSlot("cpu")] * 3
    assert lane_slots(["cuda:all"], cpu_lanes=1, gpu_count=4) == [LaneSlot("cuda", gpu) for gpu in range(4)]
    # cuda is the first GPU: named twice, it is one lane
    assert lane_slots(["cuda", "cuda:0", "cuda:2"], cpu_lanes=1, gpu_count=4) == [
        LaneSlot("cuda", 0),
        LaneSlot("cuda", 2),
    ]
    assert lane_slots(["cpu", "cuda:1", "mps"], cpu_lanes=2, gpu_count=2) == [
        LaneSlot("cpu"),
        LaneSlot("cpu"),
        LaneSlot("cuda", 1),
        LaneSlot("mps"),
    ]
    with pytest.raises(LaneError, match="no GPU"):
        lane_slots(["cuda:all"], cpu_lanes=1, gpu_count=0)


def test_a_sweep_names_every_gpu_and_cases_carry_the_kind() -> None:
    assert grid.parse_devices("cuda:all,cpu", sweep=True) == ["cuda:all", "cpu"]
    with pytest.raises(grid.GridError, match="unknown device 'cuda:all'"):
        grid.parse_devices("cuda:all")  # the cross-check runs on one named device
    with pytest.raises(grid.GridError, match="already names every GPU"):
        grid.parse_devices("cuda:all,cuda:1", sweep=True)
    assert [grid.device_kind(d) for d in ("cpu", "cuda", "cuda:3", "cuda:all", "mps")] == [
        "cpu",
        "cuda",
        "cuda",
        "cuda",
        "mps",
    ]


def test_plan_makes_one_case_for_every_gpu_named() -> None:
    from bench.measure.plan import plan_cases

    request = grid.GridRequest(
        impls=("full",),
        seq_lens=(64, 128),
        dtypes=("float32",),
        modes=("fwd",),
        batch=1,
        heads=2,
        head_dim=8,
        causal=False,
        scope="attention",
        depths=(1,),
        devices=("cuda:0", "cuda:1"),
    )
    cases = plan_cases(request)
    assert [(c.device, c.seq_len) for c in cases] == [("cuda", 64), ("cuda", 128)]
    assert {c.device for c in plan_cases(request, by_kind=False)} == {"cuda:0", "cuda:1"}


def test_a_gpu_lane_sees_its_gpu_alone() -> None:
    assert visible_device(2, {}) == "2"
    # with CUDA_VISIBLE_DEVICES set, cuda:1 of this process is the second GPU it names
    assert visible_device(1, {"CUDA_VISIBLE_DEVICES": "4,6"}) == "6"
    assert visible_device(0, {"CUDA_VISIBLE_DEVICES": "GPU-aa,GPU-bb"}) == "GPU-aa"
    with pytest.raises(LaneError, match="not among the GPUs"):
        visible_device(2, {"CUDA_VISIBLE_DEVICES": "4,6"})
    lane = Lane("cuda:1", "cuda", "h", (0,), 1, visible_devices="6")
    assert worker_environ(lane, {"CUDA_VISIBLE_DEVICES": "4,6", "X": "1"}) == {"CUDA_VISIBLE_DEVICES": "6", "X": "1"}
    cpu = Lane("cpu", "cpu", "h", (0,), 1)
    assert worker_environ(cpu, {"CUDA_VISIBLE_DEVICES": "4,6"}) == {"CUDA_VISIBLE_DEVICES": "4,6"}


def test_cpu_lanes_get_disjoint_cores_or_are_refused() -> None:
    one = _place([LaneSlot("cpu")], cores=8)
    assert [(lane.name, lane.cores, lane.threads) for lane in one] == [("cpu", tuple(range(8)), 8)]
    two = _place([LaneSlot("cpu")] * 2, cores=8)
    assert [(lane.name, lane.cores) for lane in two] == [("cpu[0-3]", (0, 1, 2, 3)), ("cpu[4-7]", (4, 5, 6, 7))]
    assert not two[0].conflicts(two[1])
    three = _place([LaneSlot("cpu")] * 3, threads=2)
    assert [lane.cores for lane in three] == [(0, 1), (2, 3), (4, 5)]
    with pytest.raises(LaneError, match="3 CPU lanes of 6 threads need 18 cores; h lets the sweep use 16"):
        _place([LaneSlot("cpu")] * 3, threads=6)
    with pytest.raises(LaneError, match="needs pinning"):
        _place([LaneSlot("cpu")] * 2, pin=False)


def test_gpu_lanes_share_the_cores_and_a_cpu_lane_beside_them_runs_alone() -> None:
    lanes = _place([LaneSlot("cpu"), *(LaneSlot("cuda", gpu) for gpu in range(8))], cores=16)
    cpu, gpus = lanes[0], lanes[1:]
    assert [lane.name for lane in gpus] == [f"cuda:{gpu}" for gpu in range(8)]
    assert [lane.cores for lane in gpus] == [(2 * i, 2 * i + 1) for i in range(8)]
    assert all(lane.threads == 2 for lane in gpus)
    assert not any(a.conflicts(b) for a in gpus for b in gpus if a is not b)  # GPUs run in parallel
    assert all(cpu.conflicts(gpu) and gpu.conflicts(cpu) for gpu in gpus)  # a CPU case runs alone beside them
    # even when their cores are apart: a GPU worker's threads would share the CPU with the CPU case
    small_cpu, *far_gpus = _place([LaneSlot("cpu"), LaneSlot("cuda", 0), LaneSlot("cuda", 1)], threads=2)
    assert small_cpu.cores == (0, 1) and far_gpus[1].cores == (8, 9) and small_cpu.conflicts(far_gpus[1])
    # one GPU: pinned as a sweep always was, to the first --threads cores
    (single,) = _place([LaneSlot("cuda", 0)], threads=4)
    assert single.cores == (0, 1, 2, 3) and single.threads == 4
    # more GPUs than cores: the shares wrap, and lanes on one core take turns
    few = _place([LaneSlot("cuda", gpu) for gpu in range(4)], cores=2)
    assert [lane.cores for lane in few] == [(0,), (1,), (0,), (1,)]
    assert few[0].conflicts(few[2]) and not few[0].conflicts(few[1])


def test_unpinned_lanes_take_turns_and_other_hosts_never_conflict() -> None:
    a, b = _place([LaneSlot("cuda", 0), LaneSlot("cuda", 1)], pin=False)
    assert a.cores is None and a.conflicts(b)
    elsewhere = _place([LaneSlot("cpu")], host="other")[0]
    assert not a.conflicts(elsewhere) and not elsewhere.conflicts(_place([LaneSlot("cpu")])[0])


def test_lanes_are_laid_out_on_physical_cores(monkeypatch) -> None:
    from bench.measure import process

    # eight CPUs allowed, four cores with two hyperthreads each (0 and 4 are one core, as Linux numbers them)
    monkeypatch.setattr(process.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7}, raising=False)
    monkeypatch.setattr(process, "_thread_siblings", lambda cpu: frozenset({cpu % 4, cpu % 4 + 4}))
    assert process.usable_cores() == [0, 1, 2, 3]
    # a restricted set (taskset, a container's cpuset): the default threads are the cores it allows
    monkeypatch.setattr(process.os, "sched_getaffinity", lambda pid: {2, 6, 3}, raising=False)
    assert process.usable_cores() == [2, 3]
    (cpu,) = place([LaneSlot("cpu")], host="h", cores=process.usable_cores(), threads=None, pin=True)
    assert cpu.cores == (2, 3) and cpu.threads == 2
    # the cross-check's worker, started as a sweep's, is pinned as its one CPU lane is
    assert process.pinned_cores(2) == [2, 3]
    assert process.parse_cpu_list("0-2,8") == [0, 1, 2, 8] and process.parse_cpu_list("x") == []


def test_without_cpu_affinity_nothing_is_pinned() -> None:
    # macOS: no sched_setaffinity; the executors pass pin=False
    (cpu,) = place([LaneSlot("cpu")], host="h", cores=list(range(4)), threads=None, pin=False)
    assert cpu.cores is None and cpu.threads == 4
    with pytest.raises(LaneError, match="needs pinning"):
        place([LaneSlot("cpu")] * 2, host="h", cores=list(range(4)), threads=1, pin=False)
