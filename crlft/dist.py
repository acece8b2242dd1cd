"""Distributed set-up: join the launcher's process group (or form a world of one), pick this rank's device."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch


@dataclass
class DistInfo:
    """Where this process sits among the ranks."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def free_port() -> int:
    """An unused TCP port on this machine for a rendezvous (two runs on one machine must not collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Join the process group the launcher set up (``deepspeed``/``torchrun`` env vars), or form one of size 1.

    DeepSpeed picks the backend of its accelerator: NCCL on CUDA, gloo (or oneCCL when installed) on the CPU.
    """
    # Imported here, not at the top: launch.sh imports this module for free_port(), and importing deepspeed takes
    # about 6 s and prints its accelerator line on stdout.
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        # Not launched (`crlft train`): a world of one, in this process.
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    deepspeed.init_distributed(timeout=datetime.timedelta(minutes=30), verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
    device = torch.device(accelerator.device_name(local_rank))
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def barrier() -> None:
    """All ranks meet here."""
    torch.distributed.barrier()


__all__ = ["DistInfo", "barrier", "free_port", "init_distributed"]
