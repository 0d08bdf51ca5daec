"""Atomic file writes: a reader (or a crash) never sees a half-written file."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once at import: os.umask can only be read by setting it


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temp file in the same directory, then ``os.replace`` it onto ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would have
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | os.PathLike, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def writable_dir_problem(path: str | os.PathLike) -> str:
    """Why ``path`` cannot be (created and) written as a directory ('' when it can); writes nothing.

    Checked before any expensive step, so a run or a profile does not find out at its end.
    """
    target = Path(path).absolute()
    probe = target
    while not probe.exists():
        if probe.is_symlink():
            return f"{probe} is a dangling symbolic link"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return ""


def writable_file_problem(path: str | os.PathLike) -> str:
    """Why the file ``path`` cannot be written (atomically, next to it) ('' when it can); writes nothing."""
    target = Path(path)
    if target.exists() and not target.is_file():
        return f"{target} exists and is not a regular file"
    return writable_dir_problem(target.parent)
