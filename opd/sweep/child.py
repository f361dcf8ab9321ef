"""The process a sweep starts for each step of a run: ``python -m opd.sweep.child MODULE ARG ...``.

It asks the kernel to kill it when the sweep that started it dies (Linux ``prctl(PR_SET_PDEATHSIG)``),
so that a sweep killed with SIGKILL leaves no run behind writing into a folder the resumed sweep is
about to redo, then calls ``MODULE.main(args)``: ``opd.cli`` (``distill …``) or
``opd.sweep.posteval``.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

_ALLOWED = ("opd.cli", "opd.sweep.posteval")


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # pragma: no cover - no libc / prctl
        return


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in _ALLOWED:
        print(f"usage: python -m opd.sweep.child {{{'|'.join(_ALLOWED)}}} ARG ...", file=sys.stderr)
        return 2
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the sweep died before the signal was armed
        return 1
    return int(importlib.import_module(argv[0]).main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
