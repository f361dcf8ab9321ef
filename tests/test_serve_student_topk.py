"""``support.kind=student_topk`` with a served teacher (``teacher.protocol=opd``): the server scores the
student's top-k ids chosen when the rollouts are scored (opd.teachers.student_support).

* the ids are the student's top-k at every completion position (a naive per-position reference);
* on one rollout batch the route-1 loss and its gradient w.r.t. every student parameter equal the
  in-process teacher's (full logits) ``student_topk`` ones, renorm and tail, dense and chunked paths; the
  per-token divergence equals a naive loop over positions (fp32 payload; tolerance below);
* a fixed support that is *not* the student's current top-k changes the loss (the ids are really used);
* the math layer: carried ids + the teacher's log-probs there equal the full-teacher support and a loop;
* the config is accepted with protocol opd (access resolves to ``sampled``) and refused with vllm; several
  updates per batch are warned about (the support is the top-k at sampling time);
* ``opd distill`` with a served teacher and ``support.kind=student_topk`` runs and writes its summary (also
  with rollout overlap — the ids come from the sampler's snapshot —, the chunked path and a score cache).

The server runs in a thread of the test process (uvicorn), as in tests/test_serve.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from opd.config import ConfigError, load_config, validate_config
from opd.config.validate import resolve_teacher_access
from opd.models import load_model, load_tokenizer
from opd.objective import Objective
from opd.rollout import Sampling, completion_forward, generate_rollouts
from opd.step import student_forward
from opd.tasks.arith import ArithTask, arith_checkpoint
from opd.tasks.base import Example
from opd.teachers import ModelTeacher
from opd.teachers.student_support import add_student_topk, student_topk_ids
from tests.test_serve import ThreadServer, served, teacher_app

K = 4
#: |served − in-process| bounds with the fp32 payload. Both sides use the same teacher forward (the server
#: scores in fp32), so ``renorm`` is bit-identical (measured |Δ| = 0 for the loss, the per-token values and
#: the gradients). The ``tail`` bucket of a served teacher is ``log(1 − Σ_{v∈S} p_T(v))`` of fp32 log-probs:
#: where the smoke teacher puts ~e^-12 of its mass off the student's top-k, the ~5e-7 rounding of each
#: log-prob is a few % of that tail (the in-process path sums the tail directly). Measured on this batch,
#: RKL: per-token ≤ 1.3e-4, loss relative 2.3e-6, gradients relative (to each tensor's max) 5.3e-5; FKL
#: (whose tail term is weighted by that tiny p_T) ≤ 1e-6.
TOL = {"renorm": {"token": 1e-6, "loss": 1e-6, "grad": 1e-6}, "tail": {"token": 1e-3, "loss": 1e-5, "grad": 5e-4}}
#: in-process support values against the naive float64 loop (fp32 log-softmax)
NAIVE_TOL = 1e-5


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(arith_checkpoint("smoke_teacher"))


@pytest.fixture(scope="module")
def teacher_model():
    return load_model(arith_checkpoint("smoke_teacher"))


@pytest.fixture(scope="module")
def student():
    return load_model(arith_checkpoint("smoke_student"))


@pytest.fixture(scope="module")
def rollouts(tok, student):
    examples = ArithTask(digits=2, eval_size=10, seed=0).eval_examples()[:5]
    examples = [*examples, Example("7+5=", answer="12")]  # a shorter prompt: left padding
    torch.manual_seed(0)
    return generate_rollouts(student, tok, examples, Sampling(max_new_tokens=6, samples_per_prompt=2, temperature=1.5))


@pytest.fixture(scope="module")
def server(teacher_model, tok):
    s = ThreadServer(teacher_app(teacher_model, tok, name="smoke-teacher"))
    yield s
    s.stop()


def _objective(norm: str, *, chunked: bool, student_temperature: float = 1.0, divergence: str = "rkl") -> Objective:
    cfg = load_config(None, ["support.kind=student_topk", f"support.k={K}", f"support.norm={norm}",
                             f"support.student_temperature={student_temperature}", f"route1.divergence={divergence}",
                             "route2.coef=0", f"route1.chunk_size={8 if chunked else 0}"])
    return Objective.from_config(cfg, eos_id=2, diagnostics=False)


def _loss_and_grads(student, objective, rollouts, feedback, chunked):
    student.zero_grad(set_to_none=True)
    out = objective(student_forward(student, rollouts, chunked=chunked), feedback, rollouts)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    return out.loss.detach(), out.token_stats["route1_divergence"].detach(), grads


def _naive_divergence(student, teacher_model, tok, rollouts, norm, tau_s, divergence):
    """Per position: S = the student's top-k, then the divergence on S from the full distributions."""
    with torch.no_grad():
        z_s = completion_forward(student, rollouts.prompt_ids_BP, rollouts.prompt_mask_BP,
                                 rollouts.completion_ids_BT, rollouts.completion_mask_BT).double()
    t_logp = torch.log_softmax(ModelTeacher(teacher_model, tok).score(rollouts, access="full").logits_BTV.double(), -1)
    s_logp = torch.log_softmax(z_s / tau_s, -1)
    out = torch.zeros(rollouts.completion_ids_BT.shape, dtype=torch.float64)
    for b, t in rollouts.completion_mask_BT.nonzero().tolist():
        ids = sorted(range(z_s.shape[-1]), key=lambda v: -float(z_s[b, t, v]))[:K]
        p = [math.exp(float(s_logp[b, t, v])) for v in ids]
        q = [math.exp(float(t_logp[b, t, v])) for v in ids]
        if norm == "renorm":
            p = [x / sum(p) for x in p]
            q = [x / sum(q) for x in q]
        else:
            p, q = [*p, 1 - sum(p)], [*q, 1 - sum(q)]
        if divergence == "rkl":
            out[b, t] = sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
        else:  # fkl
            out[b, t] = sum(qi * (math.log(qi) - math.log(pi)) for pi, qi in zip(p, q))
    return out


@pytest.mark.parametrize("norm", ["renorm", "tail"])
def test_build_support_on_carried_ids_matches_teacher_logits_and_a_loop(norm):
    """opd.math.support: ``student_topk_ids`` + the teacher's log-probs there as columns (odd shapes, a
    repeated id and ``-1`` padding) equal the full-teacher path and a naive loop, value and gradient."""
    from opd.math.divergences import reverse_kl
    from opd.math.support import SupportSpec, build_support

    torch.manual_seed(3)
    z_s = torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True)
    z_t = torch.randn(3, 5, 11, dtype=torch.float64)
    spec = SupportSpec(kind="student_topk", k=4, norm=norm, student_temperature=1.3)
    ids = (z_s.detach() / 1.3).topk(4, dim=-1).indices
    t_lp = torch.log_softmax(z_t, -1).gather(-1, ids)
    ref = build_support(z_s, spec, teacher_logits=z_t)
    got = build_support(z_s, spec, teacher_topk_ids=ids, teacher_topk_logprobs=t_lp, student_topk_ids=ids)
    d_ref = reverse_kl(ref.student_logp, ref.teacher_logp, ref.valid)
    d_got = reverse_kl(got.student_logp, got.teacher_logp, got.valid)
    torch.testing.assert_close(d_got, d_ref, rtol=0, atol=1e-12)
    (g_ref,) = torch.autograd.grad(d_ref.sum(), z_s)
    (g_got,) = torch.autograd.grad(d_got.sum(), z_s)
    torch.testing.assert_close(g_got, g_ref, rtol=0, atol=1e-12)

    # carried ids that are not the current top-k, with a repeat and padding: a loop over positions
    odd = ids.clone()
    odd[..., 0] = (odd[..., 0] + 3) % 11
    odd[0, 0, 2], odd[1, 2, 3] = odd[0, 0, 1], -1
    lp_cols = torch.log_softmax(z_t, -1).gather(-1, odd.clamp(min=0))
    sup = build_support(z_s, spec, teacher_topk_ids=odd, teacher_topk_logprobs=lp_cols, student_topk_ids=odd)
    d = reverse_kl(sup.student_logp, sup.teacher_logp, sup.valid)
    s_all, t_all = torch.log_softmax(z_s.detach() / 1.3, -1), torch.log_softmax(z_t, -1)
    for b in range(3):
        for t in range(5):
            S = list(dict.fromkeys(v for v in odd[b, t].tolist() if v >= 0))
            p = [math.exp(float(s_all[b, t, v])) for v in S]
            q = [math.exp(float(t_all[b, t, v])) for v in S]
            if norm == "renorm":
                p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
            else:
                p, q = [*p, 1 - sum(p)], [*q, 1 - sum(q)]
            want = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
            assert abs(float(d[b, t]) - want) <= 1e-10, (b, t)
    with pytest.raises(ValueError, match="student_topk_ids fix the support of kind 'student_topk' only"):
        build_support(z_s, replace(spec, kind="teacher_topk"), teacher_topk_ids=ids, teacher_topk_logprobs=t_lp,
                      student_topk_ids=ids)


def test_collected_ids_are_the_students_topk(student, rollouts):
    ids_BTK = student_topk_ids(student, rollouts, K, temperature=0.7)
    for chunked in (True, False):
        assert torch.equal(student_topk_ids(student, rollouts, K, chunked=chunked, micro_batch_size=3), ids_BTK)
    with torch.no_grad():
        z = completion_forward(student, rollouts.prompt_ids_BP, rollouts.prompt_mask_BP, rollouts.completion_ids_BT,
                               rollouts.completion_mask_BT)
    mask = rollouts.completion_mask_BT
    assert ids_BTK.shape == (*mask.shape, K) and (ids_BTK[~mask] == 0).all()
    for b, t in mask.nonzero().tolist():
        want = sorted(range(z.shape[-1]), key=lambda v: -float(z[b, t, v]))[:K]
        assert set(ids_BTK[b, t].tolist()) == set(want)


@pytest.mark.parametrize("norm", ["renorm", "tail"])
@pytest.mark.parametrize("chunked", [False, True], ids=["dense", "chunked"])
def test_served_student_topk_equals_in_process(server, tok, teacher_model, student, rollouts, norm, chunked):
    tau_s = 0.8
    remote = served(server.url, tok, vocab=17)
    fb = add_student_topk(remote, remote.score(rollouts, access="sampled"), rollouts, student, K,
                          temperature=tau_s, chunked=chunked)
    assert fb.logits_BTV is None and fb.topk_ids_BTK is None and fb.student_topk_ids_BTK.shape[-1] == K
    local = ModelTeacher(teacher_model, tok).score(rollouts, access="full")
    mask = rollouts.completion_mask_BT
    want_lp = torch.log_softmax(local.logits_BTV, -1).gather(-1, fb.student_topk_ids_BTK)
    assert (fb.student_topk_teacher_logprobs_BTK - want_lp)[mask].abs().max() <= 1e-6  # the same fp32 values

    tol = TOL[norm]
    for divergence in ("rkl", "fkl"):
        objective = _objective(norm, chunked=chunked, student_temperature=tau_s, divergence=divergence)
        loss_s, d_s, g_s = _loss_and_grads(student, objective, rollouts, fb, chunked)
        loss_l, d_l, g_l = _loss_and_grads(student, objective, rollouts, local, chunked)
        naive = _naive_divergence(student, teacher_model, tok, rollouts, norm, tau_s, divergence)
        assert loss_s > 0.1 and torch.isfinite(loss_s)
        assert abs(float(loss_s - loss_l)) <= tol["loss"] * abs(float(loss_l))
        assert (d_l.double() - naive)[mask].abs().max() <= NAIVE_TOL
        assert (d_s.double() - naive)[mask].abs().max() <= tol["token"] + NAIVE_TOL
        assert g_s.keys() == g_l.keys() and len(g_s) > 0
        for name in g_l:
            scale = float(g_l[name].abs().max())
            assert (g_s[name] - g_l[name]).abs().max() <= tol["grad"] * scale + 1e-9, name


def test_the_carried_ids_are_the_support(server, tok, student, rollouts):
    """Ids that are not the student's current top-k give another loss: the support is read from the feedback."""
    remote = served(server.url, tok, vocab=17)
    fb = add_student_topk(remote, remote.score(rollouts, access="sampled"), rollouts, student, K)
    objective = _objective("renorm", chunked=False)
    other = (fb.student_topk_ids_BTK + 5) % 17  # K other distinct ids per position
    fb_other = replace(fb, student_topk_ids_BTK=other,
                       student_topk_teacher_logprobs_BTK=remote.score_token_ids(rollouts, other))
    loss, _, _ = _loss_and_grads(student, objective, rollouts, fb, False)
    loss_other, _, _ = _loss_and_grads(student, objective, rollouts, fb_other, False)
    assert abs(float(loss - loss_other)) > 1e-3


def test_config_accepted_with_opd_protocol_refused_with_vllm():
    base = ["teacher.server=http://127.0.0.1:8001", "support.kind=student_topk", "support.k=4"]
    for norm in ("renorm", "tail"):
        cfg = validate_config(load_config(None, [*base, "teacher.protocol=opd", f"support.norm={norm}"]))
        assert resolve_teacher_access(cfg) == "sampled"  # no V-wide payload
    with pytest.raises(ConfigError) as err:
        validate_config(load_config(None, [*base, "teacher.protocol=vllm"]))
    lines = [m for m in err.value.args[0].splitlines() if "student_topk" in m]
    assert len(lines) == 1 and "teacher.protocol=opd" in lines[0] and "vLLM" in lines[0]
    # the in-process teacher still needs full logits for this support
    with pytest.raises(ConfigError, match="on support.kind=student_topk needs full"):
        validate_config(load_config(None, ["support.kind=student_topk", "teacher.access=topk"]))
    # several updates per batch: the support is the student's top-k at sampling time, and the user is told
    from opd.config.advice import config_warnings

    assert not config_warnings(load_config(None, [*base, "teacher.protocol=opd"]))
    said = config_warnings(load_config(None, [*base, "rollout.updates_per_rollout=2"]))
    assert len(said) == 1 and "top-k when the rollouts were scored" in said[0]
    # the sampler's weight snapshot is needed with overlap: refused with the vLLM engine
    with pytest.raises(ConfigError, match="rollout.overlap=false or rollout.engine=hf"):
        validate_config(load_config(None, [*base, "rollout.overlap=true", "rollout.engine=vllm"]))


@pytest.mark.parametrize("extra", [[], ["rollout.overlap=true", "route1.chunk_size=16", "teacher.cache=memory"]],
                         ids=["plain", "overlap-chunked-cached"])
def test_distill_with_a_served_teacher_on_the_students_topk(server, tmp_path, capsys, monkeypatch, extra):
    from opd.cli import main
    from opd.teachers.served import ServedTeacher

    asked: list[tuple[int, ...]] = []
    score_token_ids = ServedTeacher.score_token_ids

    def counting(self, rollouts, token_ids_BTK):
        asked.append(tuple(token_ids_BTK.shape))
        return score_token_ids(self, rollouts, token_ids_BTK)

    monkeypatch.setattr(ServedTeacher, "score_token_ids", counting)
    run = tmp_path / "run"
    code = main(["distill", "student.model=builtin:arith/smoke_student", f"teacher.server={server.url}",
                 "teacher.protocol=opd", "support.kind=student_topk", "support.k=4", "support.norm=tail",
                 "data.digits=2", "train.steps=2", "rollout.prompts_per_step=8", "eval.size=8", "eval.batch_size=8",
                 "train.threads=1", "logging.progress=false", "logging.report=false", f"logging.run_dir={run}", *extra])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "done", summary
    assert len(asked) == 2 and all(shape[-1] == 4 for shape in asked)  # one request per step, at the student's top-4
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss/route1" in r]
    assert len(train) == 2 and all(math.isfinite(r["loss/route1"]) and r["loss/route1"] > 0 for r in train)
