"""What a failed command tells its user: the error classes and the one line each exception becomes.

Every command of the ``rho-fused`` CLI ends a failure with one line on stderr,
``rho-fused COMMAND: error: MESSAGE``, and an exit status: 2 when the command line must change (an
option out of range, a path that does not exist, an output that is refused, a ``--resume`` that does
not match, any other ``ValueError`` the library raises about an argument), 1 when the run failed
(`DataError`: bad content in a data or model file; a full disk; a lock held by another process),
``128 + signal`` when it stopped on SIGINT or SIGTERM. `explain` maps any
exception to that status and line; the library raises the classes below where it knows which
case it is in, and `explain` recognises the operating system's own errors (a full disk, a read-only
file system) by their errno.
"""

from __future__ import annotations

import errno
import signal

USAGE = 2  # the command line must change
FAILED = 1  # the run failed


class UsageError(ValueError):
    """The command line (an option, or a path it names) is wrong or conflicts with what is on disk."""


class DataError(ValueError):
    """The content of an input file (a corpus, a scored dataset, a checkpoint, a model) is unusable."""


class RunError(RuntimeError):
    """The run could not go on (a lock held, a bad batch met during training)."""


class Stopped(RuntimeError):
    """The run stopped on a signal after saving what it could; ``signum`` gives the exit status."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


# errno -> how the operating system's error is named to the user
_OS_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "input/output error",
}


def one_line(text: str) -> str:
    """``text`` with its lines joined: a message is one line."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def explain(exc: BaseException) -> tuple[int, str]:
    """The exit status and the one-line message for ``exc``."""
    if isinstance(exc, Stopped):
        return 128 + exc.signum, one_line(exc)
    if isinstance(exc, KeyboardInterrupt):
        return 128 + signal.SIGINT, "interrupted (Ctrl-C); outputs are written whole or not at all"
    if isinstance(exc, UsageError):
        return USAGE, one_line(exc)
    if isinstance(exc, OSError) and exc.errno in _OS_ERRORS:
        what = _OS_ERRORS[exc.errno]
        where = f" {exc.filename}" if exc.filename else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return FAILED, f"{what}{' while writing' + where if where else ''}: free some space, or write elsewhere"
        if exc.errno == errno.EROFS:
            return FAILED, f"{what}: cannot write{where}; choose an output on a writable file system"
        return FAILED, f"{what}:{where}" if where else what
    if isinstance(exc, (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)):
        return USAGE, one_line(exc)
    if isinstance(exc, (DataError, RunError, OSError)):
        return FAILED, one_line(exc)
    if isinstance(exc, (ValueError, TypeError)):  # the library's refusal of an argument: an option, here
        return USAGE, one_line(exc)
    return FAILED, f"unexpected {type(exc).__name__}: {one_line(exc)} (--debug shows the traceback)"
