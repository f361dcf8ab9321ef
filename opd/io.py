"""Writing run files so that a crash, a kill or a full disk never leaves a torn file behind.

Every file a run writes whole (config, summary, run info, warnings, reports, checkpoints, the
final model) goes through a temporary sibling that is flushed to disk and then renamed over the
target (``os.replace`` is atomic on POSIX file systems): a reader sees the old file or the new
one, never half of one. Append-only logs (``metrics.jsonl``, ``events.jsonl``) cannot be written
that way; their readers drop a torn *last* line (what a kill mid-write leaves) and name the file
and line of any other damage.

A failed write raises :class:`WriteError`, an ``OSError`` whose message names what was being
written, where, and why (``No space left on device`` ...), and removes the temporary file.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["WriteError", "atomic_dir", "atomic_write_text", "read_jsonl_tolerant", "write_error", "write_json",
           "writer_failure"]


class WriteError(OSError):
    """A run file could not be written; the message says what, where and why."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28] " prefix
        return str(self.strerror)


class _WriterFailure(OSError):
    """A serializer's failure read as an ``OSError`` (:func:`writer_failure`); ``detail`` is its own error."""

    def __init__(self, code: int, text: str, detail: str):
        super().__init__(code, text)
        self.detail = detail


def _describe(err: OSError) -> str:
    if err.errno == errno.ENOSPC:
        return "no space left on the device" + (f" ({err.detail})" if isinstance(err, _WriterFailure) else "")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied (read-only folder?)"
    return err.strerror or str(err)


def write_error(what: str, path: Path, err: OSError) -> WriteError:
    """A :class:`WriteError` for ``what`` at ``path`` caused by ``err`` (keeps its errno)."""
    out = WriteError(err.errno or 0, f"could not write {what} to {path}: {_describe(err)}")
    out.__cause__ = err
    return out


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str, *, what: str = "a file") -> None:
    """Write ``text`` to ``path`` through ``path.tmp`` + fsync + rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise write_error(what, path, err) from err
    _fsync_dir(path.parent)


def _clean_json(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)  # JSON has no nan/inf; keep them visible
    if isinstance(x, dict):
        return {str(k): _clean_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean_json(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(path: str | Path, data: Any, *, what: str | None = None) -> None:
    """``data`` as indented JSON (NaN/inf written as strings), atomically."""
    atomic_write_text(path, json.dumps(_clean_json(data), indent=2) + "\n", what=what or Path(path).name)


#: below this many free bytes a writer's failure is taken for a full disk
_FULL_BELOW = 1 << 20


def _free_bytes(path: Path) -> int | None:
    """Free bytes (for this user) on the device holding ``path`` or its nearest existing parent."""
    for folder in [path, *path.parents]:
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def writer_failure(err: BaseException, path: Path) -> OSError:
    """The ``OSError`` behind a serializer's own exception (``torch.save`` raises ``RuntimeError:
    [enforce fail at inline_container.cc] unexpected pos`` on a full disk, safetensors its
    ``SafetensorError``): ``ENOSPC`` when the device holding ``path`` is full, else ``EIO``; the
    message keeps the original error's first line."""
    first = (str(err).strip().splitlines() or [""])[0][:160]
    detail = f"{type(err).__name__}: {first}" if first else type(err).__name__
    free = _free_bytes(path)
    if free is not None and free < _FULL_BELOW:
        return _WriterFailure(errno.ENOSPC, os.strerror(errno.ENOSPC), detail)
    room = "" if free is None else f"; {free / (1 << 20):.0f} MiB free on that device"
    return _WriterFailure(errno.EIO, f"the writer failed ({detail}{room})", detail)


@contextmanager
def atomic_dir(path: str | Path, *, what: str = "a folder",
               failures: tuple[type[BaseException], ...] = ()) -> Iterator[Path]:
    """Fill a folder atomically: yields ``path.tmp`` (empty); on success it replaces ``path``.

    On any error the temporary folder is removed and ``path`` is left as it was. An ``OSError``,
    or an exception of a type in ``failures`` (a serializer's own error for a failed write:
    :func:`writer_failure`), becomes a :class:`WriteError` naming ``what``.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            yield tmp
        except failures as err:
            raise writer_failure(err, tmp) from err
        if path.exists():  # replace: move the old one aside first, so a crash leaves one of the two
            if old.exists():
                shutil.rmtree(old)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            old.rename(path)
        raise write_error(what, path, err) from (err.__cause__ or err)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


def read_jsonl_tolerant(path: Path, *, on_torn_tail: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The records of a JSONL log. A torn *last* line (a kill mid-write) is dropped and reported
    through ``on_torn_tail``; damage anywhere else raises ``ValueError`` naming file and line."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if i == last:
                if on_torn_tail is not None:
                    on_torn_tail(f"{path}: dropped a torn last line ({len(line)} characters; a run killed while "
                                 "writing it)")
                break
            raise ValueError(f"{path}, line {i + 1}, is damaged ({err.msg}); it is not the last line, so this is "
                             "not an interrupted write: repair or remove that line") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {i + 1}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records
