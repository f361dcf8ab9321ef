"""Rollout engine: the shared completion forward, samplers, off-policy rollouts and batching.

Every value is compared with a naive reference written here: a per-row forward of the unpadded
``prompt ++ completion`` and explicit temperature / top-k / top-p / mixture formulas.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from opd.models import build_model, tiny_llama_config
from opd.rollout import (
    HeadNotLinearError,
    Sampling,
    completion_forward,
    concat_rollouts,
    encode_prompts,
    generate_mixed_rollouts,
    generate_rollouts,
    lm_head_of,
    rollouts_from_texts,
)
from opd.tasks.base import Example
from opd.tokenization import char_tokenizer

ALPHABET = "0123456789+=|"
EXAMPLES = [Example("12+3="), Example("1+2222="), Example("7="), Example("45+67=")]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(ALPHABET)


def _model(tok, seed: int, eos_bias: float | None = None, layers: int = 2, hidden: int = 32):
    model = build_model(tiny_llama_config(len(tok), layers=layers, hidden=hidden, tokenizer=tok), seed=seed)
    if eos_bias is not None:
        # An untied head with a bias: EOS becomes likely, and lm_head_of must return the bias.
        head = nn.Linear(hidden, len(tok), bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.zero_()
            head.bias[tok.eos_token_id] = eos_bias
        model.lm_head = head
    return model


@pytest.fixture(scope="module")
def student(tok):
    return _model(tok, seed=1, eos_bias=1.5)


@pytest.fixture(scope="module")
def teacher(tok):
    return _model(tok, seed=2, eos_bias=1.0, layers=1)


def _row_reference(model, prompt_ids, prompt_mask, completion_ids, completion_mask, b, output="logits"):
    """Outputs predicting row ``b``'s completion tokens from its unpadded sequence, alone."""
    p = prompt_ids[b][prompt_mask[b].bool()]
    c = completion_ids[b][completion_mask[b].bool()]
    ids = torch.cat([p, c])[None]
    with torch.no_grad():
        if output == "logits":
            out = model(input_ids=ids).logits[0]
        else:
            out = model.model(input_ids=ids).last_hidden_state[0]
    return out[len(p) - 1: len(p) - 1 + len(c)]


def _random_completions(tok, b: int, t: int, gen: torch.Generator):
    ids = torch.randint(4, len(tok), (b, t), generator=gen)
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    lengths[0] = t
    mask = torch.arange(t)[None] < lengths[:, None]
    return torch.where(mask, ids, torch.full_like(ids, tok.pad_token_id)), mask


@pytest.mark.parametrize("output", ["logits", "hidden"])
def test_completion_forward_matches_unpadded_rows(tok, student, output):
    gen = torch.Generator().manual_seed(0)
    prompt_ids, prompt_mask = encode_prompts(tok, [e.prompt for e in EXAMPLES])
    assert (prompt_mask[:, -1] == 1).all() and (prompt_mask[:, 0] == 0).any()  # left-padded
    completion_ids, completion_mask = _random_completions(tok, len(EXAMPLES), 5, gen)
    with torch.no_grad():
        out = completion_forward(student, prompt_ids, prompt_mask, completion_ids, completion_mask, output=output)
    width = len(tok) if output == "logits" else 32
    assert out.shape == (len(EXAMPLES), 5, width)
    for b in range(len(EXAMPLES)):
        ref = _row_reference(student, prompt_ids, prompt_mask, completion_ids, completion_mask, b, output)
        torch.testing.assert_close(out[b, : len(ref)], ref, atol=1e-5, rtol=1e-5)


def test_completion_forward_gradient_matches_unpadded_rows(tok):
    model = _model(tok, seed=5, eos_bias=0.5)
    prompt_ids, prompt_mask = encode_prompts(tok, [e.prompt for e in EXAMPLES])
    completion_ids, completion_mask = _random_completions(tok, len(EXAMPLES), 4, torch.Generator().manual_seed(2))

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    logprobs = torch.log_softmax(
        completion_forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask).float(), -1)
    picked = logprobs.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    batched = grads(torch.where(completion_mask, picked, torch.zeros(())).sum())
    loss = torch.zeros(())
    for b in range(len(EXAMPLES)):
        p = prompt_ids[b][prompt_mask[b].bool()]
        c = completion_ids[b][completion_mask[b]]
        lp = torch.log_softmax(model(input_ids=torch.cat([p, c])[None]).logits[0].float(), -1)
        loss = loss + lp[len(p) - 1: len(p) - 1 + len(c)].gather(-1, c[:, None]).sum()
    for g_batched, g_ref in zip(batched, grads(loss)):
        torch.testing.assert_close(g_batched, g_ref, atol=1e-5, rtol=1e-4)


def test_completion_forward_position_ids_ignore_left_padding(tok, student):
    seen = {}

    def hook(module, args, kwargs):
        seen["pos"], seen["mask"] = kwargs["position_ids"], kwargs["attention_mask"]

    handle = student.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        prompt_ids, prompt_mask = encode_prompts(tok, ["1=", "12345+6="])
        completion_ids = torch.tensor([[5, 6, 2], [7, 2, 0]])
        completion_mask = torch.tensor([[True, True, True], [True, True, False]])
        with torch.no_grad():
            completion_forward(student, prompt_ids, prompt_mask, completion_ids, completion_mask)
    finally:
        handle.remove()
    pos, mask = seen["pos"], seen["mask"]
    for b in range(2):
        real = mask[b].bool()
        assert pos[b][real].tolist() == list(range(int(real.sum())))


def test_lm_head_of_reproduces_logits(tok, student):
    prompt_ids, prompt_mask = encode_prompts(tok, [e.prompt for e in EXAMPLES])
    completion_ids, completion_mask = _random_completions(tok, len(EXAMPLES), 4, torch.Generator().manual_seed(1))
    args = (student, prompt_ids, prompt_mask, completion_ids, completion_mask)
    with torch.no_grad():
        logits = completion_forward(*args)
        hidden = completion_forward(*args, output="hidden")
    weight, bias = lm_head_of(student)
    assert bias is not None
    torch.testing.assert_close(hidden @ weight.T + bias, logits, atol=1e-5, rtol=1e-5)


def test_lm_head_of_refuses_non_linear_heads(tok):
    capped = _model(tok, seed=0)
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(HeadNotLinearError, match="final_logit_softcapping=30.0"):
        lm_head_of(capped)
    scaled = _model(tok, seed=0)
    scaled.config.logit_scale = 0.0625
    with pytest.raises(HeadNotLinearError, match="logit_scale"):
        lm_head_of(scaled)
    wrapped = _model(tok, seed=0)
    wrapped.lm_head = nn.Sequential(nn.Linear(32, len(tok)))
    with pytest.raises(HeadNotLinearError, match="Sequential"):
        lm_head_of(wrapped)


def test_completion_forward_rejects_right_padded_prompts(tok, student):
    ids = torch.tensor([[1, 5, 0]])
    with pytest.raises(ValueError, match="left padding"):
        completion_forward(student, ids, torch.tensor([[1, 1, 0]]), torch.tensor([[5]]), torch.tensor([[True]]))
    with pytest.raises(ValueError, match="rows"):
        completion_forward(student, ids, torch.ones_like(ids), torch.tensor([[5], [6]]), torch.ones(2, 1, dtype=torch.bool))


def _check_layout(r, tok, n_prompts: int, g: int, offset: int = 0):
    eos = tok.eos_token_id
    assert r.group_index_B.tolist() == [i + offset for i in range(n_prompts) for _ in range(g)]
    assert [e.prompt for e in r.examples] == [e.prompt for e in EXAMPLES[:n_prompts] for _ in range(g)]
    prompt_ids, _ = encode_prompts(tok, [e.prompt for e in EXAMPLES[:n_prompts]])
    assert torch.equal(r.prompt_ids_BP, prompt_ids.repeat_interleave(g, 0))
    for b in range(r.batch_size):
        ids, mask = r.completion_ids_BT[b].tolist(), r.completion_mask_BT[b].tolist()
        first_eos = ids.index(eos) if eos in ids else None
        expected = [first_eos is None or t <= first_eos for t in range(len(ids))]
        assert mask == expected, (ids, mask)
        assert all(i == tok.pad_token_id for i, m in zip(ids, mask) if not m)
        assert (r.behaviour_logprobs_BT[b][~r.completion_mask_BT[b]] == 0).all()


def test_generate_rollouts_layout_eos_and_truncation(tok, student):
    torch.manual_seed(3)
    r = generate_rollouts(student, tok, EXAMPLES, Sampling(max_new_tokens=5, samples_per_prompt=3), group_offset=10)
    assert r.batch_size == 12 and r.completion_ids_BT.shape[1] <= 5
    _check_layout(r, tok, 4, 3, offset=10)
    has_eos = (r.completion_ids_BT == tok.eos_token_id).any(dim=1)
    assert torch.equal(r.truncated_B, ~has_eos)
    assert r.truncated_B.any() and (~r.truncated_B).any()  # both cases occur at this seed
    assert r.on_policy_B.all()
    torch.manual_seed(3)
    again = generate_rollouts(student, tok, EXAMPLES, Sampling(max_new_tokens=5, samples_per_prompt=3),
                              group_offset=10)
    assert torch.equal(again.completion_ids_BT, r.completion_ids_BT)  # the global RNG drives sampling


def test_prefix_rollouts_are_short_and_not_truncated(tok, student):
    torch.manual_seed(0)
    r = generate_rollouts(student, tok, EXAMPLES, Sampling(max_new_tokens=6, samples_per_prompt=2, prefix_tokens=2))
    assert r.completion_ids_BT.shape[1] <= 2
    assert not r.truncated_B.any()
    _check_layout(r, tok, 4, 2)


def _reference_logprobs(model, r, temperature=1.0, top_k=0, top_p=1.0):
    """log μ(y_t) from a full forward: temperature, then top-k, then top-p (naive loops)."""
    with torch.no_grad():
        logits = completion_forward(model, r.prompt_ids_BP, r.prompt_mask_BP, r.completion_ids_BT,
                                    r.completion_mask_BT).float() / temperature
    out = torch.zeros(r.completion_ids_BT.shape)
    for b in range(r.batch_size):
        for t in range(r.completion_ids_BT.shape[1]):
            if not r.completion_mask_BT[b, t]:
                continue
            z = logits[b, t].clone()
            if top_k:
                kth = torch.sort(z, descending=True).values[top_k - 1]
                z[z < kth] = -float("inf")
            if top_p < 1:
                probs = torch.softmax(z, -1)
                order = torch.argsort(probs, descending=True)
                keep, mass = [], 0.0
                for i in order.tolist():  # smallest prefix whose mass reaches top_p
                    keep.append(i)
                    mass += probs[i].item()
                    if mass >= top_p:
                        break
                dropped = torch.ones_like(z, dtype=torch.bool)
                dropped[keep] = False
                z[dropped] = -float("inf")
            out[b, t] = torch.log_softmax(z, -1)[r.completion_ids_BT[b, t]]
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8)])
def test_behaviour_logprobs_are_the_processed_distribution(tok, student, temperature, top_k, top_p):
    torch.manual_seed(1)
    r = generate_rollouts(student, tok, EXAMPLES,
                          Sampling(max_new_tokens=5, samples_per_prompt=2, temperature=temperature, top_p=top_p,
                                   top_k=top_k))
    ref = _reference_logprobs(student, r, temperature, top_k, top_p)
    torch.testing.assert_close(r.behaviour_logprobs_BT, ref, atol=1e-5, rtol=0)


def test_greedy_picks_the_argmax_of_completion_forward(tok, student):
    r = generate_rollouts(student, tok, EXAMPLES, Sampling(max_new_tokens=5, greedy=True))
    with torch.no_grad():
        logits = completion_forward(student, r.prompt_ids_BP, r.prompt_mask_BP, r.completion_ids_BT,
                                    r.completion_mask_BT)
    m = r.completion_mask_BT
    assert torch.equal(logits.argmax(-1)[m], r.completion_ids_BT[m])
    torch.testing.assert_close(r.behaviour_logprobs_BT, _reference_logprobs(student, r), atol=1e-5, rtol=0)


def test_generate_rollouts_restores_train_mode_and_rejects_bad_knobs(tok, student):
    student.train()
    try:
        generate_rollouts(student, tok, EXAMPLES[:1], Sampling(max_new_tokens=2))
        assert student.training
    finally:
        student.eval()
    with pytest.raises(ValueError, match="temperature"):
        generate_rollouts(student, tok, EXAMPLES, Sampling(max_new_tokens=2, temperature=0.0))
    with pytest.raises(ValueError, match="top_p"):
        generate_rollouts(student, tok, EXAMPLES, Sampling(max_new_tokens=2, top_p=0.0))
    with pytest.raises(ValueError, match="no examples"):
        generate_rollouts(student, tok, [], Sampling(max_new_tokens=2))


def _teacher_reference(teacher, tok, r, texts, temperature):
    """log softmax(teacher logits / τ) at the sampled tokens, teacher reading ``texts``."""
    ids, mask = encode_prompts(tok, [t for t in texts for _ in range(r.batch_size // len(texts))])
    with torch.no_grad():
        logits = completion_forward(teacher, ids, mask, r.completion_ids_BT, r.completion_mask_BT).float()
    return torch.log_softmax(logits / temperature, -1)


def _gather(logprobs_BTV, r):
    lp = logprobs_BTV.gather(-1, r.completion_ids_BT.unsqueeze(-1)).squeeze(-1)
    return torch.where(r.completion_mask_BT, lp, torch.zeros(()))


def test_mixed_sampling_alpha_identities(tok, student, teacher):
    texts = ["9|" + e.prompt for e in EXAMPLES]  # the teacher reads a privileged prefix
    temperature = 0.8
    sampling = Sampling(samples_per_prompt=2, max_new_tokens=5, temperature=temperature)
    kwargs = dict(teacher_prompt_texts=texts)
    torch.manual_seed(5)
    r0 = generate_mixed_rollouts(student, teacher, tok, EXAMPLES, sampling, alpha=0.0, **kwargs)
    _check_layout(r0, tok, 4, 2)
    s_lp = _reference_logprobs(student, r0, temperature)
    torch.testing.assert_close(r0.behaviour_logprobs_BT, s_lp, atol=1e-5, rtol=0)

    torch.manual_seed(5)
    r1 = generate_mixed_rollouts(student, teacher, tok, EXAMPLES, sampling, alpha=1.0, **kwargs)
    t_lp = _gather(_teacher_reference(teacher, tok, r1, texts, temperature), r1)
    torch.testing.assert_close(r1.behaviour_logprobs_BT, t_lp, atol=1e-5, rtol=0)

    torch.manual_seed(5)
    rh = generate_mixed_rollouts(student, teacher, tok, EXAMPLES, sampling, alpha=0.3, **kwargs)
    with torch.no_grad():
        s_logits = completion_forward(student, rh.prompt_ids_BP, rh.prompt_mask_BP, rh.completion_ids_BT,
                                      rh.completion_mask_BT).float()
    mix = 0.3 * _teacher_reference(teacher, tok, rh, texts, temperature).exp() + 0.7 * torch.softmax(
        s_logits / temperature, -1)
    torch.testing.assert_close(rh.behaviour_logprobs_BT, _gather(mix.log(), rh), atol=1e-5, rtol=0)
    # The student's prompt never contains the teacher's prefix.
    assert not (r1.prompt_ids_BP == tok.convert_tokens_to_ids("|")).any()


def test_mixed_sampling_filters_like_generate(tok, student, teacher):
    torch.manual_seed(2)
    r = generate_mixed_rollouts(student, teacher, tok, EXAMPLES,
                                Sampling(max_new_tokens=4, samples_per_prompt=2, temperature=1.2, top_p=0.85, top_k=6),
                                alpha=0.0)
    ref = _reference_logprobs(student, r, 1.2, top_k=6, top_p=0.85)
    torch.testing.assert_close(r.behaviour_logprobs_BT, ref, atol=1e-5, rtol=0)


def test_mixed_sampling_rejects_bad_alpha(tok, student, teacher):
    with pytest.raises(ValueError, match="alpha"):
        generate_mixed_rollouts(student, teacher, tok, EXAMPLES, Sampling(max_new_tokens=2), alpha=1.5)


def test_teacher_samples_are_off_policy(tok, teacher):
    torch.manual_seed(0)
    r = generate_rollouts(teacher, tok, EXAMPLES, Sampling(max_new_tokens=3), on_policy=False,
                          sampling_prompt_texts=["1|" + e.prompt for e in EXAMPLES])
    assert not r.on_policy_B.any()
    ref = _gather(_teacher_reference(teacher, tok, r, ["1|" + e.prompt for e in EXAMPLES], 1.0), r)
    torch.testing.assert_close(r.behaviour_logprobs_BT, ref, atol=1e-5, rtol=0)
    assert torch.equal(r.prompt_ids_BP, encode_prompts(tok, [e.prompt for e in EXAMPLES])[0])


def test_rollouts_from_texts(tok):
    examples = [Example("1+1=", answer="2"), Example("50+50=", answer="001"), Example("9=", answer="12345")]
    r = rollouts_from_texts(tok, examples, max_new_tokens=4, group_offset=3)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    digit = tok.convert_tokens_to_ids
    assert r.completion_ids_BT.tolist() == [
        [digit("2"), eos, pad, pad],
        [digit("0"), digit("0"), digit("1"), eos],
        [digit("1"), digit("2"), digit("3"), digit("4")],
    ]
    assert r.completion_mask_BT.sum(1).tolist() == [2, 4, 4]
    assert r.truncated_B.tolist() == [False, False, True]
    assert not r.on_policy_B.any() and (r.behaviour_logprobs_BT == 0).all()
    assert r.group_index_B.tolist() == [3, 4, 5]
    no_eos = rollouts_from_texts(tok, examples[:1], ["77"], max_new_tokens=4, eos=False)
    assert no_eos.completion_ids_BT.tolist() == [[digit("7"), digit("7")]]
    with pytest.raises(ValueError, match="no answer"):
        rollouts_from_texts(tok, [Example("1=")], max_new_tokens=2)


def test_concat_rollouts_pads_and_preserves_scores(tok, student):
    torch.manual_seed(0)
    a = generate_rollouts(student, tok, EXAMPLES[:2], Sampling(max_new_tokens=5))
    b = rollouts_from_texts(tok, [Example("45+67=", answer="2111"), Example("7=", answer="7")],
                            max_new_tokens=6, group_offset=2)
    c = concat_rollouts([a, b], pad_token_id=tok.pad_token_id)
    assert c.batch_size == 4
    assert c.prompt_ids_BP.shape[1] == max(a.prompt_ids_BP.shape[1], b.prompt_ids_BP.shape[1])
    assert c.completion_ids_BT.shape[1] == max(a.completion_ids_BT.shape[1], b.completion_ids_BT.shape[1])
    assert c.on_policy_B.tolist() == [True, True, False, False]
    assert c.group_index_B.tolist() == [0, 1, 2, 3]
    with torch.no_grad():
        whole = completion_forward(student, c.prompt_ids_BP, c.prompt_mask_BP, c.completion_ids_BT,
                                   c.completion_mask_BT)
        for part, rows in ((a, slice(0, 2)), (b, slice(2, 4))):
            alone = completion_forward(student, part.prompt_ids_BP, part.prompt_mask_BP, part.completion_ids_BT,
                                       part.completion_mask_BT)
            t = alone.shape[1]
            m = part.completion_mask_BT
            torch.testing.assert_close(whole[rows, :t][m], alone[m], atol=1e-5, rtol=1e-5)
            assert torch.equal(c.behaviour_logprobs_BT[rows, :t], part.behaviour_logprobs_BT)
    with pytest.raises(ValueError, match="no rollouts"):
        concat_rollouts([])


def test_greedy_rollouts_equal_transformers_generate(tok, student):
    """The KV-cached decode loop reproduces ``transformers``' own greedy ``generate`` token for token."""
    from transformers import GenerationConfig

    from opd.rollout.generate import stop_token_ids

    r = generate_rollouts(student, tok, EXAMPLES, Sampling(max_new_tokens=6, greedy=True))
    ids, mask = encode_prompts(tok, [e.prompt for e in EXAMPLES])
    config = GenerationConfig(do_sample=False, max_new_tokens=6, eos_token_id=stop_token_ids(tok),
                              pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        hf = student.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]
    for b in range(len(EXAMPLES)):
        n = int(r.completion_mask_BT[b].sum())
        assert r.completion_ids_BT[b, :n].tolist() == hf[b, :n].tolist()
        assert all(t == tok.pad_token_id for t in hf[b, n:].tolist())
