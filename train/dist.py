"""Data-parallel training under ``torchrun``: one process per device, DistributedDataParallel, rank 0 writes.

Every rank builds the same model (same seed) and the same list of length-bucketed global batches; each takes its
slice ``batch[rank::world]`` of every batch, and its loss is scaled by its share of the batch, so that DDP's gradient
average equals the gradient of the whole batch: N processes train like one process with the same global batch
(``batch_size`` stays the global batch). gloo on CPU, NCCL on GPU. Evaluation runs on every rank (the same weights
give the same numbers); only rank 0 prints, shows progress and writes the run folder.

Launch: ``torchrun --nproc_per_node N -m train --run runs/NAME ...`` on one machine; on several, the same command on
each with ``--nnodes M --node_rank K --rdzv_backend c10d --rdzv_endpoint HOST:PORT --rdzv_id JOB``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def setup(device: torch.device) -> None:
    """Join the process group torchrun set up (no-op for a single process)."""
    if world_size() > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def local_device(device: torch.device) -> torch.device:
    if device.type == "cuda" and world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shard(batch: list[int]) -> tuple[list[int], float]:
    """This rank's slice of a global batch, and its loss scale (its share of the batch times the world size).

    A rank whose slice is empty (a batch smaller than the world) takes one example with scale 0, so that every rank
    still joins the gradient all-reduce.
    """
    n = world_size()
    if n == 1:
        return batch, 1.0
    mine = batch[rank() :: n]
    if not mine:
        return batch[:1], 0.0
    return mine, len(mine) * n / len(batch)


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around the model when several processes train; the model itself otherwise."""
    if world_size() == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
