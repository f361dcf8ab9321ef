"""Teachers and chat prompts on the real pair (tests/helpers/real_pair.py: SmolLM2-135M-Instruct and a
3-of-30-block prune of it).

* **Three teachers, one feedback.** On the same student rollouts (chat_basics prompts, 10 sampled
  tokens), the in-process teacher, the served teacher over HTTP (the app ``opd serve-teacher`` runs,
  in a thread) and the vLLM teacher protocol give the same sampled-token log-probs and top-5 (ids
  and log-probs). The vLLM side is a stand-in HTTP server speaking vLLM's ``/v1/completions``
  (``prompt_logprobs``) whose numbers come from a real in-process ``vllm.LLM`` of the teacher: a real
  ``vllm serve`` takes ~60 s to start on 2 busy cores (tests/test_vllm.py checks the protocol against
  one, on a small model). Measured max |Δ| vs in-process: served 1.5e-5 (the in-process teacher's
  chunked head sums in another order), vLLM 6.4e-5 sampled / 4.1e-5 top-5 (its CPU kernels); bounds
  1e-4 / 3e-4.
* **The chat template's default system prompt.** SmolLM2's template writes "You are a helpful AI
  assistant named SmolLM, trained by Hugging Face" when a conversation has no system message: the
  student's and the teacher's prompts hold it; a teacher-only system prompt goes in front of it (the
  teacher reads the student's prompt plus that text); a row's own system message replaces it.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from opd.rollout import Sampling, generate_rollouts
from opd.teachers import ModelTeacher

#: |teacher − in-process teacher| on sampled and top-5 log-probs
SERVED_TOL, VLLM_TOL = 1e-4, 3e-4
K = 5
DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def rollouts(real_pair):
    torch.manual_seed(0)
    return generate_rollouts(real_pair.student(), real_pair.tokenizer, real_pair.examples(4),
                             Sampling(max_new_tokens=10, samples_per_prompt=2, temperature=1.0))


def _vllm_standin(llm, tokenizer):
    """vLLM's OpenAI API for a teacher (models, tokenize, completions with prompt_logprobs), answered
    by ``llm``; the JSON is laid out as ``vllm serve`` lays it out."""
    from vllm import SamplingParams

    from tests.test_serve_faults import Scripted, ok

    def handle(method, path, body, n):
        if path == "/v1/models":
            return ok({"data": [{"id": "smollm2"}]})
        if path == "/tokenize":
            return ok({"tokens": tokenizer(body["prompt"]).input_ids})
        params = SamplingParams(max_tokens=1, temperature=float(body.get("temperature", 1.0)),
                                prompt_logprobs=int(body["prompt_logprobs"]), detokenize=False)
        outs = llm.generate([{"prompt_token_ids": p} for p in body["prompt"]], params, use_tqdm=False)
        choices = [{"index": i, "prompt_logprobs": [
            None if pos is None else {str(t): {"logprob": float(lp.logprob), "rank": lp.rank, "decoded_token": None}
                                      for t, lp in pos.items()} for pos in out.prompt_logprobs]}
            for i, out in enumerate(outs)]
        return ok({"choices": choices})

    return Scripted(handle)


def _diffs(got, want, mask):
    out = {"sampled": float((got.sampled_logprobs_BT - want.sampled_logprobs_BT)[mask].abs().max())}
    if want.topk_ids_BTK is not None:
        assert torch.equal(got.topk_ids_BTK[mask], want.topk_ids_BTK[mask])
        out["topk"] = float((got.topk_logprobs_BTK - want.topk_logprobs_BTK)[mask].abs().max())
    return out


def test_in_process_served_and_vllm_teachers_give_the_same_feedback(real_pair, rollouts, request):
    from opd.serve.client import ServiceClient
    from opd.teachers.served import ServedTeacher
    from opd.teachers.served_backends import VLLMBackend
    from tests.test_serve import ThreadServer, served, teacher_app

    p, ro = real_pair, rollouts
    tok, v = p.tokenizer, p.teacher.config.vocab_size
    mask = ro.completion_mask_BT
    assert v == 49152 and int(mask.sum()) >= 8 * 5
    local = ModelTeacher(p.teacher, tok)
    server = ThreadServer(teacher_app(p.teacher, tok, name="smollm2-135m-instruct"))
    teachers = {"served": (served(server.url, tok, vocab=v), SERVED_TOL)}
    standin = None
    if importlib.util.find_spec("vllm") is not None:
        standin = _vllm_standin(request.getfixturevalue("real_teacher_llm"), tok)
        backend = VLLMBackend(ServiceClient(standin.url, role="teacher server", retries=0), tok, vocab_size=v)
        teachers["vllm"] = (ServedTeacher(backend, tok, vocab_size=v), VLLM_TOL)
    measured = {}
    try:
        for access in ("sampled", "topk"):
            want = local.score(ro, access=access, topk=K)
            for name, (teacher, tol) in teachers.items():
                d = _diffs(teacher.score(ro, access=access, topk=K), want, mask)
                measured[f"{name}/{access}"] = d
    finally:
        server.stop()
        if standin is not None:
            standin.close()
    print(json.dumps(measured))
    for key, d in measured.items():
        assert max(d.values()) <= teachers[key.split("/")[0]][1], (key, d)


def _chat_task(pair, tmp_path, rows, **fmt):
    from opd.chat import ChatFormat
    from opd.data import JsonlTask, RecordLayout

    path, train = tmp_path / "rows.jsonl", tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "Hello"}]}) + "\n")
    return JsonlTask(train, eval_path=path, layout=RecordLayout(answer_field=None,
                                                               chat=ChatFormat(tokenizer=pair.tokenizer, **fmt)))


def test_the_templates_default_system_prompt_is_kept_for_student_and_teacher(real_pair, tmp_path):
    from opd.chat import default_system_prompt
    from opd.teachers.base import teacher_prompt_texts

    tok = real_pair.tokenizer
    assert default_system_prompt(tok) == DEFAULT
    user = {"role": "user", "content": "What is the capital of Peru? Answer with the city name only."}
    answer = {"role": "assistant", "content": "Lima"}
    rows = [{"messages": [user, answer]},
            {"messages": [{"role": "system", "content": "Be brief."}, user, answer]}]
    plain, own = _chat_task(real_pair, tmp_path, rows).eval_examples()
    head = f"<|im_start|>system\n{DEFAULT}<|im_end|>\n"
    turn = f"<|im_start|>user\n{user['content']}<|im_end|>\n<|im_start|>assistant\n"
    assert plain.prompt == head + turn  # what the model reads in any chat front end
    assert own.prompt == "<|im_start|>system\nBe brief.<|im_end|>\n" + turn  # a row's own system message replaces it
    # without teacher-only context the teacher reads exactly the student's prompt
    assert teacher_prompt_texts([plain, own], use_context=False) == [plain.prompt, own.prompt]

    extra = "Answer with one word."
    plain_t, own_t = _chat_task(real_pair, tmp_path, rows, system_prompt=extra).eval_examples()
    assert (plain_t.prompt, own_t.prompt) == (plain.prompt, own.prompt)  # the student never sees it
    # the teacher reads the student's prompt with the teacher-only text in front of the system message's content
    assert plain_t.teacher_prompt == f"<|im_start|>system\n{extra}\n\n{DEFAULT}<|im_end|>\n" + turn
    assert own_t.teacher_prompt == f"<|im_start|>system\n{extra}\n\nBe brief.<|im_end|>\n" + turn
    # a teacher with its own tokenizer renders the messages with its template (here the same one): the same text
    assert teacher_prompt_texts([plain_t, own_t], use_context=True, tokenizer=tok) == [plain_t.teacher_prompt,
                                                                                       own_t.teacher_prompt]


@pytest.mark.parametrize("default_block, want_default", [
    ("{{ '<s>Be kind.' + eos_token }}", "Be kind."),  # a default system prompt (SmolLM2, Qwen2.5 style)
    ("{{ '<s>' + eos_token }}", ""),  # an empty system block: nothing to keep
    ("", None),  # no default at all
])
def test_teacher_messages_keep_a_templates_default_after_the_teacher_text(default_block, want_default):
    """No model needed: a template that writes ``default_block`` when no system message is given."""
    from opd.chat import default_system_prompt, render_prompt, teacher_messages
    from opd.tokenization import char_tokenizer

    tok = char_tokenizer("ab", bos="^", eos="$", pad="_", unk="?")
    tok.chat_template = ("{% if messages[0]['role'] != 'system' %}" + default_block + "{% endif %}"
                         "{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                         "{% if add_generation_prompt %}<a>{% endif %}")
    assert default_system_prompt(tok) == want_default
    user = [{"role": "user", "content": "q"}]
    got = render_prompt(tok, teacher_messages(tok, user, "T"))
    assert got == ("<s>T\n\nBe kind.$<u>q$<a>" if want_default else "<s>T$<u>q$<a>")
    own = [{"role": "system", "content": "S"}, *user]
    assert render_prompt(tok, teacher_messages(tok, own, "T")) == "<s>T\n\nS$<u>q$<a>"
    assert teacher_messages(tok, user, None) == user
