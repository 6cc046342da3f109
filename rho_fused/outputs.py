"""Output directories that are safe to write: a marker that says rho-fused wrote them, and a lock.

- **Marker.** Every output directory a command writes holds `MARKER` (a small JSON file naming the
  command). ``--overwrite`` replaces only a directory that has it (or, written before markers
  existed, a scored dataset's ``rho_fused.json`` or a training run's ``checkpoint/state.pt``):
  anything else is refused, naming what is there.
- **Lock.** While a command writes ``DIR``, the file ``.DIR.lock`` beside it holds the writer's
  host and pid (beside, not inside: an output replaced by rename keeps its lock). A second writer
  is refused, naming the first; a lock left by a process that is gone (same host, pid not running)
  is cleared.
- `claim_output` does both for a command: refuses or accepts ``DIR`` as the options ask
  (``--overwrite``, ``--resume``), then holds its lock until the block ends. Under torchrun, rank 0
  decides and holds the lock, and every rank raises the same error.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .atomic import process_alive, recover, write_json
from .errors import RunError, UsageError
from .ranks import from_rank_zero, rank_and_world

MARKER = ".rho-fused-output.json"
LEGACY_SIGNS = (("rho_fused.json", "score"), ("checkpoint/state.pt", "train"))  # outputs written before markers


def write_marker(directory: str | os.PathLike, command: str) -> None:
    """Mark ``directory`` as an output of ``rho-fused COMMAND``."""
    from . import __version__

    write_json(Path(directory) / MARKER, {"written_by": f"rho-fused {command}", "version": __version__})


def marked_by(directory: str | os.PathLike) -> str | None:
    """The command that wrote ``directory`` (``"score"``, ``"train"``), or None if rho-fused did not."""
    d = Path(directory)
    try:
        return json.loads((d / MARKER).read_text(encoding="utf-8"))["written_by"].split()[-1]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        pass
    for sign, command in LEGACY_SIGNS:
        if (d / sign).is_file():
            return command
    return None


def describe_contents(directory: Path, limit: int = 5) -> str:
    """A short account of what ``directory`` holds, for messages: ``'a.txt', 'b/' (2 entries)``."""
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    except OSError as e:
        return f"(unreadable: {e.strerror})"
    shown = ", ".join(repr(n) for n in names[:limit]) + (", ..." if len(names) > limit else "")
    return f"{shown} ({len(names)} entr{'y' if len(names) == 1 else 'ies'})"


def check_replaceable(path: str | os.PathLike, *, command: str, option: str = "--out") -> None:
    """Raise `UsageError` unless ``path`` is missing, an empty directory or an output of rho-fused."""
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        return
    if not p.is_dir():
        raise UsageError(f"{option} {p} is a file, not a directory: refusing to replace it")
    if not any(p.iterdir()) or marked_by(p) is not None:
        return
    raise UsageError(
        f"{option} {p} was not written by rho-fused (no {MARKER}) and holds {describe_contents(p)}: "
        f"refusing to replace it; choose another {option}, or remove it yourself"
    )


class OutputLock:
    """An exclusive lock on an output path: the file ``.NAME.lock`` beside it, holding host and pid."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.file = self.path.with_name(f".{self.path.name}.lock")
        self.held = False

    def holder(self) -> dict[str, Any] | None:
        """The ``{"host", "pid"}`` of the lock's holder; ``{}`` when unreadable; None when unlocked."""
        try:
            return json.loads(self.file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _stale(self, holder: dict[str, Any]) -> bool:
        pid = holder.get("pid")
        return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not process_alive(pid)

    def acquire(self) -> None:
        """Take the lock, clearing a dead process's; raise `RunError` naming a live holder."""
        self.file.parent.mkdir(parents=True, exist_ok=True)
        me = json.dumps({"host": socket.gethostname(), "pid": os.getpid()})
        for _ in range(3):
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                holder = self.holder()
                if holder is not None and self._stale(holder):
                    with contextlib.suppress(FileNotFoundError):
                        self.file.unlink()  # the writer is gone: its lock means nothing
                    continue
                if holder is None:
                    continue  # released between our open and our read
                who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}" if holder else "another process"
                raise RunError(
                    f"{self.path} is being written by {who} (lock {self.file}); wait for it to finish, "
                    f"or, if that process is gone, remove {self.file}"
                ) from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(me)
            self.held = True
            return
        raise RunError(f"could not take the lock {self.file} (it keeps changing hands)")

    def release(self) -> None:
        """Drop the lock if this process holds it."""
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                self.file.unlink()
            self.held = False

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _claim(path: Path, command: str, overwrite: bool, resume: bool, option: str) -> OutputLock:
    """Rank 0's half of `claim_output`: lock ``path``, then refuse it or prepare it."""
    if overwrite and resume:
        raise UsageError("--overwrite and --resume exclude each other: replace the output, or continue it")
    lock = OutputLock(path)
    lock.acquire()
    try:
        recover(path)  # a previous writer killed between two renames left the output aside
        # a directory holding nothing but a marker (a run refused before its first write) is empty
        exists = path.exists() and (not path.is_dir() or any(p.name != MARKER for p in path.iterdir()))
        if resume:
            if not exists:
                raise UsageError(f"{option} {path} holds nothing to resume (drop --resume to start a new run)")
            if marked_by(path) != command:
                check_replaceable(path, command=command, option=option)  # names what is there
                raise UsageError(f"{option} {path} is not an output of rho-fused {command}: nothing to resume")
        elif exists:
            check_replaceable(path, command=command, option=option)
            if not overwrite:
                hint = "--resume to continue it, or " if command == "train" else ""
                raise UsageError(
                    f"{option} {path} already exists, an output of rho-fused {marked_by(path)} "
                    f"({describe_contents(path)}): pass {hint}--overwrite to replace it, or choose another {option}"
                )
        return lock
    except BaseException:
        lock.release()
        raise


@contextlib.contextmanager
def claim_output(
    path: str | os.PathLike, *, command: str, overwrite: bool = False, resume: bool = False, option: str = "--out"
) -> Iterator[Path]:
    """Hold ``path`` for ``rho-fused COMMAND`` for the duration of the block.

    Refused (`UsageError`) when ``path`` holds something and neither ``overwrite`` nor ``resume``
    is given; when ``overwrite`` is given but rho-fused did not write it; when ``resume`` is given
    but there is nothing of ``COMMAND`` to resume. Refused (`RunError`) while another live process
    holds its lock. Under torchrun, rank 0 checks and locks; all ranks raise its error.
    Yields ``path``; the caller writes the output (and `write_marker`) itself.
    """
    p = Path(path)
    rank, _ = rank_and_world()
    lock, error = None, None
    if rank == 0:
        try:
            lock = _claim(p, command, overwrite, resume, option)
        except (UsageError, RunError, OSError) as e:
            error = e
    error = from_rank_zero(error)
    if error is not None:
        raise error
    try:
        yield p
    finally:
        if lock is not None:
            lock.release()


def make_output_dir(path: str | os.PathLike, command: str) -> Path:
    """Create ``path`` (modes from the umask) with its marker; what `claim_output` leaves to the caller."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    if not (p / MARKER).is_file():
        write_marker(p, command)
    return p
