"""One writer per output folder: an advisory lock held while a command writes there.

Two training runs (or runners, or upcycles) writing one folder corrupt each other: checkpoints renamed under each
other, two step-1 records in one log, a ``final/`` config from one run beside the weights of the other. Each command
takes `exclusive_output` first, before it plans, reads data or builds a model, so the second one refuses at once.

The lock is ``fcntl.flock`` on a lock file: the kernel releases it when its holder exits, however it exits. A normal
exit also removes the file, so a lock file found unheld was left by a run that was killed: it is named and taken over.
Making the folder and writing the lock file also checks, up front, that the folder can be written.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

LOCK_FILE = ".pnet-run.lock"


class OutputLockedError(RuntimeError):
    """Another live process holds the output folder."""


class OutputNotWritableError(PermissionError):
    """The output folder cannot be created or written."""


def _holder(fd: int) -> str:
    """What the lock file says about the process that wrote it."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
    except (ValueError, KeyError, TypeError):
        return text or "unknown process"


def _open_and_lock(lock_path: Path, what: str) -> int:
    """Open and flock ``lock_path`` (retrying if its holder removed it in between); raise if a live process holds it."""
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise OutputNotWritableError(f"{what}: cannot write {lock_path}: {error.strerror}; choose a writable "
                                         "output folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise OutputLockedError(
                f"{what} is in use by another run ({holder}). Two runs writing one folder corrupt each other's "
                f"checkpoints, log and export: wait for that run to end, or choose another output folder. (Lock: "
                f"{lock_path})") from None
        try:  # the file we locked must still be the one at lock_path (its holder unlinks it on release)
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def exclusive_output(folder: str | os.PathLike, lock_path: str | os.PathLike | None = None) -> Iterator[None]:
    """Hold ``folder`` for this process: create it (checking it can be written), refuse if another live process holds
    it, name a lock left by a killed run and take it over. ``lock_path`` defaults to ``folder/.pnet-run.lock``; a
    command that replaces ``folder`` whole (writes beside it and renames) locks a file beside it instead. On exit the
    lock is released and a folder this call created and left empty is removed (a refused start leaves nothing)."""
    folder = Path(folder)
    lock_path = Path(lock_path) if lock_path is not None else folder / LOCK_FILE
    created = [p for p in (lock_path.parent, *lock_path.parent.parents) if not p.exists()]
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputNotWritableError(f"output folder {folder}: cannot create {lock_path.parent}: "
                                     f"{error.strerror}; choose a writable output folder") from None
    try:
        fd = _open_and_lock(lock_path, f"output folder {folder}")
    except BaseException:
        _remove_if_empty(created)
        raise
    try:
        if os.fstat(fd).st_size:
            print(f"{lock_path}: taking over the lock of a run that ended without releasing it "
                  f"({_holder(fd)}; that process no longer holds it: it was killed)", file=sys.stderr)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)  # before the release: a process that opened this file sees it gone and retries
        os.close(fd)
        _remove_if_empty(created)


def check_writable_file(path: str | os.PathLike, what: str) -> None:
    """Refuse, before any work, a file path that cannot be written: its nearest existing parent must be a writable
    folder (a runner wrote its report only after hours of training, and then failed)."""
    parent = Path(path).expanduser().absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputNotWritableError(f"{what} {path}: {parent} is not a writable folder; choose a writable path")


def _remove_if_empty(created: list[Path]) -> None:
    for path in created:  # deepest first
        try:
            path.rmdir()
        except OSError:
            return
