"""Teacher-signal compression and caching: cached feedback equals live feedback (bit for bit in
fp32, within the store dtype's rounding otherwise), hits and misses are counted, the disk store
round-trips, and the compact layout has the size it claims."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from opd.config.load import ConfigError, load_config
from opd.factories import cached_teacher
from opd.models import build_model, tiny_llama_config
from opd.rollout import Sampling, generate_rollouts, rollouts_from_texts
from opd.rollout.batches import concat_rollouts
from opd.tasks.arith import ArithTask, arith_tokenizer
from opd.tasks.base import Example
from opd.teachers import ModelTeacher, Teacher
from opd.teachers.cache import (
    CachedTeacher,
    CompactFeedback,
    DiskFeedbackStore,
    FeedbackStore,
    compress_feedback,
    expand_feedback,
    sequence_keys,
    warm_cache,
)
from opd.types import Feedback

FIELDS = ("sampled_logprobs_BT", "topk_ids_BTK", "topk_logprobs_BTK", "logits_BTV", "hidden_BTH",
          "head_weight_VH", "head_bias_V")


@pytest.fixture(scope="module")
def tok():
    return arith_tokenizer()


@pytest.fixture(scope="module")
def teacher_model(tok):
    return build_model(tiny_llama_config(len(tok), layers=2, hidden=32, tokenizer=tok), seed=3)


@pytest.fixture(scope="module")
def rollouts(tok):
    examples = ArithTask(digits=2, eval_size=10, seed=0).train_examples(0, 5, seed=0)
    examples.append(Example("1+2=", answer="3"))  # a shorter prompt: left padding differs
    student = build_model(tiny_llama_config(len(tok), layers=1, hidden=16, tokenizer=tok), seed=7)
    torch.manual_seed(0)
    return generate_rollouts(student, tok, examples, Sampling(max_new_tokens=6, samples_per_prompt=2))


def assert_same(a: Feedback, b: Feedback, *, exact: bool = True, rel: float = 0.0) -> None:
    assert a.access == b.access
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is None:
            continue
        assert x.shape == y.shape and x.dtype == y.dtype, name
        if exact or name in ("sampled_logprobs_BT", "topk_ids_BTK", "head_weight_VH", "head_bias_V"):
            assert torch.equal(x, y), name
        else:  # one rounding to the store dtype: |x − y| ≤ rel·|y|
            assert bool(((x - y).abs() <= rel * y.abs()).all()), name


@pytest.mark.parametrize("access", ["sampled", "topk", "full"])
def test_compress_expand_round_trip_is_exact_in_fp32(tok, teacher_model, rollouts, access):
    live = ModelTeacher(teacher_model, tok).score(rollouts, access=access, topk=5)
    compact = compress_feedback(live, rollouts.completion_mask_BT, store_dtype="float32", topk_request=5)
    assert compact.rows == rollouts.batch_size and compact.tokens == int(rollouts.completion_mask_BT.sum())
    entries = [compact.row(r) for r in range(compact.rows)]
    assert_same(expand_feedback(entries, rollouts.completion_mask_BT, access=access, topk=5), live)


@pytest.mark.parametrize("access", ["topk", "full"])
def test_cached_equals_live_and_counts_hits(tok, teacher_model, rollouts, access):
    live = ModelTeacher(teacher_model, tok).score(rollouts, access=access, topk=4)
    cached = CachedTeacher(ModelTeacher(teacher_model, tok), FeedbackStore("float32"))
    assert isinstance(cached, Teacher)
    first = cached.score(rollouts, access=access, topk=4)
    n_tok = int(rollouts.completion_mask_BT.sum())
    assert (cached.hits, cached.misses, cached.miss_tokens) == (0, rollouts.batch_size, n_tok)
    second = cached.score(rollouts, access=access, topk=4)
    assert (cached.hits, cached.misses, cached.hit_tokens) == (rollouts.batch_size, rollouts.batch_size, n_tok)
    assert_same(first, live)
    assert_same(second, live)
    assert cached.stats["hit_rate"] == 0.5 and cached.stats["entries"] == len(set(
        sequence_keys(rollouts.prompt_ids_BP, rollouts.prompt_mask_BP, rollouts.completion_ids_BT,
                      rollouts.completion_mask_BT)))


def test_hidden_state_accessor_is_cached_exactly(tok, teacher_model, rollouts):
    """Large-vocabulary path: full feedback as hidden states + the (tempered) head, stored once."""
    live_teacher = ModelTeacher(teacher_model, tok, temperature=1.5, full_as_hidden_above_vocab=0)
    live = live_teacher.score(rollouts, access="full", topk=3)
    assert live.hidden_BTH is not None and live.logits_BTV is None
    cached = CachedTeacher(ModelTeacher(teacher_model, tok, temperature=1.5, full_as_hidden_above_vocab=0),
                           FeedbackStore("float32"))
    cached.score(rollouts, access="full", topk=3)
    assert_same(cached.score(rollouts, access="full", topk=3), live)
    assert cached.hits == rollouts.batch_size


def test_partial_hits_score_only_the_misses(tok, teacher_model, rollouts):
    teacher = ModelTeacher(teacher_model, tok)
    cached = CachedTeacher(teacher, FeedbackStore("float32"))
    first_half = rollouts.select(list(range(0, rollouts.batch_size, 2)))
    cached.score(first_half, access="topk", topk=4)
    calls = []
    original = teacher.score

    def spy(r, **kw):
        calls.append(r.batch_size)
        return original(r, **kw)

    teacher.score = spy
    out = cached.score(rollouts, access="topk", topk=4)
    assert calls == [rollouts.batch_size - first_half.batch_size]
    assert cached.hits == first_half.batch_size
    live = original(rollouts, access="topk", topk=4)
    # rows scored in another batch may differ in the last bits (batched matmuls), never more
    for name in ("sampled_logprobs_BT", "topk_logprobs_BTK"):
        torch.testing.assert_close(getattr(out, name), getattr(live, name), atol=1e-5, rtol=0)


def test_requests_beyond_the_stored_signal_are_misses(tok, teacher_model, rollouts):
    cached = CachedTeacher(ModelTeacher(teacher_model, tok), FeedbackStore("float32"))
    cached.score(rollouts, access="sampled")
    cached.score(rollouts, access="topk", topk=4)  # richer access: rescored
    assert (cached.hits, cached.misses) == (0, 2 * rollouts.batch_size)
    small = cached.score(rollouts, access="topk", topk=2)  # a smaller k is a prefix of the stored top-k
    assert small.topk_ids_BTK.shape[-1] == 2 and cached.hits == rollouts.batch_size
    cached.score(rollouts, access="sampled")  # a poorer access is answered too
    assert cached.hits == 2 * rollouts.batch_size
    cached.score(rollouts, access="topk", topk=6)  # more than stored: rescored
    assert cached.misses == 3 * rollouts.batch_size
    # k above the vocabulary: the teacher returns K = V, and a later request for any k ≥ V hits
    v = len(tok)
    cached.score(rollouts, access="topk", topk=v + 5)
    cached.score(rollouts, access="topk", topk=v + 1)
    assert cached.misses == 4 * rollouts.batch_size


@pytest.mark.parametrize("store_dtype,rel", [("float16", 2.0**-11), ("bfloat16", 2.0**-8)])
def test_half_precision_store_is_within_one_rounding(tok, teacher_model, rollouts, store_dtype, rel):
    live = ModelTeacher(teacher_model, tok).score(rollouts, access="full", topk=4)
    cached = CachedTeacher(ModelTeacher(teacher_model, tok), FeedbackStore(store_dtype))
    cached.score(rollouts, access="full", topk=4)
    assert_same(cached.score(rollouts, access="full", topk=4), live, exact=False, rel=rel)


def test_disk_store_round_trip_and_offline_use(tok, teacher_model, rollouts, tmp_path):
    sig = {"model": "tiny", "temperature": 1.0}
    live = ModelTeacher(teacher_model, tok, full_as_hidden_above_vocab=0).score(rollouts, access="full", topk=4)
    writer = CachedTeacher(ModelTeacher(teacher_model, tok, full_as_hidden_above_vocab=0),
                           DiskFeedbackStore(tmp_path / "c", "float32", signature=sig))
    warm_cache(writer, [rollouts.select([0, 1, 2]), rollouts.select(list(range(3, rollouts.batch_size)))],
               access="full", topk=4)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "head.safetensors", "meta.json", "shard-000000.safetensors", "shard-000001.safetensors"]
    reader = CachedTeacher(None, DiskFeedbackStore(tmp_path / "c", "float32", signature=sig))
    assert len(reader.store) == len(writer.store) and reader.store.nbytes == writer.store.nbytes
    out = reader.score(rollouts, access="full", topk=4)
    assert reader.hits == rollouts.batch_size and reader.misses == 0
    for name in ("sampled_logprobs_BT", "topk_ids_BTK", "hidden_BTH", "head_weight_VH"):
        torch.testing.assert_close(getattr(out, name), getattr(live, name), atol=1e-5, rtol=0)
    other = rollouts_from_texts(tok, list(rollouts.examples[:2]), ["9$", "77$"], max_new_tokens=4)
    with pytest.raises(ValueError, match="offline teacher cache has no"):
        reader.score(other, access="full", topk=4)
    with pytest.raises(ValueError, match="was written for"):
        DiskFeedbackStore(tmp_path / "c", "float32", signature={"model": "another"})
    with pytest.raises(ValueError, match="was written for"):
        DiskFeedbackStore(tmp_path / "c", "float16", signature=sig)


def test_compact_size_is_ids_int32_plus_store_dtype(tok, teacher_model, rollouts):
    live = ModelTeacher(teacher_model, tok).score(rollouts, access="full", topk=8)
    n, r, v = int(rollouts.completion_mask_BT.sum()), rollouts.batch_size, len(tok)
    offsets = 8 * (r + 1)
    half = compress_feedback(dataclasses.replace(live, access="topk", logits_BTV=None), rollouts.completion_mask_BT,
                             store_dtype="float16", topk=5)
    assert half.k == 5 and half.topk_ids_NK.dtype == torch.int32 and half.topk_logprobs_NK.dtype == torch.float16
    assert half.nbytes == offsets + n * (4 + 5 * (4 + 2))
    full32 = compress_feedback(live, rollouts.completion_mask_BT, store_dtype="float32")
    assert full32.nbytes == offsets + n * (4 + 8 * (4 + 4) + 4 * v)


def test_keys_follow_the_tokens_the_teacher_reads(tok, teacher_model):
    ex = [Example("12+34=", answer="46"), Example("12+34=", answer="46", teacher_context="hint")]
    r = rollouts_from_texts(tok, ex, ["64$", "64$"], max_new_tokens=5)
    k_plain, k_ctx = sequence_keys(r.prompt_ids_BP, r.prompt_mask_BP, r.completion_ids_BT, r.completion_mask_BT,
                                   ["", "hint"])
    assert k_plain != k_ctx
    # the same sequence padded differently (another batch) has the same key
    longer = rollouts_from_texts(tok, [ex[0], Example("1+2=", answer="3")], ["64$", "3$ 4"], max_new_tokens=8)
    r2 = concat_rollouts([longer.select([0])])
    assert sequence_keys(r2.prompt_ids_BP, r2.prompt_mask_BP, r2.completion_ids_BT, r2.completion_mask_BT)[0] == \
        sequence_keys(r.prompt_ids_BP, r.prompt_mask_BP, r.completion_ids_BT, r.completion_mask_BT)[0]
    # a context-reading teacher keys on its own prompt, so the context separates the two rows
    teacher = CachedTeacher(ModelTeacher(teacher_model, tok, use_context=True, context_template="{context}"),
                            FeedbackStore("float32"))
    with_ctx = rollouts_from_texts(tok, [Example("12+34=", teacher_context="1"), Example("12+34=", teacher_context="2")],
                                   ["64$", "64$"], max_new_tokens=5)
    teacher.score(with_ctx, access="sampled")
    assert teacher.misses == 2 and len(teacher.store) == 2


def test_config_wires_the_cache(tmp_path, tok, teacher_model):
    inner = ModelTeacher(teacher_model, tok)
    assert cached_teacher(load_config(None, []), inner) is inner
    mem = cached_teacher(load_config(None, ["teacher.cache=memory", "teacher.store_dtype=bfloat16"]), inner)
    assert isinstance(mem, CachedTeacher) and mem.store.store_dtype == "bfloat16" and mem.model is teacher_model
    disk = cached_teacher(load_config(None, ["teacher.cache=disk", f"teacher.cache_dir={tmp_path / 'd'}"]), inner)
    assert isinstance(disk.store, DiskFeedbackStore) and (tmp_path / "d" / "meta.json").exists()
    with pytest.raises(ConfigError, match="needs teacher.cache_dir"):
        load_config(None, ["teacher.cache=disk"])
    with pytest.raises(ConfigError, match="self_mode=live changes"):
        load_config(None, ["teacher.cache=memory", "teacher.model=self", "teacher.self_mode=live",
                           "teacher.use_context=true"])


def test_compact_feedback_rejects_mismatched_masks(tok, teacher_model, rollouts):
    live = ModelTeacher(teacher_model, tok).score(rollouts, access="sampled")
    with pytest.raises(ValueError, match="mask_BT has shape"):
        compress_feedback(live, rollouts.completion_mask_BT[:, :-1])
    compact = compress_feedback(live, rollouts.completion_mask_BT, store_dtype="float32")
    entries = [compact.row(r) for r in range(compact.rows)]
    with pytest.raises(ValueError, match="cannot answer"):
        expand_feedback(entries, rollouts.completion_mask_BT, access="topk", topk=2)
    assert isinstance(entries[0], CompactFeedback) and entries[0].rows == 1
