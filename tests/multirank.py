"""Run a function on 2 CPU ranks (gloo, FileStore rendezvous: no ports) and collect what each returns."""
from __future__ import annotations

import datetime
import os
import pickle
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, store_path: str, out_dir: str, fn: Callable, args: tuple,
            comm_timeout_s: int | None, rank0_late_s: float) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    if rank == 0:
        time.sleep(rank0_late_s)  # a rank 0 that comes up late (its node's container, a slow import)

    torch.set_num_threads(1)
    if comm_timeout_s is None:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=60))
    else:  # as the training job joins (comm.init_distributed), on a port the parent found free
        from dist_hrnas.config import DistConfig
        from dist_hrnas.parallel import comm

        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
        comm.init_distributed(DistConfig(timeout_s=comm_timeout_s), training_device="cpu")
    try:
        try:
            result = ("ok", fn(rank, *args))
        except Exception as err:  # the test inspects each rank's error
            result = ("error", f"{type(err).__name__}: {err}")
        Path(out_dir, f"{rank}.pkl").write_bytes(pickle.dumps(result))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn: Callable, *args, world_size: int = 2, comm_timeout_s: int | None = None,
              rank0_late_s: float = 0.0) -> list[tuple[str, object]]:
    """``fn(rank, *args)`` on each rank; returns [("ok", value) | ("error", message)] in rank order.

    ``comm_timeout_s``: join through ``comm.init_distributed`` (a TCP store, this collective timeout) instead
    of a bare FileStore group. ``rank0_late_s``: rank 0 starts joining that much later than the others."""
    if comm_timeout_s is not None:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))  # the spawned ranks inherit it
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world_size, os.path.join(tmp, "store"), tmp, fn, args, comm_timeout_s,
                                                rank0_late_s),
                           nprocs=world_size, join=True, start_method="spawn")
        return [pickle.loads(Path(tmp, f"{r}.pkl").read_bytes()) for r in range(world_size)]
