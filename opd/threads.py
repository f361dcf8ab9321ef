"""Where torch's CPU threads are chosen, and how they wait: opd's defaults for a shared machine.

Two decisions, both made before any work runs:

* **How OpenMP threads wait.** The torch CPU wheel runs its parallel regions on GNU OpenMP
  (libgomp). Between regions a libgomp worker spins (by default about 3·10⁵ iterations) before it
  sleeps, so that the next region starts without a wake-up. On cores shared with other work (a
  second run, a sweep, a served teacher, a notebook) the partner a thread spins for has been
  descheduled: every one of the thousands of small kernels of a step then ends in a scheduler
  wait, and two demo runs on 2 cores took 18× the time of one. :func:`set_openmp_defaults` puts a
  short spin (``GOMP_SPINCOUNT`` = :data:`DEFAULT_SPINCOUNT`) into the environment, unless the
  user chose a wait policy (``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` set). libgomp reads these
  variables once, when it is loaded (``import torch``), so the ``opd`` command calls this before
  anything imports torch; child processes (sweep runs, ``accelerate launch`` workers, a teacher
  server started from a script) inherit the environment. The spin count changes *when* a thread
  sleeps, never what it computes: results do not depend on it.
* **How many threads.** :func:`available_cpus` counts the CPUs this process may actually use —
  its affinity mask (``os.sched_getaffinity``: ``taskset``, ``docker --cpuset-cpus``, Slurm) and the
  cgroup CPU quota (``docker --cpus``, Kubernetes limits: ``cpu.max`` in cgroup v2,
  ``cpu.cfs_quota_us / cpu.cfs_period_us`` in v1), rounded down, at least 1 — rather than the
  machine's count. The thread count *does* change results (floating-point reductions are split
  differently), so a resumed run keeps the count of the run it continues (:func:`choose_threads`).

This module imports nothing heavy at the top: the ``opd`` command calls it before torch is loaded.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CGROUP_ROOT", "DEFAULT_SPINCOUNT", "ThreadChoice", "apply_threads", "available_cpus", "choose_threads",
    "cgroup_cpu_limit", "openmp_defaults", "parse_cfs_quota", "parse_cpu_max", "set_openmp_defaults",
]

#: libgomp spin iterations before a waiting thread sleeps (libgomp's own default is 300000).
#: Measured with bench/contention.py: keeps the speed of a run alone on its cores and removes the
#: collapse when the cores are shared.
DEFAULT_SPINCOUNT = 10_000

#: Where the cgroup file system is mounted (v2: ``cpu.max`` at the top; v1: ``cpu/cpu.cfs_*``).
CGROUP_ROOT = Path("/sys/fs/cgroup")

#: Variables by which a user chooses how OpenMP threads wait; any of them set means "leave it alone".
_WAIT_VARIABLES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


# ---------------------------------------------------------------------------------------------
# how threads wait
def openmp_defaults(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables opd would add to ``environ``: ``{"GOMP_SPINCOUNT": "10000"}``, or ``{}`` when
    the user already chose a wait policy (``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` present, even
    empty). Pure: ``environ`` is not changed."""
    if any(name in environ for name in _WAIT_VARIABLES):
        return {}
    return {"GOMP_SPINCOUNT": str(DEFAULT_SPINCOUNT)}


def set_openmp_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Add :func:`openmp_defaults` to ``environ`` (default ``os.environ``) and return what was added.

    Effective for this process only if torch (libgomp) is not loaded yet; always effective for the
    child processes started afterwards, which inherit the environment.
    """
    target = os.environ if environ is None else environ
    added = openmp_defaults(target)
    target.update(added)
    return added


# ---------------------------------------------------------------------------------------------
# how many threads
def parse_cpu_max(text: str) -> float | None:
    """CPUs allowed by a cgroup-v2 ``cpu.max`` line ``"<quota> <period>"``: quota / period, or None
    for ``"max ..."`` (no limit). Raises ValueError on anything else."""
    fields = text.split()
    if len(fields) not in (1, 2):
        raise ValueError(f"cpu.max should read '<quota> <period>', got {text!r}")
    if fields[0] == "max":
        return None
    period = int(fields[1]) if len(fields) == 2 else 100_000
    quota = int(fields[0])
    if quota <= 0 or period <= 0:
        raise ValueError(f"cpu.max should hold positive numbers, got {text!r}")
    return quota / period


def parse_cfs_quota(quota: str, period: str) -> float | None:
    """CPUs allowed by cgroup-v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; None when the quota
    is -1 (no limit). Raises ValueError on anything else."""
    q, p = int(quota.strip()), int(period.strip())
    if q < 0:
        return None
    if q == 0 or p <= 0:
        raise ValueError(f"cpu.cfs_quota_us / cpu.cfs_period_us should be positive, got {q} / {p}")
    return q / p


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (may be fractional), or None when there is no
    quota or it cannot be read (no cgroup file system, another OS): the limit is then the affinity
    mask alone."""
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            return parse_cpu_max(v2.read_text())
        for folder in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
            quota, period = root / folder / "cpu.cfs_quota_us", root / folder / "cpu.cfs_period_us"
            if quota.is_file() and period.is_file():
                return parse_cfs_quota(quota.read_text(), period.read_text())
    except (OSError, ValueError):  # unreadable or unexpected: no quota known, never a reason to fail a run
        return None
    return None


def available_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: ``min(|affinity mask|, floor(cgroup quota))``, at least 1.

    The quota is rounded down: with 1.5 CPUs of quota a second spinning thread would be throttled
    by the kernel for the rest of every period.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_root)
    if limit is not None:
        cpus = min(cpus, math.floor(limit))
    return max(1, cpus)


@dataclass(frozen=True)
class ThreadChoice:
    """The number of torch CPU threads for a run and why (one line, for the log)."""

    threads: int
    reason: str
    warning: str | None = None  # a resumed run keeps more threads than this machine now offers


def choose_threads(requested: int | None, *, recorded: int | None = None,
                   cgroup_root: Path = CGROUP_ROOT) -> ThreadChoice:
    """The thread count of a run: ``train.threads`` when set; else, on resume, the count the run
    used so far (``recorded``: results depend on it, and a resumed run must continue exactly);
    else :func:`available_cpus`."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"train.threads must be >= 1, got {requested}; leave it unset to use the CPUs available")
        return ThreadChoice(requested, "train.threads")
    available = available_cpus(cgroup_root)
    if recorded is not None and recorded >= 1:
        warning = None if recorded <= available else (
            f"the resumed run keeps its {recorded} CPU threads (results depend on the count) although only "
            f"{available} CPUs are available now; train.threads in the run's config.yaml overrides this (faster, no "
            "longer an exact continuation)")
        return ThreadChoice(recorded, "kept from the run being resumed", warning)
    return ThreadChoice(available, "CPUs available to this process (affinity mask and cgroup quota)")


def apply_threads(threads: int) -> None:
    """Set torch's intra-op thread count (imports torch)."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
