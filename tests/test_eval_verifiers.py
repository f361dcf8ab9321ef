"""Verifiers read the completion after the scored model's *own* stop token is removed (issue 16.8).

Every shipped checkpoint under ``opd/assets/`` is evaluated with its own tokenizer against its task's
verifier — the task built the way a training run builds it, for the student's ``"$"`` — and scored
against a naive reference written here (the tokens before the model's EOS id, decoded, compared with
the accepted answers). ``builtin:arith_bpe/teacher`` ends its completions with ``"</s>"``; it must
score near its card's held-out figure (0.992), not 0.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from opd.evaluate import decode_completions, evaluate, verifier_texts
from opd.models import load_model, load_tokenizer
from opd.rollout import generate_rollouts
from opd.tasks.arith import ArithTask
from opd.tasks.arith_chat import ArithChatTask
from opd.tasks.cases import CaseTask, make_case_task
from opd.types import Rollouts

ASSETS = Path(__file__).resolve().parent.parent / "opd" / "assets"
N = 40  # held-out prompts per model: the first N of the set each card was measured on


def _task(folder: str, tokenizer):
    """The task each shipped checkpoint was trained for, built for the student's ``"$"`` (as a run does)."""
    family, _ = folder.split("/")
    if family in ("arith", "arith_bpe"):
        return ArithTask(digits=2 if "smoke" in folder else 3, eval_size=500, seed=0)
    if family == "arith_chat":
        return ArithChatTask(tokenizer, eval_size=500, seed=0)
    if family == "long":
        return make_case_task("long", length=2, eval_size=50, seed=0)
    return make_case_task(family, eval_size=500, seed=0)


SHIPPED = sorted(f"{p.parent.parent.name}/{p.parent.name}" for p in ASSETS.glob("*/*/config.json"))


def test_every_shipped_checkpoint_is_covered():
    assert len(SHIPPED) >= 15, SHIPPED  # arith ×4, arith_bpe, arith_chat ×2, four cases ×2
    assert "arith_bpe/teacher" in SHIPPED


def _correct(task, example, text: str) -> bool:
    if task.name in ("route", "long", "reach"):  # any order of the input digits
        return sorted(text) == sorted(example.fields["x"])
    if isinstance(task, CaseTask):
        return text in {answer for answer, _ in task.answers(example.fields["x"])}
    return text.strip() == example.answer.strip()


def _naive_scores(tokenizer, rollouts: Rollouts, task) -> list[float]:
    """Reference: the tokens before the model's own EOS id, decoded without special tokens, compared
    with the accepted answers; no EOS → 0 (truncated)."""
    eos = tokenizer.eos_token_id
    out = []
    for ids, mask, ex in zip(rollouts.completion_ids_BT, rollouts.completion_mask_BT, rollouts.examples):
        row = ids[mask.bool()].tolist()
        if eos not in row:
            out.append(0.0)
            continue
        text = tokenizer.decode(row[:row.index(eos)], skip_special_tokens=True)
        out.append(float(_correct(task, ex, text)))
    return out


@pytest.mark.parametrize("folder", SHIPPED)
def test_shipped_checkpoint_is_scored_after_its_own_stop_token(folder):
    path = ASSETS / folder
    tokenizer = load_tokenizer(path)
    model = load_model(path)
    task = _task(folder, tokenizer)
    examples = task.eval_examples(N)
    rollouts = generate_rollouts(model, tokenizer, examples, max_new_tokens=task.max_new_tokens + 2
                                 if hasattr(task, "max_new_tokens") else 24, greedy=True)
    want = _naive_scores(tokenizer, rollouts, task)
    got = [task.verify(ex, text) for ex, text in zip(examples, verifier_texts(task, tokenizer, rollouts))]
    assert got == want
    finished = (~rollouts.truncated_B).float().mean().item()
    assert finished > 0.9, f"{folder}: only {finished:.0%} of greedy completions stopped"
    card = json.loads((path / "opd_card.json").read_text())
    accuracy = sum(got) / len(got)
    if "heldout_accuracy" in card:  # the first N of the card's own held-out set: within sampling error
        p = card["heldout_accuracy"]
        assert abs(accuracy - p) <= 4 * math.sqrt(p * (1 - p) / N) + 0.05, (folder, accuracy, p)
    if folder.endswith("teacher"):
        assert accuracy >= 0.85, (folder, accuracy)


def test_bpe_teacher_scores_its_card_figure_through_evaluate():
    """The cross-tokenizer demo's teacher row: the run's task (built for the student's ``"$"``) scores
    the BPE teacher through :func:`opd.evaluate.evaluate` with the teacher's own tokenizer."""
    path = ASSETS / "arith_bpe" / "teacher"
    tokenizer, model = load_tokenizer(path), load_model(path)
    assert tokenizer.eos_token == "</s>"
    for task in (ArithTask(digits=3, eval_size=500, seed=0), ArithTask(digits=3, eval_size=500, seed=0,
                                                                        eos_token="</s>")):
        r = evaluate(model, tokenizer, task, task.eval_examples(50), max_new_tokens=8)
        assert r.accuracy >= 0.94, (task.eos_token, r.accuracy)  # card: 0.992 on 500
        assert r.truncation_rate == 0.0


def _rollouts(rows: list[list[int]], truncated: list[bool], examples) -> Rollouts:
    t = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True
    b = len(rows)
    return Rollouts(prompt_ids_BP=torch.ones(b, 1, dtype=torch.long), prompt_mask_BP=torch.ones(b, 1, dtype=torch.long),
                    completion_ids_BT=ids, completion_mask_BT=mask, behaviour_logprobs_BT=torch.zeros(b, t),
                    truncated_B=torch.tensor(truncated), on_policy_B=torch.ones(b, dtype=torch.bool),
                    group_index_B=torch.arange(b), examples=tuple(examples))


def test_verifier_texts_rewrites_only_a_final_eos():
    tokenizer = load_tokenizer(ASSETS / "arith_bpe" / "teacher")
    task = ArithTask(digits=3, eval_size=10, seed=0)
    ex = task.eval_examples(1)[0]
    answer = tokenizer(ex.answer, add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    rows = [answer + [eos], answer, answer + [eos]]  # stopped; truncated; not truncated but cut (a partial rollout)
    r = _rollouts([rows[0], rows[1], rows[2][:-1]], [False, True, False], [ex] * 3)
    texts = verifier_texts(task, tokenizer, r)
    assert texts == [ex.answer + "$", ex.answer, ex.answer]
    assert decode_completions(tokenizer, r)[0] == ex.answer + "</s>"  # what the model wrote
    assert [task.verify(ex, t) for t in texts] == [1.0, 0.0, 0.0]


def test_builtin_tasks_refuse_an_empty_eos():
    with pytest.raises(ValueError, match="eos_token must be a non-empty string"):
        ArithTask(eos_token="")
    with pytest.raises(ValueError, match="eos_token must be a non-empty string"):
        make_case_task("fork", eos_token="")
