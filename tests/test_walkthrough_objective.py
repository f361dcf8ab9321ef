"""The walk-throughs of CONTRIBUTING.md ("Adding a divergence", "Adding a credit estimator", "Adding a
preset"), done with toy entries: each is registered exactly as the walk-through says, accepted by the
config at once, trained with for one real step through ``opd.train.distill``, checked against a value
computed here, and removed afterwards (the fixtures), after which the config refuses it again.

Runs use the shipped smoke checkpoints (2-digit arith) with one torch thread.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import opd.train as train
from opd.config import load_config
from opd.config.docs import format_methods
from opd.config.fields import ConfigError
from opd.config.presets import PRESETS, collect_presets, estimators
from opd.config.presets.base import Preset, route1_values
from opd.math.credit import CREDIT_ESTIMATORS, CreditEstimator, discounted_returns
from opd.math.divergences import DIVERGENCES, reverse_kl

SMOKE = [
    "student.model=builtin:arith/smoke_student", "teacher.model=builtin:arith/smoke_teacher", "data.digits=2",
    "rollout.prompts_per_step=16", "eval.size=8", "eval.every=0", "eval.teacher=false", "train.threads=1",
    "logging.progress=false", "logging.report=false", "train.steps=1",
]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def first_step(tmp_path, name: str, *overrides: str) -> dict[str, float]:
    """The metrics of step 0 of a one-step distill() on the smoke checkpoints."""
    cfg = load_config(None, [*SMOKE, f"logging.run_dir={tmp_path / name}", *overrides])
    return train.distill(cfg).history[0]


# ------------------------------------------------------------------------------------- a divergence
@pytest.fixture
def scaled_rkl():
    """"Adding a divergence", step 1 from another module: one entry in DIVERGENCES."""
    calls = []

    def twice_rkl(student_logp, teacher_logp, valid=None, **knobs):
        calls.append(student_logp.shape)
        return 2.0 * reverse_kl(student_logp, teacher_logp, valid)

    DIVERGENCES.register("scaled_rkl", twice_rkl)
    yield calls
    DIVERGENCES.unregister("scaled_rkl")


def test_a_registered_divergence_trains_on_the_dense_and_the_chunked_path(tmp_path, scaled_rkl):
    plain = first_step(tmp_path, "rkl", "route1.divergence=rkl", "teacher.access=full")
    dense = first_step(tmp_path, "toy_dense", "route1.divergence=scaled_rkl", "teacher.access=full")
    assert scaled_rkl, "the objective did not call the registered divergence"
    chunked = first_step(tmp_path, "toy_chunked", "route1.divergence=scaled_rkl", "teacher.access=full",
                         "route1.chunk_size=8")
    # the same seed samples the same rollouts: the first loss is twice reverse KL's, on either path
    for got in (dense, chunked):
        assert got["loss/route1"] == pytest.approx(2.0 * plain["loss/route1"], rel=1e-4)
    assert math.isfinite(chunked["grad_norm"]) and chunked["grad_norm"] > 0
    # also as the off-policy rows' divergence (route1.off_policy_divergence reads the same registry)
    load_config(None, [*SMOKE, "route1.off_policy_divergence=scaled_rkl"])


def test_the_config_refuses_a_divergence_once_unregistered():
    DIVERGENCES.register("scaled_rkl_once", lambda s, t, valid=None, **knobs: reverse_kl(s, t, valid))
    assert "scaled_rkl_once" in load_config(None, ["route1.divergence=scaled_rkl_once"]).route1.divergence
    DIVERGENCES.unregister("scaled_rkl_once")
    with pytest.raises(ConfigError, match="scaled_rkl_once"):
        load_config(None, ["route1.divergence=scaled_rkl_once"])
    with pytest.raises(ValueError, match="already registered"):
        DIVERGENCES.register("rkl", reverse_kl)


# ------------------------------------------------------------------------------- a credit estimator
@pytest.fixture
def half_immediate():
    """"Adding a credit estimator", step 1 from another module: one entry in CREDIT_ESTIMATORS."""
    CREDIT_ESTIMATORS.register("half_immediate", CreditEstimator(
        lambda rewards_BT, mask_BT, values_BT, params: 0.5 * discounted_returns(rewards_BT, mask_BT, 0.0)))
    yield
    CREDIT_ESTIMATORS.unregister("half_immediate")


def test_a_registered_credit_estimator_trains(tmp_path, half_immediate):
    got = first_step(tmp_path, "credit", "route1.divergence=none", "route2.coef=1", "route2.credit=half_immediate")
    # A_t = r_t / 2 on every token: the advantage statistics are half the reward's, and the on-policy
    # surrogate's value (ρ = 1) is −mean_t A_t
    assert got["diag/advantage_mean"] == pytest.approx(0.5 * got["diag/reward"], rel=1e-5)
    assert got["diag/advantage_std"] == pytest.approx(0.5 * got["diag/reward_std"], rel=1e-5)
    assert got["loss/route2"] == pytest.approx(-0.5 * got["diag/reward"], rel=1e-4)
    # with a baseline: the registry's rule composes with the registered baselines
    load_config(None, [*SMOKE, "route2.coef=1", "route2.credit=half_immediate", "route2.baseline=batch_mean"])


def test_the_config_refuses_an_unregistered_credit_estimator():
    with pytest.raises(ConfigError, match="half_immediate"):
        load_config(None, ["route2.credit=half_immediate"])


# ------------------------------------------------------------------------------------------ a preset
TOY = Preset(
    name="toy-fkl",
    summary="A toy preset: full-vocabulary forward KL on the student's samples.",
    citation="tests/test_walkthrough_objective.py",
    formula="L = mean_t KL(π_T ‖ π_S)(s_t)",
    values=route1_values({"divergence": "fkl", "coef": 1.0}),
)


@pytest.fixture
def toy_preset(monkeypatch):
    """"Adding a preset", step 1: the preset appended to a family module's PRESETS tuple; the package
    gathers it (collect_presets) into PRESETS."""
    monkeypatch.setattr(estimators, "PRESETS", (*estimators.PRESETS, TOY))
    collected = collect_presets()
    assert [n for n in collected if n != TOY.name] == list(PRESETS)  # the shipped ones keep their order
    monkeypatch.setitem(PRESETS, TOY.name, collected[TOY.name])
    return collected


def test_a_preset_added_to_a_family_resolves_and_trains(tmp_path, toy_preset):
    assert toy_preset[TOY.name] is TOY
    cfg = load_config(None, [*SMOKE, f"method={TOY.name}"])
    assert (cfg.method, cfg.route1.divergence, cfg.teacher.access, cfg.route2.coef) == (TOY.name, "fkl", "full", 0.0)
    assert f"{TOY.name}\n" in format_methods()  # `opd methods` lists it
    got = first_step(tmp_path, "preset", f"method={TOY.name}")
    assert "loss/route1" in got and "loss/route2" not in got and math.isfinite(got["loss"])


def test_a_preset_name_used_twice_is_refused(monkeypatch):
    monkeypatch.setattr(estimators, "PRESETS", (*estimators.PRESETS, replace(TOY, name="gkd")))
    with pytest.raises(ValueError, match="'gkd' is defined twice"):
        collect_presets()
