"""Multi-process training with `torch.distributed`: process-group setup from torchrun's environment, task shards,
and all-reductions that count what they send.

Launched by torchrun (``WORLD_SIZE > 1`` in the environment), `init_distributed` joins the process group with NCCL
for CUDA devices (each rank on ``cuda:LOCAL_RANK``) and gloo on CPU. Without torchrun every helper is a cheap
no-op for one process: rank 0 of 1, reductions return their input.

Sharding: every rank samples the same global meta-batch of B tasks from (seed, iteration) and keeps the
contiguous rows ``[r * B // P, (r + 1) * B // P)`` (`shard_of`), so the ranks' tasks are distinct and derived
from the rank. Losses are weighted by ``local tasks / B`` and all-reduced with a sum, which gives the mean over
the global meta-batch whatever the shard sizes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Shard:
    """Rows ``[start, stop)`` of a global batch of `total` tasks: the part this rank collects and adapts."""

    start: int
    stop: int
    total: int

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def weight(self) -> float:
        """This shard's share of the global batch, ``len / total`` (the factor that turns a local mean into its
        term of the global mean)."""
        return len(self) / self.total


@dataclass
class CommStats:
    """Counts of the all-reductions since the last `reset` (for benchmarks): calls, payload bytes, seconds."""

    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def reset(self) -> None:
        self.calls, self.bytes, self.seconds = 0, 0, 0.0

    def as_dict(self) -> dict[str, float]:
        return {"calls": self.calls, "bytes": self.bytes, "seconds": self.seconds}


COMM = CommStats()
"""Process-wide all-reduce statistics; every reduction in this module adds to it."""


def env_world_size() -> int:
    """WORLD_SIZE from the environment (set by torchrun), 1 when absent."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """Whether this process is part of an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0, the one process that logs and writes checkpoints."""
    return rank() == 0


def backend_for(device: torch.device | str) -> str:
    """NCCL for CUDA devices, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed(device: torch.device | str = "cpu") -> torch.device:
    """Joins torchrun's process group if ``WORLD_SIZE > 1``; returns the device this rank should use.

    CUDA: each rank takes ``cuda:LOCAL_RANK`` and the NCCL backend; CPU: gloo. Without torchrun (or with one
    process) nothing is initialised and `device` is returned unchanged. Calling it again is harmless.
    """
    device = torch.device(device)
    if env_world_size() <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend_for(device), init_method="env://", **kwargs)
    return device


def shutdown(wait: bool = True) -> None:
    """Leaves the process group, if one was joined. With `wait` (the normal end of a run) every rank first waits
    for the others: a rank that tears down its gloo connections while a peer still uses them can abort."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def shard_of(total: int, rank_: int | None = None, world: int | None = None) -> Shard:
    """This rank's contiguous share of `total` tasks: ``[r * total // P, (r + 1) * total // P)``."""
    r = rank() if rank_ is None else rank_
    p = world_size() if world is None else world
    if total < p:
        raise ValueError(f"a meta-batch of {total} tasks cannot be split over {p} processes: use meta_batch >= {p}")
    return Shard(r * total // p, (r + 1) * total // p, total)


def _all_reduce(flat: Tensor, op: Any) -> Tensor:
    """In-place all-reduce of a 1-D tensor, counted in `COMM`."""
    start = time.perf_counter()
    dist.all_reduce(flat, op=op)
    COMM.seconds += time.perf_counter() - start
    COMM.calls += 1
    COMM.bytes += flat.numel() * flat.element_size()
    return flat


def allreduce_sum(x: Tensor) -> Tensor:
    """Sum of `x` over all ranks (a new tensor; `x` is left unchanged). Identity for one process."""
    if not is_distributed():
        return x
    return _all_reduce(x.detach().clone().reshape(-1), dist.ReduceOp.SUM).view(x.shape)


def allreduce_mean(x: Tensor) -> Tensor:
    """Mean of `x` over all ranks (a new tensor; `x` is left unchanged). Identity for one process."""
    return allreduce_sum(x) / world_size() if is_distributed() else x


def allreduce_max(x: Tensor) -> Tensor:
    """Elementwise maximum of `x` over all ranks (a new tensor). Identity for one process."""
    if not is_distributed():
        return x
    return _all_reduce(x.detach().clone().reshape(-1), dist.ReduceOp.MAX).view(x.shape)


def allreduce_sum_dict(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sum over ranks of every tensor of a dict, in one all-reduce of their concatenation (same dtype and device)."""
    if not is_distributed() or not tensors:
        return tensors
    flat = _all_reduce(torch.cat([t.detach().reshape(-1) for t in tensors.values()]), dist.ReduceOp.SUM)
    chunks = flat.split([t.numel() for t in tensors.values()])
    return {k: c.view(t.shape) for (k, t), c in zip(tensors.items(), chunks)}


def allreduce_grads_(params: list[Tensor], zero_missing: bool = False) -> None:
    """Replaces each parameter's `.grad` by its sum over ranks (one all-reduce for all of them).

    Every rank must pass parameters with gradients in the same places; with `zero_missing` a missing `.grad`
    becomes zeros first (for a rank that had no data this step)."""
    if not is_distributed():
        return
    if zero_missing:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    with_grad = [p for p in params if p.grad is not None]
    if with_grad:
        summed = allreduce_sum_dict({str(i): p.grad for i, p in enumerate(with_grad)})
        for i, p in enumerate(with_grad):
            p.grad.copy_(summed[str(i)])


def weighted_metrics(local: dict[str, float], weight: float, device: torch.device | str = "cpu") -> dict[str, float]:
    """Global means from per-rank means: sum over ranks of ``weight * value`` (float64, one all-reduce)."""
    if not is_distributed() or not local:
        return local
    values = torch.tensor([v * weight for v in local.values()], dtype=torch.float64, device=device)
    return dict(zip(local, allreduce_sum(values).tolist()))


def barrier() -> None:
    """Waits for every rank (no-op for one process)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s value of a picklable object, on every rank (returns `obj` for one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
