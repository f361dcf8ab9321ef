"""The case-study tasks (opd/tasks/cases.py): answers and verifiers against hand-written references,
held-out sets, config checks, the shipped checkpoints' design properties (re-measured on a slice of
the held-out set), and one `opd distill` + sampled evaluation on a case."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from opd.config.load import load_config
from opd.tasks import TASKS, make_task
from opd.tasks.cases import (
    CASE_TASKS,
    CASE_TEACHER_OF,
    ForkTask,
    LongTask,
    ModesTask,
    ReachTask,
    RouteTask,
    case_checkpoint,
    case_tokenizer,
    rev,
    rsum,
)

ASSETS = Path(__file__).resolve().parent.parent / "opd" / "assets"


def _rsum_naive(x: str) -> str:
    return "".join(str(sum(int(c) for c in x[len(x) - i:]) % 10) for i in range(1, len(x) + 1))


def test_transforms_against_naive_definitions():
    rng = random.Random(0)
    assert rsum("305") == "558" and rev("305") == "503"
    for _ in range(200):
        x = "".join(str(rng.randrange(10)) for _ in range(rng.randrange(1, 17)))
        assert rsum(x) == _rsum_naive(x)
        assert rev(x) == "".join(x[i] for i in range(len(x) - 1, -1, -1))


def test_verifiers_accept_exactly_the_correct_answers():
    x = "305172"
    ex = ForkTask().example(x)
    assert ex.prompt == "305172=" and ex.fields["x"] == x
    fork = ForkTask()
    assert fork.verify(ex, "a271503$") == 1.0 and fork.strategy(ex, "a271503$") == "a"
    assert fork.verify(ex, f"b{_rsum_naive(x)}$__") == 1.0 and fork.strategy(ex, f"b{_rsum_naive(x)}$") == "b"
    assert fork.strategy(ex, "b271503$") == "wrong_b" and fork.verify(ex, "b271503$") == 0.0
    assert fork.verify(ex, "271503$") == 0.0 and fork.verify(ex, "a271503") == 0.0  # no path token / no EOS
    assert fork.strategy(ex, "a271503") == "truncated"
    route = RouteTask()
    for order in ("012357", "753210", "271503", "305172"):
        assert route.verify(ex, order + "$") == 1.0
    assert route.verify(ex, "012356$") == 0.0 and route.verify(ex, "01235$") == 0.0 and route.verify(ex, "0123577$") == 0.0
    assert route.strategy(ex, "012357$") == "sorted" and route.strategy(ex, "271503$") == "reversed"
    modes = ModesTask()
    assert modes.verify(ex, "271503$") == 1.0 and modes.strategy(ex, rsum(x) + "$") == "rsum"
    assert modes.verify(ex, "a271503$") == 0.0
    long = LongTask(length=12)
    ex12 = long.example("305172305172")
    assert long.example("0517").prompt == "aaaaaaaa0517="  # left-padded to one width for every length
    assert long.verify(ex12, rev("305172305172") + "$") == 1.0 and long.verify(ex12, "001122335577$") == 1.0
    assert long.verify(ex12, rsum("305172305172") + "$") == 0.0 and long.verify(ex12, "00112233557$") == 0.0
    assert (fork.max_new_tokens, route.max_new_tokens, modes.max_new_tokens, long.max_new_tokens) == (8, 7, 7, 13)


def test_held_out_sets_are_fixed_and_disjoint_from_training():
    for name in CASE_TASKS:
        task = make_task(name, length=4, eval_size=300, seed=0)
        held = {e.prompt for e in task.eval_examples()}
        assert len(held) == 300
        assert [e.prompt for e in make_task(name, length=4, eval_size=300).eval_examples(10)] == \
            [e.prompt for e in task.eval_examples(10)]
        for step in range(20):
            batch = task.train_examples(step, 64, seed=3)
            assert not held & {e.prompt for e in batch}
            assert [e.prompt for e in batch] == [e.prompt for e in task.train_examples(step, 64, seed=3)]
        assert TASKS[name] is CASE_TASKS[name]


def test_teacher_distributions():
    rng = random.Random(1)
    fork_task, modes_task, route_task = ForkTask(), ModesTask(), RouteTask()
    fork = Counter(fork_task.sample_answer("305172", rng)[0] for _ in range(4000))
    assert abs(fork["b"] / 4000 - ForkTask.p_hard) < 0.03
    modes = Counter(modes_task.sample_answer("305172", rng) == rev("305172") for _ in range(4000))
    assert abs(modes[True] / 4000 - 0.5) < 0.03
    orders = Counter(route_task.sample_answer("123", rng) for _ in range(6000))
    assert len(orders) == 6 and min(orders.values()) > 800  # all 3! orders, roughly uniform


def test_reach_student_distribution_and_verifier():
    """The designed warm start: ascending digit i with probability p_sorted, else a slip a/b (never correct)."""
    task, rng, x = ReachTask(), random.Random(2), "305172"
    draws = [task.student_answer(x, rng) for _ in range(4000)]
    assert all(len(d) == len(x) and all(c == s or c in "ab" for c, s in zip(d, sorted(x))) for d in draws)
    kept = sum(c == s for d in draws for c, s in zip(d, sorted(x))) / (4000 * len(x))
    assert abs(kept - ReachTask.p_sorted) < 0.02
    slips = Counter(c for d in draws for c in d if c in "ab")
    assert abs(slips["a"] / sum(slips.values()) - 0.5) < 0.03
    ex = task.example(x)
    assert task.verify(ex, "012357$") == 1.0 and task.verify(ex, "753210$") == 1.0
    assert task.verify(ex, "0a2357$") == 0.0 and task.strategy(ex, "012357$") == "sorted"
    assert load_config(None, ["data.task=reach", "student.model=builtin:reach/student",
                              "teacher.model=builtin:reach/teacher"]).data.task == "reach"


def test_bad_lengths_and_settings_fail_clearly():
    with pytest.raises(ValueError, match="length must be"):
        ForkTask(length=13)
    with pytest.raises(ValueError, match="eval_size"):
        RouteTask(length=2, eval_size=60)
    with pytest.raises(ValueError, match="builtin:fork/student"):
        load_config(None, ["data.task=fork"])
    case = ["student.model=builtin:long/student", "teacher.model=builtin:long/teacher", "data.task=long"]
    with pytest.raises(ValueError, match="rollout.max_new_tokens=13"):
        load_config(None, [*case, "data.length=12"])
    assert load_config(None, [*case, "data.length=12", "rollout.max_new_tokens=13"]).data.length == 12
    with pytest.raises(ValueError, match="data.length"):
        load_config(None, [*case, "data.length=13", "rollout.max_new_tokens=14"])
    with pytest.raises(ValueError, match="not of data.task=arith"):
        load_config(None, ["data.length=4"])
    assert len(case_tokenizer()) == 17


def _card(case: str, role: str) -> dict:
    return json.loads((ASSETS / case / role / "opd_card.json").read_text())


@pytest.mark.parametrize("case", sorted(CASE_TASKS))
def test_shipped_pairs_have_the_designed_properties(case):
    """The cards' checks, and the same checks re-measured on the first 100 held-out inputs."""
    from opd.models import load_model
    from opd.tasks.case_checkpoints import PHASES, case_checks

    from opd.tasks.case_checkpoints import reach_masses

    for role in ("teacher", "student"):
        if f"{case}/{role}" not in PHASES:  # reach's teacher is route's (checked with route)
            assert CASE_TEACHER_OF[case] in CASE_TASKS and role == "teacher"
            assert case_checkpoint(case, role) == case_checkpoint(CASE_TEACHER_OF[case], role)
            continue
        card, phase = _card(case, role), PHASES[f"{case}/{role}"]
        for check, (lo, hi) in phase.ranges.items():
            assert lo <= card["checks"][check] <= hi, (case, role, check)
        assert card["bytes_on_disk"] < 2_000_000
        fresh = case_checks(load_model(ASSETS / case / role), case_tokenizer(), case, eval_size=100)
        if case == "reach":  # the pair's checks: the teacher on the student's states
            t = reach_masses(load_model(case_checkpoint(case, "teacher")), case_tokenizer(), ReachTask(eval_size=100))
            fresh |= {"teacher_mass_x": t["mass_x"], "teacher_mass_slip": t["mass_slip"]}
        for check, (lo, hi) in phase.ranges.items():  # 100 prompts: a few points of slack
            assert lo - 0.06 <= fresh[check] <= hi + 0.06, (case, role, check, fresh[check])


def test_distill_and_sampled_evaluation_on_a_case(tmp_path):
    from opd.cli import main as opd_main
    from opd.sweep.posteval import main as posteval

    run = tmp_path / "fork"
    args = ["distill", "data.task=fork", "student.model=builtin:fork/student", "teacher.model=builtin:fork/teacher",
            "rollout.prompts_per_step=8", "eval.size=16", "eval.every=0", "train.steps=2", "train.threads=1",
            "logging.progress=false", "logging.report=false", f"logging.run_dir={run}"]
    assert opd_main(args) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["teacher"]["teacher/accuracy"] >= 0.9  # the teacher completes the path it picks
    assert posteval([str(run), "--samples", "3"]) == 0
    post = json.loads((run / "sample_eval.json").read_text())
    assert post["samples"] == 3 and post["prompts"] == 16
    sample_shares = {k: v for k, v in post.items() if k.startswith("sample/share/")}
    assert sum(sample_shares.values()) == pytest.approx(1.0)
    correct = sum(v for k, v in sample_shares.items() if k in ("sample/share/a", "sample/share/b"))
    assert post["sample/accuracy"] == pytest.approx(correct)


def test_cr_opd_options_reach_the_update_on_reach(tmp_path):
    """routing.mass / reach_p / temperature (opd/math/routing_options.py) change the update through the
    objective: one step of cr-opd with each option set gives other weights than the shipped settings."""
    from safetensors.torch import load_file

    from opd.cli import main as opd_main

    base = ["distill", "method=cr-opd", "data.task=reach", "student.model=builtin:reach/student",
            "teacher.model=builtin:reach/teacher", "rollout.prompts_per_step=8", "eval.size=8", "eval.every=0",
            "train.steps=1", "train.threads=1", "logging.progress=false", "logging.report=false"]
    weights = {}
    for name, extra in (("shipped", []), ("excess", ["routing.mass=excess"]),
                        ("nucleus", ["routing.student_k=null", "routing.reach_p=0.5", "routing.temperature=0.5"])):
        assert opd_main([*base, *extra, f"logging.run_dir={tmp_path / name}"]) == 0
        weights[name] = load_file(str(tmp_path / name / "final" / "model.safetensors"))
    for name in ("excess", "nucleus"):
        assert any(not (weights[name][k] == weights["shipped"][k]).all() for k in weights["shipped"]), name
    with pytest.raises(ValueError, match="routing.mass"):
        load_config(None, ["method=cr-opd", "routing.mass=half"])
