"""DistributedDataParallel plumbing; every helper is a no-op in a single process.

``torchrun --nproc_per_node=N -m pipeline train ...`` sets WORLD_SIZE, RANK and
LOCAL_RANK; :func:`init` then joins the process group (NCCL for CUDA runs,
gloo otherwise). Only rank 0 writes files.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as tdist
from torch import nn

from pipeline.errors import PipelineError
from pipeline.devices import DevicePlan, available_cpus, ddp_backend, device_plan, probe, resolve_device

T = TypeVar("T")


def is_distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def world_size() -> int:
    return tdist.get_world_size() if is_distributed() else 1


def per_process(n: int) -> int:
    """Each process's share of ``n`` items (the distributed sampler pads the last share to this size)."""
    return -(-n // world_size())


def rank() -> int:
    return tdist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init(device: str = "auto") -> bool:
    """Join the process group when launched by torchrun; True if distributed.

    The backend follows the run's device, not the machine: NCCL for a CUDA
    run, gloo otherwise (``--device cpu`` on a GPU machine included), decided
    by :func:`pipeline.devices.ddp_backend`.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return is_distributed()
    backend = ddp_backend(probe(resolve_device(device, local_rank())))
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    tdist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return True


def shutdown() -> None:
    if is_distributed():
        tdist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        tdist.barrier()


def wrap(model: nn.Module, device: torch.device, find_unused: bool = False) -> nn.Module:
    """The model under DDP when distributed; ``find_unused`` from devices.ddp_find_unused."""
    if not is_distributed():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def all_true(flag: bool) -> bool:
    """True when ``flag`` is True on every rank (a collective: every rank must call it)."""
    if not is_distributed():
        return flag
    on = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([int(flag)], device=on)
    tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
    return bool(t.item())


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "wrapped_model"):  # models.heads.FeatureHead
            model = model.wrapped_model
        else:
            return model


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        t = t.clone()
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (first dims may differ) from every rank, in rank order."""
    if not is_distributed():
        return t
    size = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    tdist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(world_size())]
    tdist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def plan_for(cfg, device: torch.device, input_kind: str, amp: str | None = None) -> DevicePlan:
    """The device decisions of this process: its probed device, the world size and the cores it may use."""
    return device_plan(cfg, probe(device), input_kind, world_size=world_size(), cpu_count=available_cpus(), amp=amp)


def main_first(build: Callable[[], T]) -> T:
    """Run a cache builder on rank 0 alone; the others wait at a barrier, then read what it built.

    Only rank 0 writes the cache (no two writers, no rank tidying another's
    temporary file). If rank 0 fails, every rank stops instead of waiting.
    """
    if not is_distributed():
        return build()
    if is_main():
        try:
            result = build()
        except BaseException:
            all_true(False)  # release the waiting ranks, then fail here with the real error
            raise
        all_true(True)
        return result
    if not all_true(True):
        raise PipelineError("rank 0 failed to build a cache; its error is above")
    return build()  # finds rank 0's file: reads it
