"""Checking the doctor against reality: its "would fire" predictions vs the detectors of a real run.

:data:`PAIRS` are the built-in pairs and configurations built with bad settings on purpose;
:func:`check_pair` runs ``opd doctor`` and a real ``steps``-step ``opd distill`` of the same
config and compares, detector by detector, what the doctor predicted with what the run's monitor
reported (``events.jsonl``). ``bench/doctor_agreement.py`` prints the table over all pairs;
the tests run a few.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from opd.config.load import load_config
from opd.doctor.run import run_doctor
from opd.monitor import DETECTORS

__all__ = ["PAIRS", "PairResult", "check_pair", "fired_detectors"]

_CHAT = ["data.task=arith_chat", "student.model=builtin:arith_chat/student", "teacher.model=builtin:arith_chat/teacher"]

#: name → (what it is, overrides of the default config).
PAIRS: dict[str, tuple[str, list[str]]] = {
    "demo": ("the arith demo (opd distill's default)", []),
    **{case: (f"case task {case}", [f"data.task={case}", f"student.model=builtin:{case}/student",
                                    f"teacher.model=builtin:{case}/teacher"])
       for case in ("fork", "route", "modes", "long")},
    "chat": ("the chat pair", list(_CHAT)),
    "cross-tokenizer": ("the teacher with its own BPE tokenizer",
                        ["teacher.model=builtin:arith_bpe/teacher", "teacher.tokenizer=own",
                         "support.kind=teacher_topk"]),
    "bad: few new tokens": ("rollout.max_new_tokens=3: answers need 4-5 tokens", ["rollout.max_new_tokens=3"]),
    "bad: hot teacher": ("teacher.temperature=3.0: a teacher at the wrong temperature", ["teacher.temperature=3.0"]),
    "bad: cold teacher": ("teacher.temperature=0.3", ["teacher.temperature=0.3"]),
    "bad: huge learning rate": ("train.lr=0.05 (the demo uses 3e-4)", ["train.lr=0.05"]),
    "bad: mismatched template": ("the chat pair with a teacher-only system prompt the teacher never saw",
                                 [*_CHAT, "teacher.use_context=true", "teacher.system_prompt=12+34=46"]),
}

#: Settings of the real runs (short, quiet, nothing but the monitor's events needed).
RUN_SETTINGS = ["eval.every=0", "eval.size=32", "eval.teacher=false", "logging.report=false",
                "logging.progress=false", "logging.overwrite=true"]


@dataclass(frozen=True)
class PairResult:
    name: str
    predicted: frozenset[str]
    fired: frozenset[str]
    detectors: tuple[str, ...]
    verdict: str

    @property
    def agreements(self) -> int:
        return sum((d in self.predicted) == (d in self.fired) for d in self.detectors)


def fired_detectors(run_dir: Path) -> set[str]:
    """The statistical detectors the run's monitor reported (``events.jsonl``)."""
    path = Path(run_dir) / "events.jsonl"
    if not path.exists():
        return set()
    names = {json.loads(line)["detector"] for line in path.read_text().splitlines() if line.strip()}
    return names & set(DETECTORS)


def check_pair(name: str, overrides: list[str], *, steps: int = 50, extra: list[str] = ()) -> PairResult:
    """Doctor and a real ``steps``-step run of the default config with ``overrides`` (+ ``extra``)."""
    from opd.train import distill

    cfg = load_config(None, [*overrides, f"train.steps={steps}", *extra])
    result = run_doctor(cfg, progress=False)
    with tempfile.TemporaryDirectory(prefix="opd-agreement-") as tmp:
        run_cfg = load_config(None, [*overrides, f"train.steps={steps}", *extra, *RUN_SETTINGS,
                                     f"logging.run_dir={tmp}/run"])
        distill(run_cfg)
        fired = fired_detectors(Path(tmp) / "run")
    judged = tuple(p.detector for p in result.predictions)
    return PairResult(name, frozenset(p.detector for p in result.firing), frozenset(fired), judged, result.verdict())
