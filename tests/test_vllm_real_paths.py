"""``rollout.engine=vllm`` on the real pair (tests/helpers/real_pair.py: SmolLM2-135M-Instruct and a
3-of-30-block prune of it; V = 49,152, tied embeddings, RoPE, pad = eos = ``<|im_end|>``).

* after a push of *changed* weights (every tensor perturbed), vLLM's greedy tokens equal the changed
  HF model's, and its sampled-token log-probs equal opd's recomputation ``log μ(y_t)`` (a student
  forward on the same tokens) — measured max |Δ| ≤ 3.8e-5 (vLLM's CPU kernels vs HF's eager forward,
  fp32), bound 2e-4; during the push vLLM's "Failed to load weights" warning names ``RotaryEmbedding``
  only (no trained module is left without its weights; the rotary table is computed from the config);
* a LoRA student's push carries the merged weights ``W + (α/r)·B A`` (vLLM then samples from the
  trained student, not from its base);
* ``opd distill rollout.engine=vllm`` trains on the pair (the session's engine is reused);
* the pad = eos preflight message tells the truth for both engines: greedy answers of the real
  teacher end in ``<|im_end|>`` and the completion mask keeps it, with the hf and the vllm engine.
"""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

from opd.rollout.engine import HFEngine, Sampling
from opd.tokenization import compare_tokenizers
from tests.test_vllm import _recomputed_log_mu

# located, not imported: importing vLLM before opd does would leave its logging unquieted
pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed (pip install -e '.[vllm]')")

#: |vLLM − opd| on sampled-token log-probs (measured ≤ 3.8e-5 after pushes of changed weights, τ = 1 and τ = 0.8 with top-k / top-p)
LOGP_TOL = 2e-4


def _engine(pair, llm, **kw):
    from opd.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(str(pair.student_dir), pair.tokenizer, llm=llm, **kw)


def _restore(pair, llm):
    _engine(pair, llm).sync_weights(pair.student())


def _perturb(model, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.abs().mean())
    return model


def test_pushed_changed_weights_are_complete_and_log_probs_equal_opds(real_pair, real_student_llm, monkeypatch):
    from opd.rollout.vllm_engine import ROTARY_RELOAD_FILTER

    p, llm = real_pair, real_student_llm
    examples = p.examples(4)
    greedy = Sampling(max_new_tokens=12, greedy=True)
    engine = _engine(p, llm)
    engine.sync_weights(p.student())
    before = engine.generate(examples, greedy)
    changed = _perturb(p.student())
    reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    unfilled: list[str] = []  # modules vLLM says received no weights (its logger's filter sees every record)
    keep = ROTARY_RELOAD_FILTER.filter
    monkeypatch.setattr(ROTARY_RELOAD_FILTER, "filter", lambda record: (
        unfilled.append(str(record.args[0])) if record.msg == "%s: Failed to load weights" else None) or keep(record))
    level = reload_log.level
    reload_log.setLevel(logging.WARNING)  # opd runs vLLM's loggers at ERROR: the warning would not be formed
    try:
        engine.sync.pushes = 0
        engine.sync_weights(changed)
    finally:
        reload_log.setLevel(level)
        monkeypatch.undo()
    try:
        # vLLM warns once per module that received nothing: the rotary table only (issue 18, docs/real_models.md)
        assert unfilled == ["RotaryEmbedding"]
        got, want = engine.generate(examples, greedy), HFEngine(changed, p.tokenizer).generate(examples, greedy)
        assert not torch.equal(got.completion_ids_BT, before.completion_ids_BT)  # the push changed the policy
        assert torch.equal(got.completion_ids_BT, want.completion_ids_BT)
        assert torch.equal(got.completion_mask_BT, want.completion_mask_BT)
        assert (got.behaviour_logprobs_BT - want.behaviour_logprobs_BT).abs().max() <= LOGP_TOL
        for s in (Sampling(max_new_tokens=12, samples_per_prompt=2, temperature=1.0),
                  Sampling(max_new_tokens=12, samples_per_prompt=2, temperature=0.8, top_k=50, top_p=0.9)):
            torch.manual_seed(0)
            sampled = engine.generate(examples, s)
            mask = sampled.completion_mask_BT
            mu = _recomputed_log_mu(changed, sampled, s)
            assert int(mask.sum()) >= 8 * 6 and torch.isfinite(mu[mask]).all()
            diff = float((sampled.behaviour_logprobs_BT - mu)[mask].abs().max())
            print(f"vLLM vs opd log mu after a push (tau={s.temperature}, top_k={s.top_k}): max |diff| {diff:.3g}")
            assert diff <= LOGP_TOL, (s, diff)
    finally:
        _restore(p, llm)


def test_a_lora_students_push_carries_the_merged_weights(real_pair, real_student_llm):
    from opd.lora import LoraSettings, apply_lora, is_lora

    p, llm = real_pair, real_student_llm
    student = apply_lora(p.student(), LoraSettings(rank=4, alpha=8.0, dropout=0.0, target_modules=("all-linear",)))
    assert is_lora(student)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained adapter: B ≠ 0 moves the outputs away from the base model's
        for name, w in student.named_parameters():
            if ".lora_B." in name:
                w.copy_(torch.randn(w.shape, generator=g) * 0.05)
    examples = p.examples(4)
    greedy = Sampling(max_new_tokens=12, greedy=True)
    engine = _engine(p, llm)
    try:
        engine.sync_weights(student)
        got = engine.generate(examples, greedy)
        want = HFEngine(student, p.tokenizer).generate(examples, greedy)
        base = HFEngine(p.student(), p.tokenizer).generate(examples, greedy)
        assert not torch.equal(want.completion_ids_BT, base.completion_ids_BT)
        assert torch.equal(got.completion_ids_BT, want.completion_ids_BT)
        assert (got.behaviour_logprobs_BT - want.behaviour_logprobs_BT).abs().max() <= LOGP_TOL
    finally:
        _restore(p, llm)


def test_distill_with_the_vllm_engine_trains_on_the_real_pair(real_pair, real_student_llm, tmp_path, monkeypatch):
    import vllm

    from opd.config import load_config
    from opd.metrics_log import read_metrics
    from opd.train import distill

    p, llm = real_pair, real_student_llm
    started: list[dict] = []

    def shared(**kwargs):  # the run's engine is the session's (a second start costs ~20 s)
        started.append(kwargs)
        return llm

    monkeypatch.setattr(vllm, "LLM", shared)
    run = tmp_path / "run"
    try:
        summary = distill(load_config(None, p.overrides(run, **{"rollout.engine": "vllm"})))
    finally:
        _restore(p, llm)
    assert summary.status == "done" and summary.steps_done == 2
    assert len(started) == 1 and started[0]["model"] == str(p.student_dir) and started[0]["max_model_len"] == 128
    rows = read_metrics(run, "train")
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) and r["loss"] > 0 for r in rows)
    assert rows[1]["teacher_kl"] < rows[0]["teacher_kl"]  # the pushed updates reach the sampler


@pytest.mark.parametrize("engine_name", ["hf", "vllm"])
def test_the_pad_eos_message_is_true_for_each_engine(real_pair, real_teacher_llm, engine_name):
    """pad = eos = ``<|im_end|>``: the preflight says the EOS stays in the loss with either engine; the
    real teacher's greedy answers (which stop) show it does."""
    from opd.rollout.vllm_engine import VLLMEngine

    p = real_pair
    tok = p.tokenizer
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    message = compare_tokenizers(tok, tok, chat=True).warnings
    assert len(message) == 2 and all("harmless in opd (with the hf and vllm engines alike, a completion's mask "
                                     "ends at its first stop token and keeps that EOS in the loss" in m for m in message)
    engine = (HFEngine(p.teacher, tok) if engine_name == "hf"
              else VLLMEngine(str(p.teacher_dir), tok, llm=real_teacher_llm))
    r = engine.generate(p.examples(4), Sampling(max_new_tokens=16, greedy=True))
    ids, mask = r.completion_ids_BT, r.completion_mask_BT
    stopped = ~r.truncated_B
    assert int(stopped.sum()) >= 3  # the teacher answers these in a few tokens
    for row in stopped.nonzero().flatten().tolist():
        first = int((ids[row] == tok.eos_token_id).nonzero()[0])
        assert mask[row, first] and not mask[row, first + 1:].any()  # the EOS is in the loss, padding is not
        assert int(mask[row].sum()) == first + 1


def test_the_server_engines_weight_file_holds_a_lora_students_merged_weights(tmp_path):
    """``write_weights`` (the vLLM server engine's push): the plain model's names, merged values."""
    from safetensors.torch import load_file

    from opd.lora import LoraSettings, apply_lora, merged_state_dict
    from opd.models import build_model, tiny_llama_config
    from opd.rollout.vllm_engine import write_weights

    plain = build_model(tiny_llama_config(17, layers=1, hidden=32, heads=1), seed=0)
    names = set(plain.state_dict())
    student = apply_lora(plain, LoraSettings(rank=2, alpha=4.0))
    with torch.no_grad():
        for name, w in student.named_parameters():
            if ".lora_B." in name:
                w.fill_(0.1)
    written = load_file(str(write_weights(student, tmp_path) / "model.safetensors"))
    want = merged_state_dict(student)
    assert set(written) == names == set(want)
    assert all(torch.equal(written[k], want[k]) for k in names)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(written[q], student.state_dict()["model.layers.0.self_attn.q_proj.base_layer.weight"])
