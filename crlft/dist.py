"""Distributed set-up: join the launcher's process group (or form a world of one), pick this rank's device."""

from __future__ import annotations

import datetime
import hashlib
import os
import socket
import sys
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


def torch_extensions_dir() -> str:
    """Where this Python environment keeps DeepSpeed's JIT-compiled ops (``TORCH_EXTENSIONS_DIR`` wins if set).

    torch's default, ``~/.cache/torch_extensions``, is shared by every environment of a user: two environments with
    different torch or DeepSpeed builds then rebuild each other's op on every run (about 100 s of silence each). So
    each environment gets its own: under its prefix when that is writable (a virtual environment), else in the
    user's cache under a hash of the prefix.
    """
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    if os.access(sys.prefix, os.W_OK):
        return os.path.join(sys.prefix, "share", "crlft", "torch_extensions")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    digest = hashlib.sha256(sys.prefix.encode()).hexdigest()[:16]
    return os.path.join(cache, "crlft", "torch_extensions", digest)


def init_distributed() -> DistInfo:
    """Join the process group the launcher set up (``deepspeed``/``torchrun`` env vars), or form one of size 1.

    DeepSpeed picks the backend of its accelerator: NCCL on CUDA, gloo (or oneCCL when installed) on the CPU.
    """
    # Imported here, not at the top: launch.sh imports this module for free_port(), and importing deepspeed takes
    # about 6 s and prints its accelerator line on stdout.
    os.environ["TORCH_EXTENSIONS_DIR"] = torch_extensions_dir()  # the op install.sh built for this environment
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
    else:
        _unlink_shm_allreduce_buffer()
    device = torch.device(accelerator.device_name(local_rank))
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def _unlink_shm_allreduce_buffer() -> None:
    """Remove the name of this rank's DeepSpeed CPU all-reduce buffer from ``/dev/shm``; the mappings stay valid.

    DeepSpeed's shared-memory all-reduce (the CPU accelerator's ``deepspeed_shm_comm`` op) creates a 66 MB
    ``/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}`` per rank while joining the group and never
    unlinks it: every CPU run left them behind, in RAM (16 GB of them on the shared development machine). Each
    rank has opened every other rank's buffer when its initialisation returns, so after a barrier no one needs the
    names any more.
    """
    name = "_".join(
        [
            "deepspeed_allreduce_buffer",
            str(os.getuid()),
            os.environ.get("MASTER_ADDR", ""),
            os.environ.get("MASTER_PORT", ""),
            str(torch.distributed.get_rank()),
        ]
    )
    torch.distributed.barrier()  # on every rank, whether or not its buffer exists, so that none waits alone
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except OSError:  # no such buffer: another DeepSpeed build, no shared-memory op, ranks on several nodes
        pass


def barrier() -> None:
    """All ranks meet here."""
    torch.distributed.barrier()


__all__ = ["DistInfo", "barrier", "free_port", "init_distributed", "torch_extensions_dir"]
