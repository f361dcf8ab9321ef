"""Teachers: scores equal an independent per-row forward; access levels agree with each other;
the self-teacher's context reaches only the teacher; routing returns each row's own teacher."""

from __future__ import annotations

import pytest
import torch

from opd.models import build_model, tiny_llama_config
from opd.rollout import Sampling, encode_prompts, generate_rollouts, rollouts_from_texts
from opd.tasks.arith import ArithTask, arith_tokenizer
from opd.tasks.base import Example
from opd.teachers import ModelTeacher, RoutedTeacher, SelfTeacher, Teacher, teacher_prompt_texts


@pytest.fixture(scope="module")
def tok():
    return arith_tokenizer()


def _model(tok, seed, layers=2, hidden=32):
    return build_model(tiny_llama_config(len(tok), layers=layers, hidden=hidden, tokenizer=tok), seed=seed)


@pytest.fixture(scope="module")
def examples():
    task = ArithTask(digits=2, eval_size=10, seed=0)
    exs = task.train_examples(0, 4, seed=0)
    # Different prompt lengths so padding matters: drop one operand digit on one row.
    return [*exs[:3], Example("1+2=", answer="3", teacher_context="3|", fields={"domain": "b"})]


@pytest.fixture(scope="module")
def rollouts(tok, examples):
    torch.manual_seed(0)
    return generate_rollouts(_model(tok, seed=7), tok, examples, Sampling(max_new_tokens=5, samples_per_prompt=2))


def _manual_logprobs(model, tok, rollouts, texts, temperature=1.0):
    """Per row: tempered log-softmax of the teacher's logits on the unpadded teacher text ++ completion."""
    out = []
    for b in range(rollouts.batch_size):
        p = tok(texts[b])["input_ids"]
        c = rollouts.completion_ids_BT[b][rollouts.completion_mask_BT[b]].tolist()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1: len(p) - 1 + len(c)]
        out.append(torch.log_softmax(logits.float() / temperature, -1))
    return out


def _assert_zero_padding(rollouts, *tensors):
    pad = ~rollouts.completion_mask_BT
    for t in tensors:
        assert (t[pad] == 0).all()


@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_model_teacher_matches_manual_forward(tok, rollouts, temperature):
    teacher_model = _model(tok, seed=3)
    teacher = ModelTeacher(teacher_model, tok, temperature=temperature)
    assert isinstance(teacher, Teacher)
    fb = teacher.score(rollouts, access="full", topk=5)
    ref = _manual_logprobs(teacher_model, tok, rollouts, [e.prompt for e in rollouts.examples], temperature)
    for b, lp in enumerate(ref):
        n = len(lp)
        c = rollouts.completion_ids_BT[b, :n]
        torch.testing.assert_close(fb.sampled_logprobs_BT[b, :n], lp.gather(-1, c[:, None]).squeeze(-1), atol=1e-5, rtol=0)
        top = lp.topk(5, -1)
        torch.testing.assert_close(fb.topk_logprobs_BTK[b, :n], top.values, atol=1e-5, rtol=0)
        assert torch.equal(fb.topk_ids_BTK[b, :n], top.indices)
        torch.testing.assert_close(torch.log_softmax(fb.logits_BTV[b, :n], -1), lp, atol=1e-5, rtol=0)
    _assert_zero_padding(rollouts, fb.sampled_logprobs_BT, fb.topk_logprobs_BTK, fb.topk_ids_BTK, fb.logits_BTV)
    assert fb.access == "full" and fb.hidden_BTH is None


def test_access_levels_are_consistent(tok, rollouts):
    teacher = ModelTeacher(_model(tok, seed=3), tok, temperature=1.3)
    sampled = teacher.score(rollouts, access="sampled")
    topk = teacher.score(rollouts, access="topk", topk=len(tok))
    full = teacher.score(rollouts, access="full", topk=4)
    assert sampled.topk_ids_BTK is None and sampled.logits_BTV is None
    torch.testing.assert_close(sampled.sampled_logprobs_BT, full.sampled_logprobs_BT)
    m = rollouts.completion_mask_BT
    # With K = V the sampled token is always in the top-k, with the same log-prob.
    hit = topk.topk_ids_BTK == rollouts.completion_ids_BT.unsqueeze(-1)
    assert (hit.sum(-1)[m] == 1).all()
    torch.testing.assert_close((topk.topk_logprobs_BTK * hit).sum(-1)[m], sampled.sampled_logprobs_BT[m])
    lp = torch.log_softmax(full.logits_BTV, -1).gather(-1, rollouts.completion_ids_BT.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(lp[m], sampled.sampled_logprobs_BT[m])


def test_hidden_accessor_reproduces_logits(tok, rollouts):
    model = _model(tok, seed=4)
    dense = ModelTeacher(model, tok, temperature=0.6).score(rollouts, access="full", topk=3)
    hidden = ModelTeacher(model, tok, temperature=0.6, full_as_hidden_above_vocab=1).score(rollouts, access="full",
                                                                                          topk=3)
    assert hidden.logits_BTV is None and hidden.hidden_BTH is not None and hidden.head_weight_VH is not None
    logits = hidden.hidden_BTH @ hidden.head_weight_VH.T
    m = rollouts.completion_mask_BT
    torch.testing.assert_close(logits[m], dense.logits_BTV[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden.sampled_logprobs_BT, dense.sampled_logprobs_BT, atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden.topk_logprobs_BTK, dense.topk_logprobs_BTK, atol=1e-5, rtol=0)
    assert torch.equal(hidden.topk_ids_BTK, dense.topk_ids_BTK)
    _assert_zero_padding(rollouts, hidden.hidden_BTH)
    # Below the threshold "sampled" never needs the accessor; above it the chunked path agrees.
    s = ModelTeacher(model, tok, temperature=0.6, full_as_hidden_above_vocab=1).score(rollouts, access="sampled")
    torch.testing.assert_close(s.sampled_logprobs_BT, dense.sampled_logprobs_BT, atol=1e-5, rtol=0)


def test_micro_batches_equal_one_batch(tok, rollouts):
    model = _model(tok, seed=3)
    whole = ModelTeacher(model, tok).score(rollouts, access="topk", topk=3)
    parts = ModelTeacher(model, tok, micro_batch_size=3).score(rollouts, access="topk", topk=3)
    torch.testing.assert_close(parts.sampled_logprobs_BT, whole.sampled_logprobs_BT, atol=1e-5, rtol=0)
    torch.testing.assert_close(parts.topk_logprobs_BTK, whole.topk_logprobs_BTK, atol=1e-5, rtol=0)


def test_teacher_prompt_texts_and_context_errors(tok, rollouts):
    exs = [Example("1=", teacher_context="7|"), Example("2=", teacher_context="8|")]
    assert teacher_prompt_texts(exs, False) == ["1=", "2="]
    assert teacher_prompt_texts(exs, True, "{context}") == ["7|1=", "8|2="]
    with pytest.raises(ValueError, match=r"teacher_context is None.*rows \[1\]"):
        teacher_prompt_texts([exs[0], Example("3=")], True, "{context}")
    with pytest.raises(ValueError, match="does not contain"):
        teacher_prompt_texts(exs, True, "ctx:")
    no_ctx = rollouts_from_texts(tok, [Example("1=", answer="1")], max_new_tokens=3)
    with pytest.raises(ValueError, match="teacher_context"):
        ModelTeacher(_model(tok, seed=0), tok, use_context=True, context_template="{context}").score(no_ctx)
    with pytest.raises(ValueError, match="unknown access"):
        ModelTeacher(_model(tok, seed=0), tok).score(no_ctx, access="logits")


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i: i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_self_teacher_context_reaches_only_the_teacher(tok, rollouts):
    student = _model(tok, seed=7)
    teacher = SelfTeacher(student, tok, mode="frozen", context_template="{context}")
    t_ids, t_mask = teacher.prompt_batch(rollouts)
    for b, example in enumerate(rollouts.examples):
        ctx_ids = tok(example.teacher_context, add_special_tokens=False)["input_ids"]
        prompt_ids = tok(example.prompt, add_special_tokens=False)["input_ids"]
        teacher_row = t_ids[b][t_mask[b].bool()].tolist()
        student_row = rollouts.prompt_ids_BP[b][rollouts.prompt_mask_BP[b].bool()].tolist()
        assert _contains(teacher_row, ctx_ids + prompt_ids)
        assert not _contains(student_row, ctx_ids)
        assert student_row == tok(example.prompt)["input_ids"]
    # The scores are the forward on exactly those teacher ids.
    fb = teacher.score(rollouts)
    texts = teacher_prompt_texts(rollouts.examples, True, "{context}")
    for b, lp in enumerate(_manual_logprobs(student, tok, rollouts, texts)):
        n = len(lp)
        ref = lp.gather(-1, rollouts.completion_ids_BT[b, :n, None]).squeeze(-1)
        torch.testing.assert_close(fb.sampled_logprobs_BT[b, :n], ref, atol=1e-5, rtol=0)


def test_frozen_self_teacher_ignores_student_updates_and_live_follows(tok, rollouts):
    student = _model(tok, seed=7)
    frozen = SelfTeacher(student, tok, mode="frozen", context_template="{context}")
    live = SelfTeacher(student, tok, mode="live", context_template="{context}")
    assert all(not p.requires_grad for p in frozen.model.parameters())
    assert all(p.requires_grad for p in student.parameters()) and live.model is student
    before_frozen, before_live = frozen.score(rollouts), live.score(rollouts)
    torch.testing.assert_close(before_frozen.sampled_logprobs_BT, before_live.sampled_logprobs_BT)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    student.train()
    after_frozen, after_live = frozen.score(rollouts), live.score(rollouts)
    assert student.training  # the live teacher restores the student's mode
    assert torch.equal(after_frozen.sampled_logprobs_BT, before_frozen.sampled_logprobs_BT)
    assert not torch.allclose(after_live.sampled_logprobs_BT, before_live.sampled_logprobs_BT)
    with pytest.raises(ValueError, match="mode"):
        SelfTeacher(student, tok, mode="copy")


def test_routed_teacher_returns_each_rows_own_teacher(tok):
    examples = [Example("12+3=", fields={"domain": "a"}), Example("1=", fields={"domain": "b"}),
                Example("45+6=", fields={}), Example("9+9=", fields={"domain": "a"})]
    r = rollouts_from_texts(tok, examples, ["21", "1", "111", "81"], max_new_tokens=4)
    ta, tb, td = (ModelTeacher(_model(tok, seed=s), tok) for s in (11, 12, 13))
    tb.full_as_hidden_above_vocab = 1  # one part returns the hidden-state accessor
    routed = RoutedTeacher({"a": ta, "b": tb}, default=td, field="domain")
    fb = routed.score(r, access="full", topk=4)
    owners = [ta, tb, td, ta]
    for row, owner in enumerate(owners):
        own = owner.score(r.select([row]), access="full", topk=4)
        n = int(r.completion_mask_BT[row].sum())
        torch.testing.assert_close(fb.sampled_logprobs_BT[row, :n], own.sampled_logprobs_BT[0, :n], atol=1e-6, rtol=0)
        torch.testing.assert_close(fb.topk_logprobs_BTK[row, :n], own.topk_logprobs_BTK[0, :n], atol=1e-6, rtol=0)
        own_logits = own.logits_BTV if own.logits_BTV is not None else own.hidden_BTH @ own.head_weight_VH.T
        torch.testing.assert_close(fb.logits_BTV[row, :n], own_logits[0, :n], atol=1e-5, rtol=1e-5)
    _assert_zero_padding(r, fb.sampled_logprobs_BT, fb.topk_logprobs_BTK)
    strict = RoutedTeacher({"a": ta, "b": tb}, default=None, field="domain")
    with pytest.raises(ValueError, match=r"domain=None.*known values: \['a', 'b'\]"):
        strict.score(r)
    only_a = strict.score(r.select([0, 3]), access="sampled")
    torch.testing.assert_close(only_a.sampled_logprobs_BT, ta.score(r.select([0, 3])).sampled_logprobs_BT)


def test_teacher_scores_carry_no_gradient(tok, rollouts):
    model = _model(tok, seed=3)
    fb = ModelTeacher(model, tok).score(rollouts, access="full", topk=2)
    assert not fb.sampled_logprobs_BT.requires_grad and not fb.logits_BTV.requires_grad
    fb_h = ModelTeacher(model, tok, full_as_hidden_above_vocab=1).score(rollouts, access="full", topk=2)
    assert not fb_h.hidden_BTH.requires_grad and not fb_h.head_weight_VH.requires_grad
    ids, mask = encode_prompts(tok, ["1="])
    assert ids.tolist() == [tok("1=")["input_ids"]] and mask.all()


def test_hidden_accessor_head_is_a_snapshot_of_the_weights(tok, rollouts):
    """With full access as hidden states + head, the feedback keeps the head as it was at scoring time:
    a live self-teacher's weights change at the next optimizer step, while the feedback may be reused
    (rollout.updates_per_rollout > 1)."""
    model = _model(tok, seed=5)
    fb = ModelTeacher(model, tok, full_as_hidden_above_vocab=1).score(rollouts, access="full")
    before = fb.head_weight_VH.clone()
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert torch.equal(fb.head_weight_VH, before)


def test_teacher_prompt_texts_use_the_teacher_prompt_and_render_conversations():
    from opd.chat import render_prompt, with_system_prompt
    from opd.tasks.arith_chat import arith_chat_tokenizer
    from opd.tasks.base import RenderedPrompt

    chat_tok = arith_chat_tokenizer()
    msgs = ({"role": "user", "content": "12+34="},)
    student_text = render_prompt(chat_tok, msgs)
    teacher_text = render_prompt(chat_tok, with_system_prompt(msgs, "x:1"))
    chat = Example(student_text, answer="46", teacher_context="x:1", messages=msgs, teacher_prompt=teacher_text)
    plain = Example("1=", teacher_context="7|", teacher_prompt="whole teacher text")
    assert teacher_prompt_texts([chat, plain], False) == [student_text, "1="]
    assert teacher_prompt_texts([chat, plain], True, "{context}") == [teacher_text, "whole teacher text"]
    assert isinstance(teacher_prompt_texts([chat], True)[0], RenderedPrompt)
    # a teacher tokenizer re-renders the messages with its own template
    other = arith_chat_tokenizer()
    other.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}<assistant>"
    assert teacher_prompt_texts([chat], True, tokenizer=other) == ["[system]x:1[user]12+34=<assistant>"]
    assert teacher_prompt_texts([chat], False, tokenizer=other) == ["[user]12+34=<assistant>"]
    with pytest.raises(ValueError, match="teacher.system_prompt"):
        teacher_prompt_texts([Example("1=", messages=msgs)], True)
