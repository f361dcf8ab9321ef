"""CONTRIBUTING.md, "Adding a rollout engine", followed step by step with a toy engine.

Step 1 is the module below, written to a folder on ``sys.path`` (a module under ``opd/rollout/`` in
the walk-through); step 2 is the one entry in ``opd.config.engines.ENGINES``. Nothing else is touched:
the run selects the engine through the config (``rollout.engine=toy``) and trains with it. The toy
engine wraps the hf engine, so its run must match an hf run exactly — and every call the loop makes
on it is counted, so the test fails when the loop needs anything the walk-through does not ask for,
or when the table is not what selects an engine.
"""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest

from opd.config import ConfigError, load_config
from opd.rollout.engine import RolloutEngine
from opd.config.engines import ENGINE_NAMES, ENGINES
from opd.train import distill

SMOKE = [
    "student.model=builtin:arith/smoke_student", "teacher.model=builtin:arith/smoke_teacher", "data.digits=2",
    "rollout.prompts_per_step=8", "eval.size=8", "eval.every=0", "eval.teacher=false", "train.threads=1",
    "train.steps=3", "logging.progress=false", "logging.report=false",
]

# step 1 of the walk-through: the engine's module — a class with every member of RolloutEngine, and build()
TOY_ENGINE = textwrap.dedent('''
    from opd.rollout.engine import HFEngine

    CALLS = []


    class ToyEngine:
        """Samples as the hf engine does, counting the loop's calls."""

        name = "toy"

        def __init__(self, student, tokenizer, own_copy):
            self.inner = HFEngine(student, tokenizer, own_copy=own_copy)

        @property
        def sampling_module(self):
            return self.inner.sampling_module

        def generate(self, examples, sampling, *, group_offset=0):
            CALLS.append("generate")
            return self.inner.generate(examples, sampling, group_offset=group_offset)

        def sync_weights(self, model):
            CALLS.append("sync_weights")
            self.inner.sync_weights(model)

        def close(self):
            CALLS.append("close")
            self.inner.close()


    def build(cfg, student, tokenizer):
        return ToyEngine(student, tokenizer, own_copy=cfg.rollout.overlap)
''')


@pytest.fixture
def toy_engine(tmp_path, monkeypatch):
    """The toy engine added as the walk-through says; the module, for its call log."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "toy_rollout_engine.py").write_text(TOY_ENGINE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setitem(ENGINES, "toy", "toy_rollout_engine:build")  # step 2: one entry in the table
    module = importlib.import_module("toy_rollout_engine")
    module.CALLS.clear()
    yield module
    sys.modules.pop("toy_rollout_engine", None)


def _losses(summary) -> list[float]:
    return [h["loss"] for h in summary.history]


@pytest.mark.parametrize("overlap", [False, True])
def test_toy_engine_trains_through_the_config(tmp_path, toy_engine, overlap):
    assert "toy" in ENGINE_NAMES  # the config's choices are the table's keys
    flags = [f"rollout.overlap={str(overlap).lower()}"]
    toy = distill(load_config(None, [*SMOKE, *flags, "rollout.engine=toy", f"logging.run_dir={tmp_path / 'toy'}"]))
    assert toy.status == "done" and toy.steps_done == 3
    calls = toy_engine.CALLS
    assert calls.count("generate") == 3  # one batch per step, sampled by the toy engine
    assert "sync_weights" in calls and calls[-1] == "close"  # weights pushed; released at the end
    ref = distill(load_config(None, [*SMOKE, *flags, "rollout.engine=hf", f"logging.run_dir={tmp_path / 'hf'}"]))
    assert _losses(toy) == _losses(ref)  # it samples what the hf engine samples: the same run


def test_toy_engine_satisfies_the_protocol(toy_engine):
    cfg = load_config(None, [*SMOKE, "rollout.engine=toy"])
    from opd.factories import build_student
    from opd.rollout.engine import build_engine

    student, tokenizer = build_student(cfg, "cpu")
    engine = build_engine(cfg, student, tokenizer)
    assert type(engine).__name__ == "ToyEngine" and isinstance(engine, RolloutEngine)
    assert engine.sampling_module is student


def test_an_engine_missing_from_the_table_is_refused():
    with pytest.raises(ConfigError, match="rollout.engine='toy' is not one of: hf, vllm"):
        load_config(None, [*SMOKE, "rollout.engine=toy"])
