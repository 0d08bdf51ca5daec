"""Run a function on 2 CPU ranks (gloo, FileStore rendezvous: no ports) and collect what each returns."""
from __future__ import annotations

import datetime
import os
import pickle
import tempfile
from pathlib import Path
from typing import Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, store_path: str, out_dir: str, fn: Callable, args: tuple) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        try:
            result = ("ok", fn(rank, *args))
        except Exception as err:  # the test inspects each rank's error
            result = ("error", f"{type(err).__name__}: {err}")
        Path(out_dir, f"{rank}.pkl").write_bytes(pickle.dumps(result))
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, *args, world_size: int = 2) -> list[tuple[str, object]]:
    """``fn(rank, *args)`` on each rank; returns [("ok", value) | ("error", message)] in rank order."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world_size, os.path.join(tmp, "store"), tmp, fn, args),
                           nprocs=world_size, join=True, start_method="spawn")
        return [pickle.loads(Path(tmp, f"{r}.pkl").read_bytes()) for r in range(world_size)]
