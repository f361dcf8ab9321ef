"""A run folder belongs to one run.

* While a run is live it holds an exclusive lock on ``<run>/.lock`` (``fcntl.flock``: released by
  the kernel when the process ends, even on ``kill -9``; the file records the holder's pid, host
  and start time for the error message).
* A folder that already holds a run (anything but the lock file) is refused unless the run is
  resumed (``opd distill --resume RUN``) or ``logging.overwrite=true`` says to replace it. The
  check is repeated after the lock is taken, so two runs started at the same moment on the same
  folder cannot both pass it.

:func:`check_run_folder` is the read-only check made before anything is loaded;
:func:`acquire_run_folder` creates the folder and takes the lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import IO

__all__ = ["RunFolderError", "RunFolderLock", "acquire_run_folder", "check_run_folder"]

LOCK_NAME = ".lock"


class RunFolderError(ValueError):
    """The run folder cannot be used by this run (the message says why and what to do)."""


def _contents(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name != LOCK_NAME) if path.is_dir() else []


def check_run_folder(path: Path, *, resume: bool, overwrite: bool) -> None:
    """Raise :class:`RunFolderError` when ``path`` cannot hold this run (nothing is written)."""
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"logging.run_dir={path} is a file, not a folder; choose another logging.run_dir")
    if resume:
        if not (path / "config.yaml").is_file():
            raise RunFolderError(f"{path} is not an opd run folder (no config.yaml): nothing to resume")
        return
    held = _contents(path)
    if held and not overwrite:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise RunFolderError(
            f"the run folder {path} already holds a run ({shown}); continue it with `opd distill --resume {path}`, "
            "choose another logging.run_dir, or set logging.overwrite=true to replace it")


class RunFolderLock:
    """The exclusive lock of a live run on its folder (see the module docstring)."""

    def __init__(self, path: Path, handle: IO[str]):
        self.path = path
        self._handle: IO[str] | None = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> RunFolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(lock_file: Path) -> str:
    try:
        info = json.loads(lock_file.read_text())
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return f"pid {info['pid']} on {info['host']}, started {started}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def acquire_run_folder(path: Path, *, resume: bool, overwrite: bool) -> RunFolderLock:
    """Create ``path`` if needed, lock it for this run, and check again that it may be used.

    With ``overwrite`` the previous run's files are deleted (after the lock is held).

    Raises:
        RunFolderError: another live process holds the folder, or it holds a run this one may not
            replace (see :func:`check_run_folder`).
    """
    path.mkdir(parents=True, exist_ok=True)
    lock_file = path / LOCK_NAME
    handle = open(lock_file, "a+", encoding="utf-8")  # noqa: SIM115 — held for the run's lifetime
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunFolderError(f"the run folder {path} is in use by a live opd run ({_holder(lock_file)}); wait for it "
                             "to finish or choose another logging.run_dir") from None
    lock = RunFolderLock(path, handle)
    try:
        check_run_folder(path, resume=resume, overwrite=overwrite)
        if overwrite and not resume:
            for name in _contents(path):
                target = path / name
                shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
        handle.flush()
    except BaseException:
        lock.release()
        raise
    return lock
