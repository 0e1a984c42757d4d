"""parallel.py: which worker trains which layers, on which device (no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from hh_lightning import parallel
from hh_lightning.parallel import WorkerInfo, listed_devices


@pytest.mark.parametrize("devices,expected", [
    ([2, 3], [2, 3]), ((1,), [1]), ("2,3", [2, 3]), ("0,", [0]), (["4", "5"], [4, 5]),
    (2, None), ("2", None), ("auto", None), (-1, None),
])
def test_listed_devices(devices, expected) -> None:
    assert listed_devices({"devices": devices}) == expected


@pytest.mark.parametrize("devices,rank,index", [([2, 3], 0, 2), ([2, 3], 1, 3), ("5,7", 1, 7), (2, 1, 1),
                                                ("auto", 0, 0)])
def test_each_rank_gets_the_device_trainer_devices_names(monkeypatch, devices, rank, index) -> None:
    """Rank r runs on the r-th device trainer.devices names (devices [2, 3]: GPUs 2 and 3, not 0 and 1)."""
    kwargs = {"accelerator": "gpu", "devices": devices}
    assert parallel._gpu_of_rank(kwargs, rank) == torch.device("cuda", index)
    if rank == 0:
        assert WorkerInfo.single(kwargs).device == torch.device("cuda", index)


@pytest.mark.parametrize("devices,expected", [([2, 3], 2), ("0,1,2", 3), (4, 4), ("3", 3), ("auto", 1)])
def test_world_size_follows_trainer_devices(devices, expected) -> None:
    assert WorkerInfo.world_size_for({"accelerator": "cpu", "devices": devices}) == expected


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_round_robin_shares_cover_every_layer_once(world_size) -> None:
    layers = list(range(7))
    shares = [WorkerInfo(rank=rank, world_size=world_size).share(layers) for rank in range(world_size)]
    assert sorted(index for share in shares for index in share) == layers
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_one_device_per_layer_trainer() -> None:
    assert WorkerInfo(device=torch.device("cuda", 3)).trainer_overrides()["devices"] == [3]
    assert WorkerInfo().trainer_overrides() == {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto"}


@pytest.mark.parametrize("devices,expected", [([2, 3], 2), ("0,1,2", 3), (4, 4), ("3", 3), (0, 0), ("auto", None),
                                              (-1, None)])
def test_named_device_count(devices, expected) -> None:
    assert parallel.named_device_count({"devices": devices}) == expected
