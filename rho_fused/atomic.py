"""Atomic writes: an output appears complete under its final name, or not at all.

Everything is first written to a temporary sibling (same directory, so the final rename stays on
one file system), then renamed into place. A directory cannot be renamed over a non-empty one, so
replacing an output takes two renames (the old one aside, the new one in); a process killed
between them leaves the complete previous output as a ``.NAME.old-PID`` sibling, which `recover`
(called by every reader here and by the next `atomic_dir`) puts back. An interrupted run thus
leaves the previous output intact, and at worst a ``.NAME.tmp-PID-*`` sibling, removed by the next
successful write once process PID is gone.

Files and directories written here get the modes the process's umask gives, as ``open`` and
``mkdir`` would: `tempfile` creates its files 0600 and directories 0700 whatever the umask, so
they are widened to ``0666 & ~umask`` / ``0777 & ~umask`` before they are renamed into place.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process's umask (read from /proc on Linux; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (made by `tempfile`, 0600 or 0700) the mode ``open``/``mkdir`` would have given it."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~current_umask())


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``path`` when the block completes.

    With ``overwrite=False`` an existing ``path`` is an error, raised before any work is done.
    On an exception the temporary directory is removed and ``path`` is untouched.
    """
    final = Path(path)
    recover(final)
    remove_stale(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; pass overwrite=True (--overwrite) to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        follow_umask(tmp)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    remove_stale(final)


def recover(path: str | os.PathLike) -> bool:
    """Put back the previous output of a write killed between `atomic_dir`'s two renames.

    When ``path`` is missing and a ``.NAME.old-PID`` sibling (always complete: it was the output
    before the write) exists, rename the newest one to ``path``. Safe when several processes
    call it at once. Returns whether something was put back.
    """
    final = Path(path)
    if final.exists() or not final.parent.is_dir():
        return False
    olds = []
    for old in final.parent.glob(f".{glob.escape(final.name)}.old-*"):
        with contextlib.suppress(FileNotFoundError):  # another process may have put it back since the glob
            olds.append((old.stat().st_mtime, old))
    if not olds:
        return final.exists()
    with contextlib.suppress(FileNotFoundError, OSError):  # another process may have put it back first
        os.replace(max(olds)[1], final)
    return final.exists()


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(path: str | os.PathLike) -> None:
    """Remove the ``.NAME.tmp-PID-*`` and ``.NAME.old-PID`` siblings of ``path`` left by dead processes."""
    final = Path(path)
    for sibling in final.parent.glob(f".{glob.escape(final.name)}.*"):
        kind, _, rest = sibling.name[len(final.name) + 2 :].partition("-")
        pid = rest.split("-")[0]
        if kind in ("tmp", "old") and pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            if sibling.is_dir():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    sibling.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file in the same directory, then rename)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        follow_umask(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
