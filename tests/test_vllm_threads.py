"""An in-process vLLM engine follows opd's thread count (issue 18.5: a vLLM run beside other work).

vLLM's CPU worker replaces ``torch.set_num_threads`` with a function that only warns, and its CPU
attention checks that the count it planned a call with is the count the call runs with. opd changes the
count between steps, in the thread that calls the engine, through torch's own setter
(:func:`opd.threads.apply_threads`): the engine then runs with the new count, and its results do not
change (greedy tokens equal at 2 → 1 → 2 threads, on the demo student and on the real pair's). A whole
``opd distill rollout.engine=vllm`` whose governor changes the count at every step runs to the end.
"""

from __future__ import annotations

import json

import pytest
import torch

from opd.models import load_tokenizer
from opd.rollout.engine import Sampling
from opd.tasks.arith import ArithTask, arith_checkpoint
from opd.threads import apply_threads, available_cpus

STUDENT = str(arith_checkpoint("student"))


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    apply_threads(n)


@pytest.fixture(scope="module")
def demo_engine():
    from opd.rollout.vllm_engine import VLLMEngine, import_vllm

    vllm = import_vllm()
    llm = vllm.LLM(model=STUDENT, dtype="float32", max_model_len=64, enforce_eager=True, seed=0,
                   gpu_memory_utilization=0.1, logprobs_mode="processed_logprobs")
    return VLLMEngine(STUDENT, load_tokenizer(STUDENT), llm=llm)


def _greedy_at(engine, examples, counts, max_new_tokens):
    out = []
    for n in counts:
        apply_threads(n)
        assert torch.get_num_threads() == n
        rollouts = engine.generate(examples, Sampling(max_new_tokens=max_new_tokens, greedy=True))
        out.append(rollouts.completion_ids_BT[rollouts.completion_mask_BT.bool()].tolist())
    return out


def test_the_count_changes_between_calls_and_the_tokens_do_not(demo_engine):
    examples = ArithTask(digits=3, eval_size=64, seed=0).eval_examples()[:32]
    first, fewer, back = _greedy_at(demo_engine, examples, (2, 1, 2), 8)
    assert first == fewer == back and len(first) > 32


def test_the_same_on_the_real_pair(real_pair, real_student_llm):
    from opd.rollout.vllm_engine import VLLMEngine
    from opd.tasks.chat_basics import ChatBasicsTask

    tok = load_tokenizer(real_pair.student_dir)
    engine = VLLMEngine(real_pair.student_dir, tok, llm=real_student_llm)
    examples = ChatBasicsTask(tok).train_examples(0, 6, 0)
    first, fewer, back = _greedy_at(engine, examples, (2, 1, 2), 12)
    assert first == fewer == back and len(first) > 6


@pytest.mark.skipif(available_cpus() < 2, reason="the governor needs two CPUs to change the count")
def test_a_vllm_run_whose_governor_changes_the_count_every_step(tmp_path, monkeypatch):
    import opd.threads
    from opd.config.load import load_config
    from opd.train import distill

    counts = iter([1, 2, 1, 2, 1, 2, 1, 2])
    # the real governor decides whether it runs (enabled: opd chose the count and may adapt it beside vLLM);
    # when it runs it reports a change at every step, as on a machine whose load keeps changing
    monkeypatch.setattr(opd.threads.ThreadGovernor, "poll", lambda self: next(counts) if self.enabled else None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # unset: opd chooses the count and may adapt it
    run = tmp_path / "run"
    cfg = load_config(None, ["train.steps=4", "rollout.prompts_per_step=16", "eval.size=32", "logging.progress=false",
                             "logging.report=false", f"logging.run_dir={run}", "rollout.engine=vllm"])
    summary = distill(cfg)
    assert summary.status == "done" and summary.steps_done == 4
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["threads"] for r in records if r["kind"] == "threads"] == [1, 2, 1, 2]
