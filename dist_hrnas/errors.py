"""User-facing errors: one clear line, exit code 2, no traceback."""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

EXIT_USAGE = 2

F = TypeVar("F", bound=Callable[..., int | None])


class UserError(Exception):
    """Bad input from the user (config, file, device). The message names the problem and the fix."""


class ConfigError(UserError):
    """A config file or override that cannot be turned into a valid :class:`Config`."""


class NonFiniteLossError(UserError):
    """A NaN/inf loss on some rank: every rank raises it together; the last good checkpoint is kept."""


class ConsistencyError(UserError):
    """Ranks ended a shrink with different architectures or parameters: all ranks abort together."""


def exits_cleanly_on_user_error(main: F) -> F:
    """Wrap a CLI ``main`` so that a :class:`UserError` prints one line and exits with code 2.

    Any other exception keeps its traceback: that is a bug, and the traceback is what a bug report needs.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            # one write of the whole line: under torchrun every rank prints to the same pipe, and a line written
            # in pieces (text, then newline) interleaves with another rank's
            sys.stderr.write(f"error: {err}\n")
            sys.stderr.flush()
            raise SystemExit(EXIT_USAGE) from None

    return wrapper  # type: ignore[return-value]
