"""A run folder belongs to one run.

* While a run is live it holds an exclusive lock on ``<run>/.lock`` (``fcntl.flock``: released by
  the kernel when the process ends, even on ``kill -9``; the file records the holder's pid, host
  and start time for the error message). The run removes the file when it ends or cannot start (a
  full disk at start is reported naming the file, and leaves no lock behind); a lock taken on a
  file removed meanwhile is taken again on the new one.
* A folder that cannot be created (``logging.run_dir=/proc/x``, a read-only file system) is
  refused by the early check, naming the option.
* A folder that already holds a run (anything but the lock file) is refused unless the run is
  resumed (``opd distill --resume RUN``) or ``logging.overwrite=true`` says to replace it. The
  check is repeated after the lock is taken, so two runs started at the same moment on the same
  folder cannot both pass it.

:func:`check_run_folder` is the read-only check made before anything is loaded;
:func:`acquire_run_folder` creates the folder and takes the lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import IO

from opd.io import write_error

__all__ = ["RunFolderError", "RunFolderLock", "acquire_run_folder", "check_run_folder"]

LOCK_NAME = ".lock"


class RunFolderError(ValueError):
    """The run folder cannot be used by this run (the message says why and what to do)."""


def _contents(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name != LOCK_NAME) if path.is_dir() else []


def _probe_creatable(path: Path) -> None:
    """Create ``path`` (and its missing parents) and remove them again: a folder that cannot be made
    (``/proc/x``, a read-only or full disk) is refused before anything is loaded. ``os.access`` cannot
    tell (it says yes to root, and knows nothing of full disks or pseudo file systems)."""
    missing = []
    for folder in [path, *path.parents]:
        if folder.exists():
            break
        missing.append(folder)
    try:
        path.mkdir(parents=True)
    except OSError as err:
        why = _why(err)
        if err.errno == errno.ENOENT:  # mkdir under an existing folder that takes no new entries (/proc, /sys)
            why = f"{folder} does not accept new folders"
        raise RunFolderError(f"logging.run_dir={path}: cannot create this folder ({why}); choose another "
                             "logging.run_dir") from None
    for folder in missing:
        try:
            folder.rmdir()
        except OSError:  # another process put something there meanwhile: it is theirs now
            break


def _why(err: OSError) -> str:
    """What an OSError means for a run folder, in words (its errno and text)."""
    return f"{err.strerror or err} [errno {err.errno}]" if err.errno else str(err)


def check_run_folder(path: Path, *, resume: bool, overwrite: bool) -> None:
    """Raise :class:`RunFolderError` when ``path`` cannot hold this run (nothing is left written)."""
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"logging.run_dir={path} is a file, not a folder; choose another logging.run_dir")
    if not resume and not path.exists():
        _probe_creatable(path)
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
        """Remove the lock file and unlock (in that order: a process that opened the file before the
        removal finds, once it holds the lock, that the path is gone and tries again)."""
        if self._handle is not None:
            (self.path / LOCK_NAME).unlink(missing_ok=True)
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            try:
                self._handle.close()
            except OSError:  # the holder's details could not be flushed (a full disk): the file is gone anyway
                pass
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
    created = not path.exists()
    lock_file = path / LOCK_NAME
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle = _lock(path, lock_file)
    except OSError as err:
        _remove_if_empty(path, created)
        raise write_error("the run folder's lock (logging.run_dir)", lock_file, err) from None
    lock = RunFolderLock(path, handle)
    try:
        check_run_folder(path, resume=resume, overwrite=overwrite)
        if overwrite and not resume:
            for name in _contents(path):
                target = path / name
                shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
            handle.flush()
        except OSError as err:  # a full disk at start: name the file, leave no lock behind
            raise write_error("the run folder's lock (logging.run_dir)", lock_file, err) from None
    except BaseException:
        lock.release()
        _remove_if_empty(path, created)
        raise
    return lock


def _lock(path: Path, lock_file: Path) -> IO[str]:
    """An open handle holding the exclusive lock on ``lock_file`` (the file the path names now: a lock
    taken on a file that a finishing run removed meanwhile is dropped and taken again)."""
    for _ in range(100):
        handle = open(lock_file, "a+", encoding="utf-8")  # noqa: SIM115 — held for the run's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise RunFolderError(f"the run folder {path} is in use by a live opd run ({_holder(lock_file)}); wait for "
                                 "it to finish or choose another logging.run_dir") from None
        except BaseException:
            handle.close()
            raise
        try:
            same = os.stat(lock_file).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return handle
        handle.close()
    raise RunFolderError(f"the run folder {path} keeps changing hands (its lock file is replaced while opd takes it); "
                         "choose another logging.run_dir")


def _remove_if_empty(path: Path, created: bool) -> None:
    """Remove the folder this run created when nothing is in it (a run that could not start)."""
    if created:
        try:
            path.rmdir()
        except OSError:
            pass
