"""The teacher self-test's checks (opd.doctor.checks, opd.doctor.tokens): each passes on the shipped
arith teacher and fails on a teacher broken on purpose (non-deterministic, batch-dependent,
padding-dependent, mis-tempered), against naive references written here."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch

from opd.doctor.checks import (
    batch_invariance,
    determinism,
    feedback_difference,
    pad_rollouts,
    padding_invariance,
    tempered_reference,
    temperature_check,
)
from opd.doctor.tokens import (
    default_system_prompt,
    embedding_rows,
    pad_eos,
    round_trip,
    special_tokens,
    system_prompts,
)
from opd.models import load_model, load_tokenizer
from opd.rollout import Sampling, generate_rollouts
from opd.tasks.arith import ArithTask, arith_checkpoint
from opd.tasks.arith_chat import arith_chat_checkpoint
from opd.teachers import ModelTeacher
from opd.types import Feedback

TOL = 1e-4


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(arith_checkpoint("teacher"))


@pytest.fixture(scope="module")
def model():
    return load_model(arith_checkpoint("teacher")).eval()


@pytest.fixture(scope="module")
def rollouts(tok):
    student = load_model(arith_checkpoint("student"))
    examples = ArithTask(digits=3, eval_size=12, seed=0).eval_examples()[:6]
    torch.manual_seed(0)
    return generate_rollouts(student, tok, examples, Sampling(max_new_tokens=8, samples_per_prompt=2, temperature=1.5))


class Noisy:
    """Non-deterministic on purpose: every call adds fresh noise."""

    def __init__(self, inner, scale=1e-2):
        self.inner, self.scale = inner, scale

    def score(self, rollouts, *, access="sampled", topk=32):
        fb = self.inner.score(rollouts, access=access, topk=topk)
        noise = self.scale * torch.rand_like(fb.sampled_logprobs_BT)
        return replace(fb, sampled_logprobs_BT=fb.sampled_logprobs_BT + noise)


class BatchDependent:
    """Batch-dependent on purpose: the scores shift with the batch size (like a server that pads badly)."""

    def __init__(self, inner):
        self.inner = inner

    def score(self, rollouts, *, access="sampled", topk=32):
        fb = self.inner.score(rollouts, access=access, topk=topk)
        return replace(fb, sampled_logprobs_BT=fb.sampled_logprobs_BT - 1e-3 * (rollouts.batch_size - 1))


class IgnoresMask:
    """Attends to padding on purpose: the prompt mask is dropped, so padding columns become real tokens."""

    def __init__(self, model, tok):
        self.teacher = ModelTeacher(model, tok)

    def score(self, rollouts, *, access="sampled", topk=32):
        bare = replace(rollouts, examples=(), prompt_mask_BP=torch.ones_like(rollouts.prompt_mask_BP))
        return self.teacher.score(bare, access=access, topk=topk)


def naive_max_diff(a: Feedback, b: Feedback, mask) -> float:
    worst = 0.0
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[i, t]:
                worst = max(worst, abs(float(a.sampled_logprobs_BT[i, t]) - float(b.sampled_logprobs_BT[i, t])))
    return worst


def test_feedback_difference_matches_a_loop_and_ignores_padding(rollouts):
    mask = rollouts.completion_mask_BT
    a = torch.randn(mask.shape)
    b = a + torch.randn(mask.shape) * 0.1
    b_padded = torch.where(mask, b, torch.full_like(b, 1e6))  # padding differences never count
    fa, fb = Feedback("sampled", a), Feedback("sampled", b_padded)
    assert feedback_difference(fa, fb, mask) == pytest.approx(naive_max_diff(fa, Feedback("sampled", b), mask))
    assert feedback_difference(fa, Feedback("sampled", torch.where(mask, torch.nan, b)), mask) == math.inf
    assert feedback_difference(fa, fb, torch.zeros_like(mask)) == 0.0
    with pytest.raises(ValueError, match="cannot be compared"):
        feedback_difference(fa, Feedback("sampled", a[:, :2]), mask)


def test_feedback_difference_compares_topk_only_where_the_ids_agree():
    mask = torch.ones(1, 2, dtype=torch.bool)
    ids = torch.tensor([[[0, 1], [2, 3]]])
    lp = torch.tensor([[[-0.1, -2.0], [-0.5, -1.0]]])
    a = Feedback("topk", torch.zeros(1, 2), topk_ids_BTK=ids, topk_logprobs_BTK=lp)
    b = Feedback("topk", torch.zeros(1, 2), topk_ids_BTK=torch.tensor([[[0, 1], [3, 2]]]), topk_logprobs_BTK=lp + 0.25)
    assert feedback_difference(a, b, mask) == pytest.approx(0.25)  # only row 0's two matching ids count


def test_determinism_passes_on_the_teacher_and_fails_on_a_noisy_one(model, tok, rollouts):
    teacher = ModelTeacher(model, tok)
    good = determinism(teacher, rollouts, tolerance=TOL / 10, access="topk", topk=4)
    assert good.passed and good.measured == pytest.approx(0.0, abs=1e-6)
    bad = determinism(Noisy(teacher), rollouts, tolerance=TOL / 10)
    assert bad.passed is False and bad.measured > 1e-4 and "FAIL" in bad.line()


def test_batch_invariance_passes_on_the_teacher_and_fails_on_a_batch_dependent_one(model, tok, rollouts):
    teacher = ModelTeacher(model, tok)
    good = batch_invariance(teacher, rollouts, tolerance=TOL, access="topk", topk=4, rows=5)
    assert good.passed, good.line()
    # reference: each row scored alone, compared by a loop over its tokens
    together = teacher.score(rollouts)
    worst = 0.0
    for i in range(5):
        n = int(rollouts.completion_mask_BT[i].sum())
        alone = teacher.score(rollouts.select([i]))
        for t in range(n):
            worst = max(worst, abs(float(alone.sampled_logprobs_BT[0, t]) - float(together.sampled_logprobs_BT[i, t])))
    assert good.measured == pytest.approx(worst, abs=1e-5)  # fp32 noise of differently padded batches
    bad = batch_invariance(BatchDependent(teacher), rollouts, tolerance=TOL)
    assert bad.passed is False and bad.measured == pytest.approx(1e-3 * (rollouts.batch_size - 1), rel=1e-3)


def test_pad_rollouts_adds_masked_columns_only(rollouts):
    padded = pad_rollouts(rollouts, 0, left=3, right=2)
    assert padded.prompt_ids_BP.shape[1] == rollouts.prompt_ids_BP.shape[1] + 3
    assert padded.completion_ids_BT.shape[1] == rollouts.completion_ids_BT.shape[1] + 2
    assert not padded.prompt_mask_BP[:, :3].any() and not padded.completion_mask_BT[:, -2:].any()
    assert torch.equal(padded.prompt_ids_BP[:, 3:], rollouts.prompt_ids_BP)
    assert torch.equal(padded.completion_mask_BT.sum(1), rollouts.completion_mask_BT.sum(1))


def test_padding_invariance_passes_on_the_teacher_and_fails_when_padding_is_attended(model, tok, rollouts):
    bare = replace(rollouts, examples=())  # the teacher reads the student's prompt ids: left padding is tested too
    good = padding_invariance(ModelTeacher(model, tok), bare, tok.pad_token_id, tolerance=TOL, reads_prompt_ids=True)
    assert good.passed, good.line()
    assert "left of the prompts" in good.detail
    bad = padding_invariance(IgnoresMask(model, tok), bare, tok.pad_token_id, tolerance=TOL, reads_prompt_ids=True)
    assert bad.passed is False and bad.measured > 1e-3


def test_tempered_reference_equals_log_softmax_of_logits_over_tau():
    logits = torch.randn(2, 3, 7)
    ids = torch.randint(0, 7, (2, 3))
    tau = 1.7
    untempered = torch.log_softmax(logits, -1)
    expected = torch.log_softmax(logits / tau, -1).gather(-1, ids[..., None]).squeeze(-1)
    assert torch.allclose(tempered_reference(untempered, ids, tau), expected, atol=1e-6)


def test_temperature_check_catches_a_teacher_that_ignores_or_doubles_tau(model, tok, rollouts):
    tau = 2.0
    untempered = torch.log_softmax(ModelTeacher(model, tok).score(rollouts, access="full").logits_BTV, -1)
    right = temperature_check(ModelTeacher(model, tok, temperature=tau).score(rollouts), untempered, rollouts, tau,
                              tolerance=TOL)
    assert right.passed, right.line()
    ignored = temperature_check(ModelTeacher(model, tok, temperature=1.0).score(rollouts), untempered, rollouts, tau,
                                tolerance=TOL)
    assert ignored.passed is False and "not applied" in ignored.detail
    doubled = temperature_check(ModelTeacher(model, tok, temperature=tau * tau).score(rollouts), untempered, rollouts,
                                tau, tolerance=TOL)
    assert doubled.passed is False and "neither" in doubled.detail


def test_round_trip_counts_texts_the_teacher_tokenizer_cannot_spell(tok):
    assert round_trip(["12+3=15", "7"], tok).passed
    bad = round_trip(["12+3=15", "héllo"], tok)  # 'é' and letters are outside the arith vocabulary
    assert bad.passed is False and bad.measured == pytest.approx(0.5) and "héllo" in bad.detail


def test_special_tokens_fails_on_a_teacher_with_another_eos_in_same_mode_only(tok):
    assert special_tokens(tok, tok, mode="same", chat=False).passed
    other = copy.deepcopy(tok)
    other.eos_token = "?"  # another id for EOS: the teacher would score the student's EOS as an ordinary token
    bad = special_tokens(tok, other, mode="same", chat=False)
    assert bad.passed is False and bad.measured >= 1 and "eos" in bad.detail.lower()
    assert special_tokens(tok, other, mode="own", chat=False).passed  # own tokenizer: EOS is mapped to EOS


def test_embedding_rows_and_pad_eos(tok):
    assert embedding_rows(len(tok), len(tok), tok, tok, shared=True).passed
    short = embedding_rows(len(tok) - 2, len(tok), tok, tok, shared=True)
    assert short.passed is False and short.measured == 4  # 2 tokens without a row + a 2-row mismatch
    assert pad_eos([("student", tok)]).passed
    same = copy.deepcopy(tok)
    same.pad_token = same.eos_token
    noted = pad_eos([("student", tok), ("teacher", same)])
    assert noted.passed and "teacher: pad == EOS" in noted.detail  # noted: opd masks padding by position
    no_eos = copy.deepcopy(tok)
    no_eos.eos_token = None
    bad = pad_eos([("student", tok), ("teacher", no_eos)])
    assert bad.passed is False and bad.measured == 1 and "teacher: no EOS token" in bad.detail


def test_default_system_prompt_is_found_in_a_template_that_inserts_one():
    chat = load_tokenizer(arith_chat_checkpoint("teacher"))
    assert default_system_prompt(chat) is None  # the shipped template inserts nothing
    inserting = load_tokenizer(arith_chat_checkpoint("teacher"))
    inserting.chat_template = (
        "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<system>1+1=2{{ eos_token }}{% endif %}"
        "{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + eos_token }}{% endfor %}")
    assert default_system_prompt(inserting) == "1+1=2"
    check = system_prompts(chat, inserting, chat=True)
    assert check.passed is False and "'1+1=2'" in check.detail
    assert system_prompts(chat, chat, chat=True).passed
    assert system_prompts(chat, inserting, chat=False).passed is None  # plain prompts: nothing to compare

