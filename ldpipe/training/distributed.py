"""Data-parallel training helpers over torch.distributed (the process group torchrun sets up).

A run is data-parallel when its process was started by torchrun (`python -m torch.distributed.run
--nproc-per-node N ...`), which sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Each
rank trains on its slice of every global batch; DistributedDataParallel all-reduces the gradients.
Outside torchrun (WORLD_SIZE unset or 1) nothing here touches torch.distributed.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
import torch.distributed as dist

from ldpipe.errors import LdpipeError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def enabled() -> bool:
    """True in a process launched by torchrun with more than one process in the job."""
    return world_size() > 1


def is_main() -> bool:
    """Rank 0 writes every file (shards, checkpoints); the only process when not distributed."""
    return rank() == 0


def rank_device(dev: torch.device) -> torch.device:
    """One GPU per process: a CUDA device becomes cuda:LOCAL_RANK; a CPU stays the CPU."""
    if not enabled() or dev.type != "cuda":
        return dev
    n = torch.cuda.device_count()
    if local_rank() >= n:
        raise LdpipeError(f"rank {rank()} has LOCAL_RANK {local_rank()} but this node has {n} CUDA devices: "
                          f"launch at most {n} processes per node")
    out = torch.device("cuda", local_rank())
    torch.cuda.set_device(out)
    return out


def init(dev: torch.device) -> None:
    """Join the torchrun job's process group (idempotent): NCCL for CUDA, gloo for CPU."""
    if not enabled() or dist.is_initialized():
        return
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
        if var not in os.environ:
            raise LdpipeError(f"WORLD_SIZE={world_size()} but {var} is not set: launch data-parallel training "
                              "with `python -m torch.distributed.run --nproc-per-node N ...`")
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if enabled() and dist.is_initialized():
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (pickled through the process group)."""
    if not (enabled() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def my_slice(idx: Sequence[int]) -> list[int]:
    """This rank's contiguous slice of a global batch; sizes differ by at most one, and ranks past the
    end of a short batch get none."""
    n, w, r = len(idx), world_size(), rank()
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return list(idx[start:start + base + (1 if r < extra else 0)])


def sum_across(values: Sequence[float], dev: torch.device) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()
