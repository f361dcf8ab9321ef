"""The doctor's "would fire" predictions against the detectors of real 50-step runs (a few pairs; the
whole table is bench/doctor_agreement.py, quoted in docs/doctor.md)."""

from __future__ import annotations

import pytest

from opd.doctor.agreement import PAIRS, check_pair, fired_detectors


@pytest.mark.parametrize("name", ["demo", "bad: few new tokens", "bad: hot teacher"])
def test_predictions_agree_with_a_real_50_step_run(name):
    result = check_pair(name, PAIRS[name][1], steps=50, extra=["train.threads=1"])
    # the bad-on-purpose configurations trip a detector in the real run: the comparison is not vacuous
    if name != "demo":
        assert result.fired, f"{name}: the real run fired nothing"
    assert result.predicted == result.fired, (name, result.verdict)
    assert result.agreements == len(result.detectors) == 6


def test_fired_detectors_reads_the_statistical_detectors_of_events_jsonl(tmp_path):
    assert fired_detectors(tmp_path) == set()
    (tmp_path / "events.jsonl").write_text('{"detector": "length", "step": 10}\n{"detector": "nonfinite", "step": 3}\n'
                                           '{"detector": "reward_sign", "step": 12}\n')
    assert fired_detectors(tmp_path) == {"length", "reward_sign"}
