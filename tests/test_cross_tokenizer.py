"""Cross-tokenizer teachers (``teacher.tokenizer=own``): the alignment of two tokenizations by
character offsets, the merged teacher log-probs, the vocabulary map, ULD, and the teacher itself.

Every summed value is checked against the teacher's own log-prob of the same text, computed here by
a plain forward pass over the teacher's tokenization; every per-token value against a naive
reference written in this file. Tokenizer pairs are built in-process with ``tokenizers``:
a character-level student vs a BPE trained on the task's text, and a byte-level BPE student vs a
SentencePiece-style (Metaspace) BPE teacher on text with unicode and odd whitespace."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from opd.models import build_model, tiny_llama_config
from opd.rollout import rollouts_from_texts
from opd.tasks.arith import ArithTask, arith_tokenizer
from opd.tasks.arith_bpe import arith_bpe_tokenizer
from opd.tasks.base import Example
from opd.teachers import CrossTokenizerTeacher
from opd.token_alignment import align_tokens, alignment_metrics, boundary_alignment
from opd.token_alignment.uld import hybrid_divergence, uld_distance, unmapped_uld
from opd.tokenization import char_tokenizer, compare_tokenizers, decode_offsets, token_strings, vocab_map

UNICODE_TEXTS = [
    "héllo  wörld", "日本語のテキスト", "tab\there\nnew line", "  leading and trailing  ", "emoji 🙂 ok 🙂🙂",
    "naïve café — résumé", "a", "x  y   z", "数学 1+1=2",
]


def _specials_post(backend: Tokenizer, bos: str) -> None:
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B:1",
                                                           special_tokens=[(bos, backend.token_to_id(bos))])


def bytelevel_bpe(corpus: list[str], vocab: int = 320) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE: multi-byte characters may be split across tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|bos|>", "<|eos|>"]
    backend.train_from_iterator(corpus * 20, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    _specials_post(backend, "<|bos|>")
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", padding_side="left")


def metaspace_bpe(corpus: list[str], vocab: int = 200) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE over characters (spaces as ``▁``), no dummy prefix."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    alphabet = sorted({c for text in corpus for c in text.replace(" ", "▁")})
    backend.train_from_iterator(corpus * 20, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], initial_alphabet=alphabet,
        show_progress=False))
    _specials_post(backend, "<s>")
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left")


def in_test_arith_bpe(vocab: int = 48) -> PreTrainedTokenizerFast:
    """A BPE trained here on the arith task's text (prompts and answers)."""
    task = ArithTask(digits=3, eval_size=10, seed=1)
    texts = [t for s in range(10) for e in task.train_examples(s, 64, seed=3) for t in (e.prompt, e.answer)]
    backend = Tokenizer(models.BPE(unk_token="[unk]"))
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["[pad]", "[bos]",
                                                                                            "[eos]", "[unk]"],
                                                           initial_alphabet=list("0123456789+=|"), show_progress=False))
    backend.decoder = decoders.Fuse()
    _specials_post(backend, "[bos]")
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="[bos]", eos_token="[eos]", pad_token="[pad]",
                                   unk_token="[unk]", padding_side="left")


def unicode_char_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """One token per unicode character of the corpus (specials ``<p> <b> <e> <u>``)."""
    chars = sorted({c for text in corpus for c in text})
    vocab = {t: i for i, t in enumerate(["<p>", "<b>", "<e>", "<u>", *chars])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<u>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(["<p>", "<b>", "<e>", "<u>"])
    _specials_post(backend, "<b>")
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<b>", eos_token="<e>", pad_token="<p>",
                                   unk_token="<u>", padding_side="left")


def _model(tok, seed: int, max_positions: int = 128):
    return build_model(tiny_llama_config(len(tok), layers=1, hidden=32, tokenizer=tok, max_positions=max_positions),
                       seed=seed)


def _teacher_text_logprob(model, tok, prompt: str, text: str, eos: bool) -> tuple[float, list[float]]:
    """The teacher's own log-prob of ``text`` (its tokenization, + its EOS) after ``prompt``, and the per-token values."""
    p = tok(prompt)["input_ids"]
    c = tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([p + c])).logits[0].float().log_softmax(-1)
    per = [float(logp[len(p) - 1 + i, c[i]]) for i in range(len(c))]
    return sum(per), per


PAIRS = {
    # student tokenizer, teacher tokenizer, texts, prompt
    "char_vs_bpe": (lambda: arith_tokenizer(), lambda: in_test_arith_bpe(),
                    ["861", "0941", "9", "1001", "77", "123|45", ""], "321+540="),
    "char_vs_shipped_bpe": (lambda: arith_tokenizer(), lambda: arith_bpe_tokenizer(),
                            ["861", "0941", "41", "1", "9999"], "321+540="),
    "bytelevel_vs_metaspace": (lambda: bytelevel_bpe(UNICODE_TEXTS), lambda: metaspace_bpe(UNICODE_TEXTS),
                               UNICODE_TEXTS, "héllo wörld"),
    "metaspace_vs_unicode_chars": (lambda: metaspace_bpe(UNICODE_TEXTS), lambda: unicode_char_tokenizer(UNICODE_TEXTS),
                                   UNICODE_TEXTS, "日本語"),
}


@pytest.fixture(scope="module", params=sorted(PAIRS))
def pair(request):
    s_fn, t_fn, texts, prompt = PAIRS[request.param]
    s_tok, t_tok = s_fn(), t_fn()
    return request.param, s_tok, t_tok, texts, prompt, _model(t_tok, seed=5)


@pytest.mark.parametrize("eos", [True, False])
def test_summed_teacher_logprob_equals_the_teachers_own(pair, eos):
    name, s_tok, t_tok, texts, prompt, t_model = pair
    texts = [t for t in texts if t or eos]  # an empty completion needs its EOS
    examples = [Example(prompt) for _ in texts]
    rollouts = rollouts_from_texts(s_tok, examples, texts, max_new_tokens=64, eos=eos)
    teacher = CrossTokenizerTeacher(t_model, t_tok, s_tok)
    fb = teacher.score(rollouts)
    for b, text in enumerate(texts):
        n = int(rollouts.completion_mask_BT[b].sum())
        total, per = _teacher_text_logprob(t_model, t_tok, prompt, text, eos)
        got = fb.sampled_logprobs_BT[b, :n].double()
        assert math.isclose(float(got.sum()), total, rel_tol=1e-5, abs_tol=1e-4), (name, text)
        assert bool((got <= 1e-6).all()), (name, text, got)  # every entry is a log-probability
        assert bool((fb.sampled_logprobs_BT[b, n:] == 0).all())
        if eos:  # the student's EOS is scored as the teacher's EOS after the same text
            assert math.isclose(float(got[-1]), per[-1], rel_tol=1e-5, abs_tol=1e-5)


def _naive_teacher_ends(t_tok, text: str) -> list[int]:
    """Character ends of the teacher's tokens, from decoding growing prefixes."""
    ids = t_tok(text, add_special_tokens=False)["input_ids"]
    return [len(t_tok.decode(ids[:i + 1])) for i in range(len(ids))]


def test_aligned_tokens_get_exactly_the_merged_teacher_logprobs():
    s_tok, t_tok = arith_tokenizer(), in_test_arith_bpe()
    t_model = _model(t_tok, seed=11)
    texts = ["861", "0941", "1001", "77", "4141", "0909"]
    rollouts = rollouts_from_texts(s_tok, [Example("321+540=")] * len(texts), texts, max_new_tokens=8)
    fb = CrossTokenizerTeacher(t_model, t_tok, s_tok).score(rollouts)
    checked = 0
    for b, text in enumerate(texts):
        _, per = _teacher_text_logprob(t_model, t_tok, "321+540=", text, True)
        t_ends = _naive_teacher_ends(t_tok, text)
        bounds = {0, *t_ends}
        for i in range(len(text)):  # one student token per character
            exact = i in bounds and i + 1 in bounds
            assert bool(fb.cross_vocab.token_aligned_BT[b, i]) == exact
            assert bool(fb.cross_vocab.state_aligned_BT[b, i]) == (i in bounds)
            if exact:
                j = t_ends.index(i + 1)
                assert math.isclose(float(fb.sampled_logprobs_BT[b, i]), per[j], abs_tol=1e-5)
                checked += 1
    assert checked >= 4  # the pair has both aligned and split tokens
    assert not bool(fb.cross_vocab.token_aligned_BT[rollouts.completion_mask_BT].all())


def test_split_tokens_follow_the_teachers_prefix_probabilities():
    """Inside a teacher token the student's first character gets log Σ_{u: text(u) starts with it} π_T(u)
    (enumerated here over the teacher's vocabulary), the rest the remainder of the token's log-prob."""
    s_tok, t_tok = arith_tokenizer(), in_test_arith_bpe()
    t_model = _model(t_tok, seed=2)
    strings = {i: t_tok.decode([i]) for i in range(len(t_tok)) if i not in t_tok.all_special_ids}
    found = 0
    for text in ["0941", "4141", "861", "0909", "2121"]:
        ids = t_tok(text, add_special_tokens=False)["input_ids"]
        rollouts = rollouts_from_texts(s_tok, [Example("321+540=")], [text], max_new_tokens=8, eos=False)
        fb = CrossTokenizerTeacher(t_model, t_tok, s_tok).score(rollouts)
        p = t_tok("321+540=")["input_ids"]
        with torch.no_grad():
            logp = t_model(input_ids=torch.tensor([p + ids])).logits[0].float().log_softmax(-1)
        start = 0
        for j, tid in enumerate(ids):
            piece = strings[tid]
            if len(piece) == 2:  # a merge: the student writes it as two characters
                dist = logp[len(p) - 1 + j]
                first = torch.logsumexp(torch.stack([dist[u] for u, s in strings.items() if s.startswith(piece[0])]), 0)
                assert math.isclose(float(fb.sampled_logprobs_BT[0, start]), float(first), abs_tol=1e-5)
                assert math.isclose(float(fb.sampled_logprobs_BT[0, start + 1]), float(dist[tid] - first), abs_tol=1e-5)
                found += 1
            start += len(piece)
    assert found >= 3


def test_align_tokens_by_hand():
    # text "abcd": student a|b|cd, teacher ab|c|d; teacher log-probs -1, -2, -3
    prefix = {(0, 1): -0.25}  # log P(next teacher token starts with "a")
    al = align_tokens([1, 2, 4], [2, 3, 4], [-1.0, -2.0, -3.0], prefix_logprob=lambda j, c: prefix[(j, c)])
    assert al.logprobs == pytest.approx([-0.25, -0.75, -5.0])
    assert al.token_aligned == [False, False, True]  # "cd" covers the whole teacher tokens "c" and "d"
    assert al.state_aligned == [True, False, True] and al.state_teacher_index == [0, -1, 1]
    # without prefix probabilities the teacher token is split by characters
    lin = align_tokens([1, 2, 4], [2, 3, 4], [-1.0, -2.0, -3.0])
    assert lin.logprobs == pytest.approx([-0.5, -0.5, -5.0])
    # a student token ending inside a character shares the run's value
    run = align_tokens([None, 1, 3], [1, 3], [-1.0, -2.0])
    assert run.logprobs == pytest.approx([-0.5, -0.5, -2.0]) and run.token_aligned == [False, False, True]
    # texts that do not match: one unit split by characters, the sum is kept
    mis = align_tokens([1, 3], [2], [-4.0], text_matches=False)
    assert sum(mis.logprobs) == pytest.approx(-4.0) and mis.logprobs == pytest.approx([-4 / 3, -8 / 3])


def test_decode_offsets_in_context_and_partial_characters():
    tok = bytelevel_bpe(UNICODE_TEXTS)
    for text in UNICODE_TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        got, ends = decode_offsets(tok, ids, tok("abc", add_special_tokens=False)["input_ids"])
        assert got == text
        clean = [e for e in ends if e is not None]
        assert clean == sorted(clean) and (not text or clean[-1] == len(text))
        for e in clean:  # every clean end is where a prefix of the ids decodes to a prefix of the text
            assert text[:e] in {tok.decode(ids[:k]) for k in range(1, len(ids) + 1)}
    cjk = tok("日本語", add_special_tokens=False)["input_ids"]
    assert None in decode_offsets(tok, cjk)[1] or len(cjk) <= 3
    meta = metaspace_bpe(UNICODE_TEXTS)
    ids = meta(" wörld", add_special_tokens=False)["input_ids"]
    assert decode_offsets(meta, ids, meta("héllo", add_special_tokens=False)["input_ids"])[0] == " wörld"


def test_vocab_map_maps_text_and_special_roles():
    s_tok, t_tok = arith_tokenizer(), arith_bpe_tokenizer()
    mapping = vocab_map(s_tok, t_tok)
    t_strings = token_strings(t_tok)
    for s_id, t_id in enumerate(mapping):
        if s_id in s_tok.all_special_ids:
            continue
        assert t_strings[t_id] == s_tok.decode([s_id])
    assert mapping[s_tok.eos_token_id] == t_tok.eos_token_id
    assert mapping[s_tok.bos_token_id] == t_tok.bos_token_id
    unicode = unicode_char_tokenizer(["abc"])
    partial = vocab_map(arith_tokenizer(), unicode)
    assert partial[arith_tokenizer().convert_tokens_to_ids("1")] == -1  # no teacher token "1"


def test_distributions_at_aligned_states_are_the_teachers_mapped():
    s_tok, t_tok = arith_tokenizer(), in_test_arith_bpe()
    t_model = _model(t_tok, seed=4)
    texts = ["861", "0941", "1001"]
    rollouts = rollouts_from_texts(s_tok, [Example("321+540=")] * 3, texts, max_new_tokens=8)
    teacher = CrossTokenizerTeacher(t_model, t_tok, s_tok, unmapped_topk=64)
    fb = teacher.score(rollouts, access="full", topk=5)
    mapping = teacher.map_V
    p = t_tok("321+540=")["input_ids"]
    for b, text in enumerate(texts):
        ids = t_tok(text, add_special_tokens=False)["input_ids"] + [t_tok.eos_token_id]
        with torch.no_grad():
            logp = t_model(input_ids=torch.tensor([p + ids])).logits[0].float().log_softmax(-1)
        t_ends = [0] + _naive_teacher_ends(t_tok, text)
        positions = {e: j for j, e in enumerate(t_ends)}  # char offset -> teacher position
        n = int(rollouts.completion_mask_BT[b].sum())
        for i in range(n):
            aligned = bool(fb.cross_vocab.state_aligned_BT[b, i])
            assert aligned == (i in positions)
            if not aligned:
                assert bool((fb.topk_ids_BTK[b, i] == -1).all())
                continue
            dist = logp[len(p) - 1 + positions[i]]
            naive = torch.tensor([float(dist[mapping[v]]) if mapping[v] >= 0 else -math.inf
                                  for v in range(len(mapping))])
            top = naive.topk(5)
            torch.testing.assert_close(fb.topk_logprobs_BTK[b, i], top.values, atol=1e-5, rtol=0)
            assert fb.topk_ids_BTK[b, i].tolist() == top.indices.tolist()
            mapped_mass = naive.exp().sum()
            unmapped = dist.exp()[teacher.teacher_unmapped_V]
            assert math.isclose(float(fb.cross_vocab.unmapped_mass_BT[b, i]), float(unmapped.sum()), abs_tol=1e-5)
            assert math.isclose(float(mapped_mass + unmapped.sum()), 1.0, abs_tol=1e-5)
            head = unmapped.sort(descending=True).values[:64]
            torch.testing.assert_close(fb.cross_vocab.unmapped_topk_BTU[b, i, :len(head)], head, atol=1e-6, rtol=0)
        full = fb.logits_BTV[b, :n]
        assert bool(torch.isfinite(full).all())
        torch.testing.assert_close(full.exp().sum(-1), torch.ones(n), atol=1e-4, rtol=0)
    metrics = alignment_metrics(fb, rollouts.completion_mask_BT)
    assert 0 < metrics["xtok/token_aligned_frac"] < 1 and metrics["xtok/state_aligned_frac"] >= \
        metrics["xtok/token_aligned_frac"]


def test_teacher_prompt_is_rendered_with_the_teachers_own_tokenizer():
    s_tok, t_tok = arith_tokenizer(), arith_bpe_tokenizer()
    teacher = CrossTokenizerTeacher(_model(t_tok, seed=0), t_tok, s_tok, use_context=True, context_template="{context}")
    rollouts = rollouts_from_texts(s_tok, [Example("321+540=", answer="861", teacher_context="861|")], ["861"],
                                   max_new_tokens=8)
    ids, mask = teacher.prompt_batch(rollouts)
    assert ids[0][mask[0].bool()].tolist() == t_tok("861|321+540=")["input_ids"]
    assert rollouts.prompt_ids_BP[0].tolist() == s_tok("321+540=")["input_ids"]  # the student never sees it


def test_unknown_characters_fall_back_to_whole_text_and_keep_the_sum():
    s_tok = arith_tokenizer()
    t_tok = unicode_char_tokenizer(["0123456789+="])  # no "|": the teacher writes <u>
    t_model = _model(t_tok, seed=9)
    rollouts = rollouts_from_texts(s_tok, [Example("12+34=")], ["4|6"], max_new_tokens=8)
    fb = CrossTokenizerTeacher(t_model, t_tok, s_tok).score(rollouts)
    p = t_tok("12+34=")["input_ids"]
    c = t_tok("4|6", add_special_tokens=False)["input_ids"] + [t_tok.eos_token_id]
    with torch.no_grad():
        logp = t_model(input_ids=torch.tensor([p + c])).logits[0].log_softmax(-1)
    total = sum(float(logp[len(p) - 1 + i, c[i]]) for i in range(len(c)))
    assert math.isclose(float(fb.sampled_logprobs_BT[0].sum()), total, abs_tol=1e-4)
    assert not bool(fb.cross_vocab.token_aligned_BT.any())


def test_boundary_alignment_report():
    s_tok, t_tok = arith_tokenizer(), arith_bpe_tokenizer()
    report = boundary_alignment(s_tok, t_tok, ["861", "0941", "1"])
    assert report.text_match == 1.0 and report.tokens == 8 and 0 < report.token_aligned < 1
    same = boundary_alignment(s_tok, char_tokenizer("0123456789+=|", bos="<", eos=">", pad="~", unk="!"), ["861"])
    assert same.token_aligned == 1.0


# ----------------------------------------------------------------------------- ULD and the hybrid


def _naive_uld(p: list[float], q: list[float]) -> float:
    n = max(len(p), len(q))
    a = sorted(p, reverse=True) + [0.0] * (n - len(p))
    b = sorted(q, reverse=True) + [0.0] * (n - len(q))
    return sum(abs(x - y) for x, y in zip(a, b))


def test_uld_distance_matches_sorting_by_hand():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(7, generator=g), 0)
    q = torch.softmax(torch.randn(4, generator=g), 0)
    pp = p.sort(descending=True).values
    qq = torch.nn.functional.pad(q.sort(descending=True).values, (0, 3))
    assert math.isclose(float(uld_distance(pp[None], qq[None])), _naive_uld(p.tolist(), q.tolist()), abs_tol=1e-6)


def test_unmapped_uld_and_its_gradient():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, generator=g, requires_grad=True)
    unmapped_s = torch.tensor([False, True, False, True, True, False])
    teacher_un = torch.softmax(torch.randn(3, 9, generator=g), -1)[:, :5] * 0.5  # 5 unmapped teacher tokens
    head = teacher_un.sort(descending=True, dim=-1).values
    got = unmapped_uld(torch.log_softmax(logits, -1), unmapped_s, head, teacher_un.sum(-1))
    for n in range(3):
        q = torch.softmax(logits[n].detach(), -1)[unmapped_s]
        assert math.isclose(float(got[n].detach()), _naive_uld(teacher_un[n].tolist(), q.tolist()), abs_tol=1e-6)
    # gradient against autograd through an explicit sort-and-subtract reference
    ref = []
    for n in range(3):
        q = torch.softmax(logits[n], -1)[unmapped_s].sort(descending=True).values
        q = torch.nn.functional.pad(q, (0, 2))
        ref.append((head[n] - q).abs().sum())
    g1 = torch.autograd.grad(got.sum(), logits)[0]
    g2 = torch.autograd.grad(torch.stack(ref).sum(), logits)[0]
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=0)


def test_truncated_uld_keeps_the_tail_mass():
    p = torch.tensor([[0.3, 0.2, 0.1, 0.05]])
    q_logp = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    got = unmapped_uld(q_logp, torch.ones(4, dtype=torch.bool), p[:, :2], p.sum(-1))
    expected = abs(0.3 - 0.4) + abs(0.2 - 0.3) + abs((0.1 + 0.05) - (0.2 + 0.1))
    assert math.isclose(float(got), expected, abs_tol=1e-6)


def test_hybrid_with_a_shared_vocabulary_is_the_plain_divergence():
    from opd.math.divergences import reverse_kl

    g = torch.Generator().manual_seed(2)
    s = torch.log_softmax(torch.randn(4, 5, generator=g), -1)
    t = torch.log_softmax(torch.randn(4, 5, generator=g), -1)
    mapped = torch.ones(5, dtype=torch.bool)
    got = hybrid_divergence(s, t, mapped, torch.zeros(4, 3), torch.zeros(4), name="rkl")
    torch.testing.assert_close(got, reverse_kl(s, t), atol=1e-6, rtol=0)
    assert float(hybrid_divergence(t, t, mapped, torch.zeros(4, 3), torch.zeros(4)).abs().max()) < 1e-6


# ----------------------------------------------------------------------------- through the CLI


SMOKE = ["student.model=builtin:arith/smoke_student", "data.digits=2", "rollout.prompts_per_step=8", "eval.size=8",
         "eval.every=0", "logging.progress=false", "logging.report=false", "train.threads=1", "train.steps=2"]


@pytest.fixture(scope="module")
def bpe_teacher_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe_teacher")
    tok = in_test_arith_bpe()
    _model(tok, seed=8, max_positions=64).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("objective", [["method=thinking-machines"],
                                       ["support.kind=teacher_topk", "support.norm=tail", "teacher.topk=8",
                                        "support.k=8"]])
def test_cross_tokenizer_distill_runs_through_the_cli(tmp_path, bpe_teacher_folder, objective, capsys):
    from opd.cli import main as opd_main
    from opd.metrics_log import read_metrics

    run = tmp_path / "run"
    args = ["distill", *SMOKE, f"teacher.model={bpe_teacher_folder}", "teacher.tokenizer=own", *objective,
            f"logging.run_dir={run}"]
    assert opd_main(args) == 0
    train = read_metrics(run, "train")
    assert [r["step"] for r in train] == [1, 2] and all(math.isfinite(r["loss"]) for r in train)
    assert all(math.isfinite(r["teacher_kl"]) for r in train)
    assert all(0 < r["xtok/token_aligned_frac"] <= r["xtok/state_aligned_frac"] <= 1 for r in train)
    if "support.kind=teacher_topk" in objective:  # route 1 across vocabularies: the ULD term is in the loss
        assert all(math.isfinite(r["loss/route1_uld"]) and r["loss/route1_uld"] > 0 for r in train)
    err = capsys.readouterr().err
    assert "aligned: vocabulary:" in err and "the student's EOS is scored as the teacher's EOS" in err


def test_a_mismatched_teacher_is_refused_with_the_options_that_fix_it(tmp_path, bpe_teacher_folder, capsys):
    from opd.cli import main as opd_main

    code = opd_main(["distill", *SMOKE, f"teacher.model={bpe_teacher_folder}", f"logging.run_dir={tmp_path / 'r'}"])
    assert code != 0
    err = capsys.readouterr().err
    assert "student and teacher tokenizers disagree" in err
    assert f"student.tokenizer={bpe_teacher_folder}" in err and "teacher.tokenizer=own" in err


def test_the_shipped_teacher_has_its_own_tokenizer_and_solves_the_task():
    from opd.model_paths import resolve_model_path
    from opd.models import load_model, load_tokenizer
    from opd.shipped.arith_bpe import greedy_accuracy

    path = resolve_model_path("builtin:arith_bpe/teacher")
    tok, model = load_tokenizer(path), load_model(path)
    assert tok.get_vocab() == arith_bpe_tokenizer().get_vocab()  # the script's tokenizer, rebuilt deterministically
    assert not compare_tokenizers(arith_tokenizer(), tok).ok  # refused with teacher.tokenizer=same
    assert compare_tokenizers(arith_tokenizer(), tok, teacher_tokenizer="own").ok
    task = ArithTask(digits=3, eval_size=500, seed=0)
    assert greedy_accuracy(model, tok, task.eval_examples(64), task.max_new_tokens) >= 0.95


@pytest.mark.parametrize("overrides, message", [
    (["teacher.tokenizer=own"], "support.kind=full needs the teacher's probability of every student token"),
    (["teacher.tokenizer=own", "teacher.model=self", "route1.divergence=none", "route2.coef=1"],
     "teacher.tokenizer=own needs a teacher model with its own tokenizer"),
    (["teacher.tokenizer=own", "support.kind=teacher_topk", "rollout.teacher_mix=0.2"],
     "cannot sample tokens in the student's vocabulary"),
    (["teacher.tokenizer=own", "support.kind=teacher_topk", "teacher.cache=memory"],
     "teacher.cache does not keep the cross-tokenizer alignment"),
    (["data.task=jsonl", "data.path=x.jsonl", "teacher.system_prompt=hi"],
     "teacher.system_prompt is shown to the teacher only with teacher.use_context=true"),
    (["data.format=chat"], "data.task=arith is the built-in prompt task"),
])
def test_configurations_the_tokenizer_and_format_options_refuse(overrides, message):
    from opd.config.load import load_config

    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)
    assert load_config(None, ["teacher.tokenizer=own", "support.kind=teacher_topk"]).teacher.tokenizer == "own"


def test_the_objective_adds_the_uld_term_on_teacher_states_only():
    """Route 1 with cross-vocabulary feedback: loss/route1_uld = uld_coef · Σ_t w_t · 1[teacher state]
    · ULD_t, with ULD_t computed here by sorting by hand; its gradient reaches the student logits."""
    from opd.config import load_config
    from opd.objective import Objective, StudentOutputs
    from opd.types import CrossVocabFeedback, Feedback

    torch.manual_seed(0)
    tok = arith_tokenizer()
    b, t, v, u = 3, 4, len(tok), 3
    rollouts = rollouts_from_texts(tok, [Example("12+34=")] * b, ["46", "460", "4"], max_new_tokens=t)
    t = rollouts.completion_ids_BT.shape[1]
    logits = torch.randn(b, t, v, requires_grad=True)
    teacher_logits = torch.randn(b, t, v)
    top_lp, top_ids = teacher_logits.log_softmax(-1).topk(4, dim=-1)
    state_aligned = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)[:, :t]
    student_unmapped = torch.zeros(v, dtype=torch.bool)
    student_unmapped[[2, 5, 7, 11]] = True
    unmapped = torch.rand(b, t, 5).sort(-1, descending=True).values * 0.1
    cv = CrossVocabFeedback(token_aligned_BT=state_aligned, state_aligned_BT=state_aligned,
                            unmapped_topk_BTU=unmapped[..., :u], unmapped_mass_BT=unmapped.sum(-1),
                            student_unmapped_V=student_unmapped)
    fb = Feedback(access="topk", sampled_logprobs_BT=torch.zeros(b, t), topk_ids_BTK=top_ids,
                  topk_logprobs_BTK=top_lp, cross_vocab=cv)
    cfg = load_config(None, ["support.kind=teacher_topk", "support.k=4", "teacher.access=topk", "teacher.topk=4",
                             "route1.uld_coef=0.7"])
    out = Objective.from_config(cfg, eos_id=tok.eos_token_id)(StudentOutputs(logits_BTV=logits), fb, rollouts)
    mask = rollouts.completion_mask_BT.bool()
    expected = torch.zeros(())
    probs = logits.float().log_softmax(-1).exp()
    for i in range(b):
        for j in range(t):
            if not (mask[i, j] and state_aligned[i, j]):
                continue
            q = sorted((float(probs[i, j, k]) for k in range(v) if student_unmapped[k]), reverse=True)
            q_head, q_tail = q[:u], sum(q[u:])
            p_head = unmapped[i, j, :u].tolist()
            p_tail = float(unmapped[i, j].sum()) - sum(p_head)
            d = sum(abs(a - c) for a, c in zip(p_head, q_head)) + abs(p_tail - q_tail)
            expected = expected + d / float(mask.sum())  # token mean over the counted tokens
    assert math.isclose(out.metrics["loss/route1_uld"], 0.7 * float(expected), rel_tol=1e-5)
    out.loss.backward()
    assert logits.grad[~(mask & state_aligned)].abs().max() < float("inf")
    grad_uld = torch.autograd.grad(
        Objective.from_config(cfg, eos_id=tok.eos_token_id)(StudentOutputs(logits_BTV=logits), fb, rollouts).loss
        - Objective.from_config(load_config(None, ["support.kind=teacher_topk", "support.k=4", "teacher.access=topk",
                                                   "teacher.topk=4", "route1.uld_coef=0"]),
                                eos_id=tok.eos_token_id)(StudentOutputs(logits_BTV=logits), fb, rollouts).loss,
        logits)[0]
    assert grad_uld[mask & state_aligned].abs().sum() > 0  # the ULD term trains the teacher states...
    assert grad_uld[mask & ~state_aligned].abs().sum() == 0  # ...and only them
