"""Layer-parallel workers: one process per device, each with a disjoint share of the layers.

Not DDP: DDP's gradient all-reduce would mix different blocks. Workers come
either from ``run_in_processes`` (spawned here, one per ``trainer.devices``) or
from an external launcher (torchrun, SLURM ``srun``) whose environment names
this process's rank. Lightning reads that environment at import time and would
then treat a worker as one rank of a DDP job (and silence every rank but 0), so
a launched worker takes its rank and clears those variables before building
its own single-device Trainer.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)

# (rank, world size, local rank) variables of torchrun and of SLURM.
LAUNCHER_VARIABLES = (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))
# What makes Lightning detect a cluster environment or a non-zero rank.
CLUSTER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                     "NODE_RANK", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                     "JSM_NAMESPACE_RANK")


def _uses_gpu(trainer_kwargs: dict[str, Any]) -> bool:
    accelerator = str(trainer_kwargs.get("accelerator", "auto"))
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def listed_devices(trainer_kwargs: dict[str, Any]) -> list[int] | None:
    """The device indices ``trainer.devices`` names (``[2, 3]`` or ``"2,3"``), or ``None`` for a count/auto."""
    devices = trainer_kwargs.get("devices", "auto")
    if isinstance(devices, str) and "," in devices:
        devices = [part for part in devices.split(",") if part.strip()]
    if isinstance(devices, (list, tuple)):
        return [int(device) for device in devices]
    return None


def named_device_count(trainer_kwargs: dict[str, Any]) -> int | None:
    """How many devices ``trainer.devices`` names (a list, ``"2,3"``, or a count such as ``2``);
    ``None`` for ``auto`` or ``-1``, which depend on the machine."""
    listed = listed_devices(trainer_kwargs)
    if listed is not None:
        return len(listed)
    devices = trainer_kwargs.get("devices", "auto")
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    return devices if isinstance(devices, int) and devices >= 0 else None


def _gpu_of_rank(trainer_kwargs: dict[str, Any], rank: int) -> torch.device:
    """Worker ``rank``'s GPU: the ``rank``-th of the listed devices, else GPU ``rank``."""
    listed = listed_devices(trainer_kwargs)
    return torch.device("cuda", listed[rank] if listed else rank)


@dataclass
class WorkerInfo:
    """Which share of the layers this process trains, and on which device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    poll_seconds: float = 5.0

    @classmethod
    def single(cls, trainer_kwargs: dict[str, Any]) -> "WorkerInfo":
        return cls(device=_gpu_of_rank(trainer_kwargs, 0) if _uses_gpu(trainer_kwargs) else torch.device("cpu"))

    def share(self, layers: list[int]) -> list[int]:
        """Round-robin share, so every worker gets early and late (slower) layers alike."""
        return layers[self.rank :: self.world_size]

    def trainer_overrides(self) -> dict[str, Any]:
        """One device per Trainer, whatever ``trainer.devices`` says for the whole job."""
        if self.device.type == "cuda":
            return {"accelerator": "gpu", "devices": [self.device.index or 0], "num_nodes": 1, "strategy": "auto"}
        return {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto"}

    @staticmethod
    def world_size_for(trainer_kwargs: dict[str, Any]) -> int:
        named = named_device_count(trainer_kwargs)
        if named:
            return named
        return max(torch.cuda.device_count(), 1) if _uses_gpu(trainer_kwargs) else 1

    def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        """Poll the file system until ``predicate`` holds (rank 0 waiting for the other workers)."""
        waited = 0.0
        while not predicate():
            if waited % 60 < self.poll_seconds:
                log.info("rank %d: waiting for %s from the other workers (%.0f s)", self.rank, what, waited)
            time.sleep(self.poll_seconds)
            waited += self.poll_seconds


def launcher_worker() -> WorkerInfo | None:
    """This process's rank under torchrun or SLURM with more than one task, else ``None``.

    Clears the launcher's variables and resets Lightning's rank-zero flag, so the
    worker's own Trainer is a plain single-device one that logs.
    """
    for rank_key, world_key, local_key in LAUNCHER_VARIABLES:
        if rank_key in os.environ and world_key in os.environ and int(os.environ[world_key]) > 1:
            rank, world = int(os.environ[rank_key]), int(os.environ[world_key])
            local = int(os.environ.get(local_key, "0"))
            break
    else:
        return None
    for key in CLUSTER_VARIABLES:
        os.environ.pop(key, None)
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    rank_zero_only.rank = 0
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":  # "cuda" (data.device: auto) then means this worker's own GPU
        torch.cuda.set_device(device)
    return WorkerInfo(rank=rank, world_size=world, device=device)


class LayerRun(Protocol):
    """What a worker needs of a run (``pipeline.QuantizationRun`` is one)."""

    trainer_kwargs: dict[str, Any]
    layers: list[int]

    def prepare(self) -> None: ...

    def train_layers(self, layer_indices: list[int], worker: WorkerInfo) -> None: ...


def _worker_main(rank: int, world_size: int, make_run: Callable[[], LayerRun], threads: int) -> None:
    torch.set_num_threads(threads)
    run = make_run()
    device = _gpu_of_rank(run.trainer_kwargs, rank) if _uses_gpu(run.trainer_kwargs) else torch.device("cpu")
    if device.type == "cuda":  # "cuda" (data.device: auto) then means this worker's own GPU
        torch.cuda.set_device(device)
    worker = WorkerInfo(rank=rank, world_size=world_size, device=device)
    run.prepare()
    run.train_layers(worker.share(run.layers), worker)


def run_in_processes(make_run: Callable[[], LayerRun], world_size: int) -> None:
    """Spawn ``world_size`` workers on this machine, each building its run with the picklable
    ``make_run`` (e.g. a ``functools.partial`` of a constructor), and wait for all of them."""
    threads = max(1, (os.cpu_count() or 1) // world_size)
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker_main, args=(rank, world_size, make_run, threads),
                                 name=f"hh-worker-{rank}") for rank in range(world_size)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    failed = [p.name for p in processes if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"layer-parallel worker(s) failed: {', '.join(failed)}; rerun to resume")
