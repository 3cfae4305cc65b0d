"""One GPU per worker: the preload's choice, and that it reaches real spawned workers."""

from __future__ import annotations

import os

import pytest

from wsi_deepr.batch import local_cluster
from wsi_deepr.gpu_pinning import gpu_for_worker, visible_gpus, worker_index


def test_worker_names_map_to_gpus_round_robin():
    assert [worker_index(n) for n in (0, 3, "gpu-2", "gpu7", "tcp://10.0.0.1:4000", "x")] == [
        0, 3, 2, 7, 4000, None,
    ]  # fmt: skip
    gpus = ["4", "5", "6"]
    assert [gpu_for_worker(f"gpu-{k}", gpus) for k in range(4)] == ["4", "5", "6", "4"]
    assert gpu_for_worker("scheduler", gpus) is None and gpu_for_worker(0, []) is None


def test_visible_gpus_prefer_the_explicit_list():
    env = {"WSI_DEEPR_GPUS": "2, 3", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    assert visible_gpus(env) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1,0"}) == ["1", "0"]


def test_local_cluster_workers_are_spawned_and_pinned(monkeypatch: pytest.MonkeyPatch):
    from distributed import Client

    monkeypatch.setenv("WSI_DEEPR_GPUS", "5,7")
    with local_cluster(2, pin_gpus=True) as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        # a spawned child runs multiprocessing.spawn.spawn_main; a forked one the parent's argv
        command_lines = client.run(lambda: open("/proc/self/cmdline", "rb").read())
    assert sorted(seen.values()) == ["5", "7"]
    assert len(command_lines) == 2
    assert all(b"spawn_main" in line for line in command_lines.values()), command_lines
