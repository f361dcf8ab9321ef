"""opd.threads: the thread count from the CPUs actually available (affinity mask, cgroup quota), the
OpenMP spin default (set only when the user chose nothing, read by libgomp in the opd process and
its children), and exact resume with these defaults — even where fewer CPUs are available at resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import opd.threads as threads
from opd.cli import main as opd_main
from opd.metrics_log import read_metrics
from opd.threads import (DEFAULT_SPINCOUNT, available_cpus, cgroup_cpu_limit, choose_threads, openmp_defaults,
                         parse_cfs_quota, parse_cpu_max, set_openmp_defaults)

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------ cgroup quota
@pytest.mark.parametrize("text, cpus", [("max 100000\n", None), ("200000 100000\n", 2.0), ("150000 100000", 1.5),
                                        ("50000 100000", 0.5), ("300000", 3.0)])
def test_parse_cpu_max(text, cpus):
    assert parse_cpu_max(text) == cpus


@pytest.mark.parametrize("text", ["", "a b", "0 100000", "100000 0", "1 2 3"])
def test_parse_cpu_max_refuses_what_it_cannot_read(text):
    with pytest.raises(ValueError):
        parse_cpu_max(text)


def test_parse_cfs_quota():
    assert parse_cfs_quota("-1\n", "100000\n") is None
    assert parse_cfs_quota("250000", "100000") == 2.5
    with pytest.raises(ValueError):
        parse_cfs_quota("0", "100000")


def _cgroup_v2(root: Path, text: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cpu.max").write_text(text)
    return root


def _cgroup_v1(root: Path, quota: str, period: str = "100000", folder: str = "cpu") -> Path:
    (root / folder).mkdir(parents=True, exist_ok=True)
    (root / folder / "cpu.cfs_quota_us").write_text(quota + "\n")
    (root / folder / "cpu.cfs_period_us").write_text(period + "\n")
    return root


def test_cgroup_limit_reads_v2_then_v1_and_ignores_what_is_missing_or_garbled(tmp_path):
    assert cgroup_cpu_limit(_cgroup_v2(tmp_path / "v2", "300000 100000\n")) == 3.0
    assert cgroup_cpu_limit(_cgroup_v1(tmp_path / "v1", "150000")) == 1.5
    assert cgroup_cpu_limit(_cgroup_v1(tmp_path / "v1b", "400000", folder="cpu,cpuacct")) == 4.0
    assert cgroup_cpu_limit(_cgroup_v1(tmp_path / "v1none", "-1")) is None
    assert cgroup_cpu_limit(tmp_path / "absent") is None
    assert cgroup_cpu_limit(_cgroup_v2(tmp_path / "garbled", "lots\tof words here\n")) is None


# ------------------------------------------------------------------------------ thread count
@pytest.mark.parametrize("affinity, cgroup, expected", [
    (range(8), None, 8),                       # no quota: the affinity mask
    (range(8), "200000 100000", 2),            # docker --cpus=2 on an 8-CPU machine
    (range(8), "150000 100000", 1),            # 1.5 CPUs: rounded down
    (range(8), "50000 100000", 1),             # half a CPU: still one thread
    (range(2), "800000 100000", 2),            # taskset to 2 CPUs under a larger quota
    ({3, 5, 7}, "max 100000", 3),              # an affinity mask of 3 CPUs
])
def test_available_cpus_is_the_smaller_of_affinity_and_quota(tmp_path, monkeypatch, affinity, cgroup, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(affinity))
    root = _cgroup_v2(tmp_path, cgroup) if cgroup else tmp_path / "none"
    naive = len(set(affinity))
    if cgroup and not cgroup.startswith("max"):
        quota, period = (int(x) for x in cgroup.split())
        naive = max(1, min(naive, quota // period))
    assert available_cpus(root) == naive == expected


def test_choose_threads_prefers_the_setting_then_the_resumed_run_then_the_cpus(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    root = _cgroup_v2(tmp_path, "200000 100000")
    assert choose_threads(None, cgroup_root=root).threads == 2
    assert choose_threads(3, recorded=1, cgroup_root=root).threads == 3
    kept = choose_threads(None, recorded=1, cgroup_root=root)
    assert (kept.threads, kept.warning) == (1, None)
    more = choose_threads(None, recorded=4, cgroup_root=root)
    assert more.threads == 4 and "keeps its 4 CPU threads" in more.warning and "only 2 CPUs" in more.warning
    with pytest.raises(ValueError, match="train.threads must be >= 1"):
        choose_threads(0)
    assert kept.adaptive and more.adaptive and choose_threads(None, cgroup_root=root).adaptive
    assert not choose_threads(3, cgroup_root=root).adaptive


def test_omp_num_threads_fixes_the_count_as_torch_reads_it(tmp_path, monkeypatch):
    """A launcher (torchrun gives each process OMP_NUM_THREADS=1) or the user chose: that count, fixed
    (no adaptation); train.threads still wins; anything but a positive integer is ignored."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    root = _cgroup_v2(tmp_path, "max 100000")
    for value, want in [("1", (1, False)), (" 3 ", (3, False)), ("0", (4, True)), ("two", (4, True)),
                        ("", (4, True))]:
        got = choose_threads(None, recorded=None, cgroup_root=root, environ={"OMP_NUM_THREADS": value})
        assert (got.threads, got.adaptive) == want, value
    assert choose_threads(2, cgroup_root=root, environ={"OMP_NUM_THREADS": "1"}).threads == 2
    assert choose_threads(None, recorded=3, cgroup_root=root, environ={"OMP_NUM_THREADS": "1"}).threads == 1


# ------------------------------------------------------------------------------ OpenMP spin default
@pytest.mark.parametrize("environ, added", [
    ({}, {"GOMP_SPINCOUNT": str(DEFAULT_SPINCOUNT)}),
    ({"PATH": "/bin"}, {"GOMP_SPINCOUNT": str(DEFAULT_SPINCOUNT)}),
    ({"GOMP_SPINCOUNT": "300000"}, {}),
    ({"GOMP_SPINCOUNT": ""}, {}),               # set, even empty: the user's choice
    ({"OMP_WAIT_POLICY": "ACTIVE"}, {}),        # a wait policy implies its own spin count
])
def test_the_spin_default_is_added_only_when_the_user_chose_no_wait_policy(environ, added):
    before = dict(environ)
    assert openmp_defaults(environ) == added and environ == before  # pure
    target = dict(environ)
    assert set_openmp_defaults(target) == added
    assert target == {**before, **added}


def test_the_opd_command_sets_the_default_and_children_inherit_it(monkeypatch, capsys):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert opd_main(["methods"]) == 0
    capsys.readouterr()
    assert os.environ["GOMP_SPINCOUNT"] == str(DEFAULT_SPINCOUNT)
    child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('GOMP_SPINCOUNT'))"],
                           capture_output=True, text=True, check=True)  # e.g. a sweep's `opd distill` child
    assert child.stdout.strip() == str(DEFAULT_SPINCOUNT)
    monkeypatch.setenv("GOMP_SPINCOUNT", "777")
    assert opd_main(["methods"]) == 0
    assert os.environ["GOMP_SPINCOUNT"] == "777"


@pytest.mark.parametrize("user, shown", [({}, str(DEFAULT_SPINCOUNT)), ({"GOMP_SPINCOUNT": "777"}, "777")])
def test_libgomp_in_an_opd_process_runs_with_the_spin_count(user, shown):
    """OMP_DISPLAY_ENV makes libgomp print the values it read when torch loaded it: the opd process
    itself (torch is imported after the command line is read) runs with opd's default or the user's."""
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(user, OMP_DISPLAY_ENV="VERBOSE")
    proc = subprocess.run([sys.executable, "-m", "opd.cli", "bias-lab", "--vocab", "2", "--horizon", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if "OPENMP DISPLAY ENVIRONMENT" not in proc.stderr + proc.stdout:
        pytest.skip("this torch build's OpenMP runtime is not libgomp (no OMP_DISPLAY_ENV output)")
    assert f"GOMP_SPINCOUNT = '{shown}'" in proc.stderr + proc.stdout


# ------------------------------------------------------------------------------ exact resume
SMOKE = [
    "student.model=builtin:arith/smoke_student", "teacher.model=builtin:arith/smoke_teacher", "data.digits=2",
    "rollout.prompts_per_step=16", "eval.size=20", "eval.every=0", "logging.progress=false", "logging.report=false",
    "train.steps=4",  # no train.threads: the default choice is under test
]


def _train_records(run: Path) -> list[dict]:
    drop = {"time", "seconds", "tokens_per_s"}  # wall-clock fields differ between runs
    return [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(run, "train")]


def test_default_threads_resume_exactly_even_with_fewer_cpus_at_resume(tmp_path, monkeypatch, capsys):
    """Both runs start with the CPUs available (2 here); the resumed half sees only 1 CPU, keeps the
    2 threads its run started with (results depend on the count), says so, and ends exactly where
    the uninterrupted run ends."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cpus", lambda *a, **k: 2)
    # a quiet machine for the ThreadGovernor: on a busy one it would lower the count mid-run (by design)
    monkeypatch.setattr(threads, "read_cpu_sample", lambda: None)
    full, part = tmp_path / "full", tmp_path / "part"
    assert opd_main(["distill", *SMOKE, f"logging.run_dir={full}"]) == 0
    assert torch.get_num_threads() == 2
    assert opd_main(["distill", *SMOKE, f"logging.run_dir={part}", "train.stop_after=2"]) == 0
    assert json.loads((part / "run_info.json").read_text())["torch_threads"] == 2
    monkeypatch.setattr(threads, "available_cpus", lambda *a, **k: 1)
    torch.set_num_threads(1)
    capsys.readouterr()
    assert opd_main(["distill", "--resume", str(part)]) == 0
    assert torch.get_num_threads() == 2
    assert "keeps its 2 CPU threads" in capsys.readouterr().out
    assert _train_records(part) == _train_records(full)
    from safetensors.torch import load_file

    a, b = load_file(str(full / "final" / "model.safetensors")), load_file(str(part / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# adapting the thread count to other work (ThreadGovernor)
def test_parse_proc_stat_sums_the_busy_fields():
    line = "cpu  100 5 40 9000 7 3 2 11 0 0\ncpu0 50 2 20 4500 3 1 1 5 0 0\n"
    assert threads.parse_proc_stat(line) == 100 + 5 + 40 + 3 + 2 + 11  # idle and iowait are free
    for bad in ("cpu0 1 2 3 4 5 6 7 8\n", "cpu 1 2 3\n", ""):
        with pytest.raises(ValueError):
            threads.parse_proc_stat(bad)


def test_read_cpu_sample_reads_this_process():
    if not Path("/proc/self/stat").is_file():
        pytest.skip("needs Linux's /proc")
    first = threads.read_cpu_sample()
    end = time.process_time() + 0.3
    while time.process_time() < end:  # burn CPU time in this process: it is ours, not others'
        pass
    second = threads.read_cpu_sample()
    assert first is not None and second is not None
    assert second.own > first.own and second.busy >= first.busy and second.wall > first.wall


def test_others_cpus_is_busy_time_minus_our_own_per_second():
    a = threads.CpuSample(busy=1000, own=200, wall=10.0)
    b = threads.CpuSample(busy=1000 + 300, own=200 + 100, wall=11.0)  # 3 CPU-ticks... of 100 per s
    assert threads.others_cpus(a, b, ticks_per_s=100) == pytest.approx((300 - 100) / (100 * 1.0))
    assert threads.others_cpus(a, a, ticks_per_s=100) == 0.0  # no time passed
    c = threads.CpuSample(busy=1000 + 50, own=200 + 80, wall=12.0)  # counters raced: never negative
    assert threads.others_cpus(a, c, ticks_per_s=100) == 0.0


@pytest.mark.parametrize("ceiling", [1, 2, 3, 8])
def test_adapt_threads_keeps_one_thread_per_free_cpu(ceiling):
    for others in [0.0, 0.2, 0.49, 0.5, 0.51, 1.0, 1.4, 1.6, 2.5, 7.9, 40.0]:
        naive = ceiling - others  # free CPUs
        want = min(ceiling, max(1, int(naive + 0.5)))  # rounded half up, at least 1
        assert threads.adapt_threads(ceiling, others) == want, (ceiling, others)


def _fake_reader(samples):
    it = iter(samples)
    return lambda: next(it)


def test_governor_lowers_at_once_and_raises_after_two_agreeing_intervals():
    S = threads.CpuSample
    # 100 ticks per CPU-second; each interval is 2 s; our own process uses 150 ticks of each interval
    samples = [S(0, 0, 0.0),
               S(150 + 200, 150, 1.0),    # too early (interval 2 s): no decision
               S(150 + 200, 150, 2.0),    # others used 200 ticks over 2 s = 1.0 CPU -> 1 thread at once
               S(300 + 200, 300, 4.0),    # others 0 -> one vote to raise
               S(450 + 400, 450, 6.0),    # others 1.0 again: vote reset, stays 1
               S(600 + 400, 600, 8.0),    # others 0: first vote
               S(750 + 400, 750, 10.0)]   # others 0: second vote -> back to 2
    gov = threads.ThreadGovernor(2, read=_fake_reader(samples), ticks_per_s=100, interval_s=2.0)
    assert [gov.poll() for _ in range(6)] == [None, 1, None, None, None, 2]
    assert gov.threads == 2


def test_governor_is_off_when_the_user_fixed_the_count_or_there_is_one_cpu():
    calls = []
    reader = lambda: calls.append(1) or threads.CpuSample(0, 0, float(len(calls)) * 10)  # noqa: E731
    for gov in (threads.ThreadGovernor(2, enabled=False, read=reader),
                threads.ThreadGovernor(1, read=reader)):
        assert not gov.enabled and gov.poll() is None
    assert calls == []  # never even read the counters
    assert not threads.ThreadGovernor(4, read=lambda: None).enabled  # no /proc: off


def test_a_run_beside_a_busy_process_drops_to_one_thread_and_logs_it(tmp_path, monkeypatch):
    """The loop applies the governor's decision and records it (kind "threads") — with the CPU counters
    replaced by a neighbour that keeps one of two CPUs busy."""
    S = threads.CpuSample
    clock = iter(range(10_000))

    def busy_neighbour():  # every call: 3 s later, others used 3 s of one CPU (100 ticks per second)
        t = next(clock)
        return S(busy=300 * t, own=0, wall=3.0 * t)

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "read_cpu_sample", busy_neighbour)
    monkeypatch.setattr(threads.os, "sysconf", lambda name: 100, raising=False)
    monkeypatch.setattr(threads, "available_cpus", lambda cgroup_root=None: 2)
    from opd.config import load_config
    from opd.train import distill

    run = tmp_path / "run"
    cfg = load_config(None, [*SMOKE, "train.steps=3", f"logging.run_dir={run}"])
    distill(cfg)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    changes = [r for r in records if r.get("kind") == "threads"]
    assert changes and changes[0]["threads"] == 1 and changes[0]["others_cpus"] == pytest.approx(1.0)
    assert torch.get_num_threads() == 1
    with_overlap = tmp_path / "overlap"  # a sampler thread runs beside training: the count is never changed
    distill(load_config(None, [*SMOKE, "train.steps=3", "rollout.overlap=true", f"logging.run_dir={with_overlap}"]))
    assert not [line for line in (with_overlap / "metrics.jsonl").read_text().splitlines() if '"threads"' in line]


def test_the_governor_never_runs_beside_a_sampler_thread():
    """``rollout.overlap`` (a sampler thread computes while the count would change) keeps the count fixed; a
    user's ``train.threads`` always does. An in-process vLLM engine adapts (tests/test_vllm_threads.py)."""
    assert threads.may_adapt_threads(True, overlap=False)
    assert not threads.may_adapt_threads(True, overlap=True)
    assert not threads.may_adapt_threads(False, overlap=False)
