"""Whole-network timings in a clean process (``latency.clean_process``).

A process that has trained, or has run many different networks, runs the same network slower than a fresh
one: on the 2-core development CPU a network timed at 39-40 ms before 20 training steps of the supernet and
at 43-46 ms after them, in the same process, and stayed slow after the trained model was freed and the heap
trimmed (not held memory, not denormal weights, not thread settings; with oneDNN disabled the difference
vanished, so oneDNN's state is the likely cause). Measured in the training process, every figure after the
first shrink was inflated against the supernet's (taken before training) and against deployment, where the
network runs in a process that does inference only: a searched network measured at 47.0 ms in the search
timed 38.5-42 ms in a fresh process, so a latency budget was met with 10-20 % to spare that the user paid in
accuracy.

So each network is timed in a child forked from a server process that has imported torch and never run
anything (``forkserver``; ``spawn`` where that does not exist): every figure comes from the same fresh
state, whatever the parent did before. Latency does not depend on weight values, so only the architecture
(plain data) crosses. A child that dies is an error on the spot, never a hang.

A child builds one network and times rounds of it when asked (a round: the median of
``latency.network_repeats`` runs). A figure alone is the fastest of several rounds, each in its own fresh
child. Networks compared with each other (a shrink's candidate against the network now) each get one fresh
child for the comparison, which runs only that network, and are timed in the same rounds, alternating their
order, so a slow spell of the machine falls on both. A search keeps a comparison's children until its next
comparison, which times the network now (the candidate just taken, or the network just kept) in the child that
timed it last: that child still runs nothing but its one network (kept and fresh children of one network
read alike: median ratio 0.997 over 6 comparisons), and a new one would cost a start, a build and a first
untimed run.
"""
from __future__ import annotations

import json
import multiprocessing
from dataclasses import asdict
from multiprocessing.connection import Connection
from typing import Callable, Iterable

from dist_hrnas.parallel import comm
from dist_hrnas.config import LatencyConfig
from dist_hrnas.errors import UserError
from dist_hrnas.latency.networks import network_round
from dist_hrnas.latency.rounds import NETWORK_ROUNDS, RETAKES, Figures, interleaved, settled
from dist_hrnas.models import HRNet, export_arch, model_from_arch
from dist_hrnas.latency.timing import make_timer

POLL_S = 2.0  # how often a waiting parent checks that the child is still alive
# Untimed runs before each round after a child's first: none. oneDNN made its kernels in the first round's warmup;
# what is left is the round's first run bringing the network's data back into the caches the other networks'
# rounds used, and the median of a round's runs does not see one slow run: two digits networks alternating in
# rounds of 8 runs at batch 32, the first run of a later round read 0.98-1.16x the others (median over 7 rounds)
# and the median of runs 1-5 read 1.003x / 1.000x that of runs 2-6. The warmup run cost a sixth of every later
# round of a candidate comparison (latency.candidate_repeats: 5).
LATER_ROUND_WARMUP = 0


def _serve_network(arch: dict, cfg_fields: dict, image_size: int, conn: Connection) -> None:  # in the child
    """Build one network, then time one round of it each time the parent asks, until the parent hangs up."""
    try:
        cfg = LatencyConfig(**cfg_fields)
        timer = make_timer(cfg)
        take = network_round(model_from_arch(arch), image_size, cfg, timer, own=True)
        conn.send(("ok", 0.0))  # built: the parent waits for every child's before the first round, so none
        while conn.recv():      # builds while one times; the parent closing its end reads as EOFError: done
            conn.send(("ok", take()))
            timer.warmup = min(timer.warmup, LATER_ROUND_WARMUP)
    except EOFError:
        pass
    except Exception as err:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        conn.close()


def _answer(process, conn: Connection) -> float:
    """The child's next answer; a child that exits without one is an error naming the setting."""
    while not conn.poll(POLL_S) and process.is_alive():
        pass
    try:
        status, value = conn.recv()  # a dead child's closed end reads as EOFError
    except EOFError:
        process.join()
        raise UserError(f"the process timing the network exited (code {process.exitcode}) without a result; "
                        f"set latency.clean_process=false to time networks in the training process instead") from None
    if status != "ok":
        process.join()
        raise UserError(f"timing the network in a clean process failed: {value}")
    return value


class _NetworkProcess:
    """A fresh child holding one network, timing a round of it whenever asked (:meth:`round`)."""

    def __init__(self, ctx, arch: dict, fields: dict, image_size: int, wait: bool = True):
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_serve_network, args=(arch, fields, image_size, child),
                                   name="dist_hrnas-latency", daemon=True)
        self.process.start()
        child.close()  # the child holds its end; a dead child then reads as end of file, not as silence
        if wait:
            self.built()

    def built(self) -> None:
        """Wait until the child has built its network (its first answer)."""
        _answer(self.process, self.conn)

    def round(self) -> float:
        self.conn.send(True)
        return _answer(self.process, self.conn)

    def close(self) -> None:
        self.conn.close()  # the child's next recv ends it
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


class CleanProcessTimer:
    """Times whole networks, each in a fresh child process (see the module docstring)."""

    def __init__(self, cfg: LatencyConfig, image_size: int, keep_children: bool = False):
        """``keep_children``: a comparison's children stay alive until the next comparison, which times any
        network it shares with this one in that child instead of starting another (see :meth:`compare`)."""
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        self._ctx = multiprocessing.get_context(method)
        if method == "forkserver":  # the server imports torch once; each child is a cheap fork of it
            self._ctx.set_forkserver_preload(["dist_hrnas.latency.clean_process"])
        self.cfg, self.cfg_fields, self.image_size = cfg, asdict(cfg), image_size
        self.keep_children = keep_children
        self._kept: dict[str, _NetworkProcess] = {}  # (architecture, settings) -> the child holding it
        self.calls = 0
        self.children = 0  # child processes started (what the benchmarks count)

    def __call__(self, model: HRNet) -> float:
        """End-to-end seconds of ``model``'s architecture: the fastest of its rounds, each in a fresh child."""
        self.calls += 1
        arch = export_arch(model)
        return settled(lambda: self._round(arch), self.cfg)[0]

    def compare(self, models: list[HRNet | dict], rounds: int = NETWORK_ROUNDS, retakes: int = RETAKES,
                settings: LatencyConfig | None = None,
                decided: Callable[[Figures, int], bool] | None = None) -> Figures:
        """Each network's (fastest round, spread), timed in the same rounds (:func:`interleaved`); a network may
        be given as its architecture (export_arch's dict: only that crosses to the child). Each network lives in a
        child of its own, which runs nothing else and times a round when asked: a child per round
        paid its start (~0.5 s) every round, more than a round of a small network. The children start and build
        side by side (nothing is timed until all are built). With ``keep_children`` a network the previous
        comparison timed (a search's network now: the candidate it took, or the one it kept) is timed again in
        that comparison's child, which still runs only that network; the others start fresh.
        ``settings`` (e.g. a candidate comparison's fewer runs) replace the timer's for these rounds; ``decided``
        as in :func:`interleaved`."""
        self.calls += 1
        fields = self.cfg_fields if settings is None else asdict(settings)
        kept, self._kept = self._kept, {}
        workers: list[tuple[str, _NetworkProcess]] = []
        started: list[_NetworkProcess] = []  # a kept child answered "built" long ago: only new ones are waited for
        try:
            for model in models:
                arch = export_arch(model) if isinstance(model, HRNet) else model
                key = json.dumps({"arch": arch, "settings": fields}, sort_keys=True)
                worker = kept.pop(key, None)
                if worker is not None and not worker.process.is_alive():  # ended since: time it afresh
                    worker.close()
                    worker = None
                if worker is None:
                    worker = _NetworkProcess(self._ctx, arch, fields, self.image_size, wait=False)
                    started.append(worker)
                    self.children += 1
                workers.append((key, worker))
            _close_all(kept.values())
            for worker in started:
                worker.built()
            figures = interleaved([w.round for _, w in workers], settings or self.cfg, rounds, retakes, decided)
        except BaseException:
            _close_all(w for _, w in workers)
            raise
        if self.keep_children:
            self._kept = dict(workers)  # the same network twice in one comparison: the later child is kept
            _close_all(w for k, w in workers if self._kept[k] is not w)
        else:
            _close_all(w for _, w in workers)
        return figures

    def close(self) -> None:
        """End the children kept from the last comparison (a kept child otherwise lives until the run ends)."""
        kept, self._kept = self._kept, {}
        _close_all(kept.values())

    def _round(self, arch: dict) -> float:
        """One round of one network, in a fresh child process."""
        self.children += 1
        worker = _NetworkProcess(self._ctx, arch, self.cfg_fields, self.image_size)
        try:
            return worker.round()
        finally:
            worker.close()


def _close_all(workers: Iterable[_NetworkProcess]) -> None:
    for worker in list(workers):
        worker.close()


def start_network_timer(cfg: LatencyConfig, image_size: int, keep_children: bool = False) -> CleanProcessTimer | None:
    """The clean-process timer on the rank that measures (global rank 0) when ``latency.clean_process`` is on
    and the target is this machine; None elsewhere (networks are then timed in-process, or not at all)."""
    if not cfg.clean_process or cfg.lut_device or (comm.is_initialized() and comm.rank() != 0):
        return None
    return CleanProcessTimer(cfg, image_size, keep_children)
