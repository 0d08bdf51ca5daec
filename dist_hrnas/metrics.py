"""TensorBoard and console logging, from global rank 0 only (no-op objects elsewhere)."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch

from dist_hrnas.fileio import atomic_write_json
from dist_hrnas.names import RunFiles


class NullWriter:
    """What non-zero ranks (or ``log.tensorboard=false``) get: every call does nothing."""

    def scalar(self, tag: str, value: float, step: int) -> None:
        pass

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        pass

    def text(self, tag: str, text: str, step: int) -> None:
        pass

    def custom_scalars(self, layout: dict[str, dict[str, tuple[str, list[str]]]]) -> None:
        """Charts that overlay several tags: {category: {chart title: ("Multiline", [tag regexes])}}."""

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardWriter(NullWriter):
    """Thin wrapper over ``SummaryWriter`` writing under ``<run_dir>/tb/``."""

    def __init__(self, log_dir: str | os.PathLike):
        from torch.utils.tensorboard import SummaryWriter  # imported here: only rank 0 pays for it

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._writer.add_scalar(tag, float(value), step)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        self._writer.add_histogram(tag, values.detach().float().cpu(), step)

    def text(self, tag: str, text: str, step: int) -> None:
        self._writer.add_text(tag, text, step)

    def custom_scalars(self, layout: dict[str, dict[str, tuple[str, list[str]]]]) -> None:
        # TensorBoard's Custom Scalars tab reads the layout from the event file; a JSON copy beside it
        # documents it for people and scripts
        self._writer.add_custom_scalars({cat: {title: list(chart) for title, chart in charts.items()}
                                         for cat, charts in layout.items()})
        atomic_write_json(Path(self._writer.log_dir) / "custom_scalars_layout.json", layout)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def make_writer(run_dir: str | os.PathLike, enabled: bool, is_main: bool) -> NullWriter:
    if enabled and is_main:
        return TensorBoardWriter(RunFiles(Path(run_dir)).tensorboard)
    return NullWriter()


def get_logger(is_main: bool, name: str = "dist_hrnas") -> logging.Logger:
    """Console logger: INFO on rank 0, silent elsewhere (errors still surface as exceptions)."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.CRITICAL + 1)
    return logger


def read_scalars(tb_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the event files under ``tb_dir`` (for tests and reports)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_tags(tb_dir: str | os.PathLike) -> dict[str, list[str]]:
    """Tag lists by kind (scalars, histograms, tensors, ...) in the event files under ``tb_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return {k: list(v) for k, v in acc.Tags().items() if isinstance(v, list)}
