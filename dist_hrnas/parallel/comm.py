"""The process group and its collectives. Everything else asks this module (never ``torch.distributed``).

Reads what torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT). World size 1 creates no
process group (unless ``dist.always_group``), so single-process runs take exactly the same code path with every
collective a no-op.
"""
from __future__ import annotations

import datetime
import gc
import os
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from dist_hrnas.config import DistConfig
from dist_hrnas.errors import UserError

T = TypeVar("T")

# Where the other ranks wait while rank 0 works alone (see share_rank0_error); set by init_distributed.
_STORE: dist.Store | None = None
_ALONE_SECTIONS = 0   # rank-0-alone sections so far: the same count on every rank (each one is collective)
_POLL_MAX_S = 0.2     # the longest sleep between two looks at the store (what a finished section may wait)
# How long a rank waits to reach the rendezvous store (and for the others' addresses in it). Ranks start at
# different times (imports, a node's container starting late), so joining gets torch's own store default even
# when dist.timeout_s, meant for a hung collective, is shorter: with a 1 s collective timeout a rank that came up
# before rank 0 had started the store gave up after 1 s.
_JOIN_TIMEOUT_S = 300


@dataclass(frozen=True)
class DistContext:
    """Who this process is in the job, and which device it trains on."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from None


def _rendezvous_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The key-value store the process group meets in, private to this restart attempt.

    Under ``torchrun --max-restarts`` the agent's store outlives a failed attempt and still holds the dead
    workers' gloo addresses; restarted workers that read them fail with "connectFullMesh ... Connection
    refused". A prefix per attempt (TORCHELASTIC_RESTART_COUNT) keeps every attempt's keys apart.
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"   # the agent hosts the server
    store = dist.TCPStore(os.environ["MASTER_ADDR"], _env_int("MASTER_PORT", 0), world_size,
                          is_master=not agent_store and rank == 0, timeout=timeout,
                          multi_tenant=not agent_store)
    return dist.PrefixStore(f"dist_hrnas/attempt_{_env_int('TORCHELASTIC_RESTART_COUNT', 0)}", store)


def init_distributed(cfg: DistConfig, training_device: str = "auto") -> DistContext:
    """Join the job torchrun started (or none), pick this rank's device and the backend.

    ``training_device``: ``auto`` = one CUDA device per local rank when CUDA is available, else CPU.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() if training_device == "auto" else training_device.startswith("cuda")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                            f"use --nproc_per_node <= {torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size == 1 and not cfg.always_group:
        return DistContext(device=device)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise UserError("dist.backend=nccl needs CUDA devices; use dist.backend=gloo (or auto) on CPU")
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise UserError(f"WORLD_SIZE={world_size}{' with dist.always_group=true' if world_size == 1 else ''} "
                            f"but {var} is not set: start with torchrun")
    global _STORE
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    store = _rendezvous_store(rank, world_size, max(timeout, datetime.timedelta(seconds=_JOIN_TIMEOUT_S)))
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout, store=store,
                            device_id=device if device.type == "cuda" else None)
    _STORE = dist.PrefixStore("rank0_alone", store)
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device, backend=backend)


def shutdown(ctx: DistContext, failed: bool = False) -> None:
    """Tear the process group down. Callers drop DDP/engine/optimizer references first.

    gloo can abort at exit while a wrapper still holds the group; collecting garbage and a final
    barrier before destroying the group avoids that. After a failure (``failed``) there is no barrier: the
    other ranks may be inside a collective this rank will never join, and waiting for them would hold this
    rank (and, under torchrun, the whole job) until ``dist.timeout_s``. Exiting lets torchrun end the others.
    """
    global _STORE
    _STORE = None
    if not dist.is_initialized():
        return
    gc.collect()
    try:
        if not failed:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _one_line(err: BaseException, what: str) -> str:
    """The line every rank raises for rank 0's ``err``: a user error as it is, a bug named with its type."""
    if isinstance(err, UserError):
        return str(err)
    text = " ".join(str(err).split())
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{what} failed on rank 0 ({type(err).__name__}: {text}); its traceback is in rank 0's output"


def share_rank0_error(err: BaseException | None, what: str) -> None:
    """Collective, after work rank 0 did alone: if it failed (``err`` on rank 0), every rank raises one line.

    Rank 0 re-raises its own exception (a bug keeps its traceback); the others raise a :class:`UserError`
    with the same line, so none is left waiting in a later collective. No-op without a process group
    (``err`` is then raised as it is).
    """
    line = None if err is None else _one_line(err, what)
    if dist.is_initialized():
        _wait_for_rank0()
        line = broadcast_object(line)
    if err is not None:
        raise err
    if line is not None:
        raise UserError(line)


def _wait_for_rank0() -> None:
    """Rank 0 marks the end of its work alone in the store; the other ranks sleep until it does.

    Without this they would wait inside the broadcast, and a collective gives up after ``dist.timeout_s``:
    rank 0 building a LUT (ops and calibration networks, several minutes on a CPU) would end a healthy job.
    Polling the store has no such limit; a lost rank 0 still ends the job (torchrun stops the other workers,
    and a store that cannot be reached raises). Without our store (a group made elsewhere) the broadcast waits.
    """
    global _ALONE_SECTIONS
    if _STORE is None:
        return
    _ALONE_SECTIONS += 1
    key = f"done/{_ALONE_SECTIONS}"
    if rank() == 0:
        _STORE.set(key, "1")
        return
    pause = 0.001
    while not _STORE.check([key]):
        time.sleep(pause)
        pause = min(2 * pause, _POLL_MAX_S)


def on_rank0(work: Callable[[], T], what: str) -> T | None:
    """``work()`` on rank 0 alone (its result there, None elsewhere); a failure stops every rank with one line.

    For what only rank 0 does (profile, LUT, timing, checkpoint and summary writes): the other ranks wait in
    one broadcast and leave it together with rank 0, whether it succeeded or failed.
    """
    result, error = None, None
    if rank() == 0:
        try:
            result = work()
        except Exception as err:  # any failure: the other ranks must hear of it, not wait for dist.timeout_s
            error = err
    share_rank0_error(error, what)
    return result


def is_initialized() -> bool:
    return dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _on_backend_device(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a copy on this rank's GPU when the backend is nccl and it lives on the CPU.

    nccl moves CUDA tensors only ("No backend type associated with device type cpu"), and the small
    bookkeeping tensors (losses, flags, validation counts, the latency profile, masks) are CPU tensors.
    """
    if tensor.is_cuda or dist.get_backend() != "nccl":
        return tensor
    return tensor.to(torch.device("cuda", torch.cuda.current_device()))


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast from ``src``; identity without a process group."""
    if dist.is_initialized():
        moved = _on_backend_device(tensor)
        dist.broadcast(moved, src)
        if moved is not tensor:
            tensor.copy_(moved)
    return tensor


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, mean: bool = False) -> torch.Tensor:
    """The one all-reduce every public wrapper goes through; identity without a process group."""
    if dist.is_initialized():
        moved = _on_backend_device(tensor)
        dist.all_reduce(moved, op=op)
        if moved is not tensor:
            tensor.copy_(moved)
        if mean:
            tensor /= dist.get_world_size()
    return tensor


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    return _all_reduce(tensor, dist.ReduceOp.MAX)


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    return _all_reduce(tensor, dist.ReduceOp.SUM, mean=True)


def all_gather_object(obj: object) -> list[object]:
    """Every rank's ``obj`` (a list of one without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def sync_bn_buffers_(module: torch.nn.Module) -> None:
    """Average BatchNorm running statistics over ranks (DDP/DeepSpeed sync parameters, not these)."""
    if not dist.is_initialized():
        return
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            all_reduce_mean_(m.running_mean)
            all_reduce_mean_(m.running_var)
