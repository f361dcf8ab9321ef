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

* **Adapting to other work** (:class:`ThreadGovernor`). No spin count keeps both the speed of a run
  alone and its fair share beside another: measured on 2 quiet cores (``bench/contention.py``), 30
  demo steps took 2.7 s alone with 2 threads and a 10⁴ spin, but two such runs at once took 17 s each
  (6.5×); a 10³ spin, ``OMP_WAIT_POLICY=PASSIVE`` or 1 thread keep two runs near 4.2 s each but cost
  1.4–1.5× alone. So a run whose ``train.threads`` is unset measures, every couple of seconds, how
  many CPUs *other* processes used (``/proc/stat`` minus this process's own time) and runs on the
  CPUs left free (:func:`adapt_threads`): one thread per free CPU, at least 1, at most
  :func:`available_cpus` — no barrier then waits for a descheduled partner. A change of count is
  recorded in ``metrics.jsonl`` (kind ``threads``).

This module imports nothing heavy at the top: the ``opd`` command calls it before torch is loaded.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CGROUP_ROOT", "DEFAULT_SPINCOUNT", "CpuSample", "ThreadChoice", "ThreadGovernor", "adapt_threads",
    "apply_threads", "available_cpus", "choose_threads", "cgroup_cpu_limit", "openmp_defaults", "others_cpus",
    "parse_cfs_quota", "parse_cpu_max", "parse_proc_stat", "read_cpu_sample", "set_openmp_defaults",
]

#: libgomp spin iterations before a waiting thread sleeps (libgomp's own default is 300000).
#: Measured with bench/contention.py: keeps the speed of a run alone on its cores; beside other work
#: it helps little (two demo runs at once: 6.5× alone vs 8.3× with libgomp's spin) — there the
#: ThreadGovernor's fewer threads do the work.
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
    adaptive: bool = False  # nobody fixed the count: the ThreadGovernor may follow other work


def _env_threads(environ: Mapping[str, str]) -> int | None:
    """``OMP_NUM_THREADS`` when it holds one positive integer (as torch reads it), else None."""
    try:
        value = int(environ.get("OMP_NUM_THREADS", "").strip())
    except ValueError:
        return None
    return value if value >= 1 else None


def choose_threads(requested: int | None, *, recorded: int | None = None,
                   cgroup_root: Path = CGROUP_ROOT, environ: Mapping[str, str] | None = None) -> ThreadChoice:
    """The thread count of a run: ``train.threads`` when set; else ``OMP_NUM_THREADS`` when set (by
    the user, or by a launcher such as ``torchrun``, which gives each process 1); else, on resume,
    the count the run used so far (``recorded``: results depend on it, and a resumed run must
    continue exactly); else :func:`available_cpus`. Only the last two may adapt to other work."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"train.threads must be >= 1, got {requested}; leave it unset to use the CPUs available")
        return ThreadChoice(requested, "train.threads")
    from_env = _env_threads(os.environ if environ is None else environ)
    if from_env is not None:
        return ThreadChoice(from_env, "OMP_NUM_THREADS")
    available = available_cpus(cgroup_root)
    if recorded is not None and recorded >= 1:
        warning = None if recorded <= available else (
            f"the resumed run keeps its {recorded} CPU threads (results depend on the count) although only "
            f"{available} CPUs are available now; train.threads in the run's config.yaml overrides this (faster, no "
            "longer an exact continuation)")
        return ThreadChoice(recorded, "kept from the run being resumed", warning, adaptive=True)
    return ThreadChoice(available, "CPUs available to this process (affinity mask and cgroup quota)", adaptive=True)


def apply_threads(threads: int) -> None:
    """Set torch's intra-op thread count in the calling thread (imports torch).

    Calls torch's own setter, ``torch._C.set_num_threads``: vLLM's CPU worker replaces
    ``torch.set_num_threads`` with a function that only warns, once an in-process engine has started.
    The count changes between training steps, in the thread that also calls the engine, and vLLM's CPU
    attention reads it afresh at every model call (its scheduler metadata records the count and the
    kernel checks it in the same call), so a change between steps is safe
    (``tests/test_vllm_threads.py``).
    """
    import torch

    if torch.get_num_threads() != threads:
        torch._C.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# adapting to other work on the same CPUs
@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU time, in clock ticks: ``busy`` over all CPUs (``/proc/stat``), ``own`` of this
    process (all its threads, ``/proc/self/stat``), at wall time ``wall`` (seconds)."""

    busy: int
    own: int
    wall: float


def parse_proc_stat(text: str) -> int:
    """Busy ticks of all CPUs from ``/proc/stat``'s first line ``cpu user nice system idle iowait irq
    softirq steal ...``: user + nice + system + irq + softirq + steal (steal: time the hypervisor gave
    to another guest — those CPUs were not free either). Raises ValueError on anything else."""
    fields = text.split("\n", 1)[0].split()
    if len(fields) < 9 or fields[0] != "cpu":
        raise ValueError(f"/proc/stat should start with an aggregate 'cpu' line, got {fields[:3]}")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return user + nice + system + irq + softirq + steal


def read_cpu_sample() -> CpuSample | None:
    """The current :class:`CpuSample`, or None where ``/proc`` cannot be read (not Linux)."""
    try:
        busy = parse_proc_stat(Path("/proc/stat").read_text())
        own_fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        own = int(own_fields[11]) + int(own_fields[12])  # utime, stime: fields 14 and 15 of proc(5)
    except (OSError, ValueError, IndexError):
        return None
    return CpuSample(busy, own, time.monotonic())


def others_cpus(before: CpuSample, after: CpuSample, ticks_per_s: float) -> float:
    """CPUs that other processes kept busy between two samples: ``(Δbusy − Δown) / (ticks/s · Δwall)``,
    at least 0."""
    wall = after.wall - before.wall
    if wall <= 0:
        return 0.0
    return max(0.0, ((after.busy - before.busy) - (after.own - before.own)) / (ticks_per_s * wall))


def adapt_threads(ceiling: int, others: float) -> int:
    """Threads for the next interval: one per CPU that other work leaves free,
    ``clamp(round(ceiling − others), 1, ceiling)`` (halves round up). Pure; hysteresis is the caller's
    (:class:`ThreadGovernor` raises the count only after two intervals agree)."""
    return max(1, min(ceiling, int(math.floor(ceiling - others + 0.5))))


def may_adapt_threads(adaptive: bool, *, overlap: bool) -> bool:
    """Whether a run's :class:`ThreadGovernor` may change torch's thread count: the count was chosen by opd
    (``adaptive``, not ``train.threads``), and nothing else computes while it changes — not with
    ``rollout.overlap`` (the sampler thread would compute during the change, and vLLM's CPU attention,
    called from that thread, checks that the count it planned with is the count it runs with:
    ``thread_num == thread_num``). An in-process vLLM engine without overlap is called from the
    training thread between changes, so it adapts like the ``hf`` engine (:func:`apply_threads`)."""
    return adaptive and not overlap


class ThreadGovernor:
    """Adapts torch's thread count to the CPUs that other processes leave free (module docstring).

    ``poll()`` is called after every step; at most every ``interval_s`` seconds it reads the CPU
    counters and returns the new thread count when it changes (None otherwise). Lowering is
    immediate; raising waits for a second interval that agrees, so a short lull does not bring back
    the spinning partner thread. Disabled (``enabled=False``: ``train.threads`` set by the user, or
    no ``/proc``), it never changes anything.
    """

    def __init__(self, ceiling: int, *, enabled: bool = True, interval_s: float = 2.0,
                 read: Callable[[], CpuSample | None] | None = None, ticks_per_s: float | None = None):
        self.ceiling = self.threads = max(1, ceiling)
        self.interval_s, self._read = interval_s, read or read_cpu_sample
        self.ticks_per_s = ticks_per_s or float(os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)
        self._last = self._read() if enabled and ceiling > 1 else None
        self.enabled = self._last is not None
        self._raise_votes = 0
        self.others = 0.0  # CPUs other processes used in the last interval

    def poll(self) -> int | None:
        if not self.enabled:
            return None
        now = self._read()
        if now is None or self._last is None or now.wall - self._last.wall < self.interval_s:
            return None
        self.others = others_cpus(self._last, now, self.ticks_per_s)
        self._last = now
        target = adapt_threads(self.ceiling, self.others)
        if target > self.threads:
            self._raise_votes += 1
            if self._raise_votes < 2:
                return None
        self._raise_votes = 0
        if target == self.threads:
            return None
        self.threads = target
        return target
