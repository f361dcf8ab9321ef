"""Depth pruning (opd/prune.py) and ``opd make-student``: scores against the formula computed naively
(a per-row loop over the teacher's blocks and ``math.acos``), the pruned model against running only
the kept blocks of the teacher, the choice rules against brute force, and the one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from opd.cli import main
from opd.models import build_model, load_model, load_tokenizer, tiny_llama_config
from opd.prune import (
    PruneError,
    angular_distance,
    block_distances,
    choose_layers,
    layer_hidden_states,
    measure_block_distances,
    prune_layers,
    uniform_layers,
)
from opd.rollout import encode_prompts
from opd.tokenization import char_tokenizer

ALPHABET = "abcdefghij +="
LAYERS = 6


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(ALPHABET)


@pytest.fixture(scope="module")
def teacher(tok):
    cfg = tiny_llama_config(len(tok), layers=LAYERS, hidden=16, heads=4, intermediate=32, max_positions=48,
                            tokenizer=tok)
    cfg.num_key_value_heads = 2  # grouped-query attention, as in SmolLM2
    return build_model(cfg, seed=7)


def _causal(n: int) -> torch.Tensor:
    return torch.full((n, n), float("-inf")).triu(1)[None, None]


def naive_hidden(model, ids_L: torch.Tensor, blocks: list[int] | None = None) -> list[torch.Tensor]:
    """One unpadded row through the embeddings and the given blocks (default all), one by one."""
    m = model.model
    h = m.embed_tokens(ids_L[None])
    pos = torch.arange(len(ids_L))[None]
    pe = m.rotary_emb(h, position_ids=pos)
    out = [h]
    for i in range(len(m.layers)) if blocks is None else blocks:
        h = m.layers[i](h, attention_mask=_causal(len(ids_L)), position_embeddings=pe, position_ids=pos)
        h = h[0] if isinstance(h, tuple) else h
        out.append(h)
    return out


def naive_logits(model, ids_L: torch.Tensor, blocks: list[int]) -> torch.Tensor:
    return model.lm_head(model.model.norm(naive_hidden(model, ids_L, blocks)[-1]))[0]


PROMPTS = ["ab+cd=", "j", "hello=ij", "a b c d e f"]


def _batch(tok, texts=PROMPTS):
    return encode_prompts(tok, texts)  # left-padded, BOS added


# ---------------------------------------------------------------------------------------------
def test_angular_distance_value_and_gradient():
    torch.manual_seed(1)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    y_same = x.detach().clone() * 3.0  # parallel: distance 0
    got = angular_distance(x, y)
    want = torch.stack([torch.acos((x[i] @ y[i]) / (x[i].norm() * y[i].norm())) / math.pi for i in range(7)])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    for i in range(7):  # the formula with plain floats
        a, b = x[i].tolist(), y[i].tolist()
        cos = sum(p * q for p, q in zip(a, b)) / math.sqrt(sum(p * p for p in a) * sum(q * q for q in b))
        assert abs(float(got[i].detach()) - math.acos(cos) / math.pi) < 1e-6
    g_got = torch.autograd.grad(got.sum(), (x, y))
    g_want = torch.autograd.grad(want.sum(), (x, y))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
    assert float(angular_distance(x.detach(), y_same).abs().max()) < 1e-3
    assert float(angular_distance(x.detach(), -x.detach()).min()) > 0.999
    with pytest.raises(ValueError, match=r"same shape, got \(7, 5\) and \(7, 4\)"):
        angular_distance(x, y[:, :4])


def test_block_scores_match_the_naive_formula_under_padding(teacher, tok):
    ids, mask = _batch(tok)
    hidden = layer_hidden_states(teacher, ids, mask)
    assert len(hidden) == LAYERS + 1
    got = block_distances(hidden, mask)  # [B, L]
    got2 = block_distances(hidden, mask, span=2)  # [B, L - 1]
    with torch.no_grad():
        for b, text in enumerate(PROMPTS):
            row = ids[b][mask[b].bool()]
            hs = [h[0, -1] for h in naive_hidden(teacher, row)]  # the last (real) token of the unpadded row
            for ell in range(LAYERS):
                x, y = hs[ell].tolist(), hs[ell + 1].tolist()
                cos = sum(p * q for p, q in zip(x, y)) / math.sqrt(sum(p * p for p in x) * sum(q * q for q in y))
                assert abs(float(got[b, ell]) - math.acos(max(-1.0, min(1.0, cos))) / math.pi) < 2e-4, (text, ell)
            for ell in range(LAYERS - 1):
                d = float(angular_distance(hs[ell][None], hs[ell + 2][None]))
                assert abs(float(got2[b, ell]) - d) < 2e-4
    # the mean over batches is the mean over rows
    mean = measure_block_distances(teacher, [_batch(tok, PROMPTS[:3]), _batch(tok, PROMPTS[3:])])
    torch.testing.assert_close(mean, got.mean(dim=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("keep", [[0, 2, 5], [3], [1, 2, 3, 4], list(range(LAYERS))])
def test_pruned_forward_equals_the_kept_blocks_of_the_teacher(teacher, tok, keep):
    pruned = prune_layers(teacher, keep)
    assert pruned.config.num_hidden_layers == len(keep) and len(teacher.model.layers) == LAYERS  # input unchanged
    ids, mask = _batch(tok)
    with torch.no_grad():
        from opd.rollout import position_ids_from_mask

        logits = pruned(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        for b in range(len(PROMPTS)):
            real = mask[b].bool()
            want = naive_logits(teacher, ids[b][real], keep)
            torch.testing.assert_close(logits[b][real], want, rtol=1e-4, atol=1e-5)


def test_pruned_model_decodes_with_its_kv_cache(teacher, tok):
    # renumbered blocks index the KV cache: cached greedy decoding equals the full forward's argmax
    pruned = prune_layers(teacher, [1, 4, 5])
    ids = tok("ab+c", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = pruned.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
        seq = ids
        for _ in range(6):  # naive: no cache, the teacher's kept blocks
            nxt = naive_logits(teacher, seq[0], [1, 4, 5])[-1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    assert out.tolist() == seq.tolist()


def test_choice_rules_against_brute_force():
    assert uniform_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert uniform_layers(30, 1) == [29] and uniform_layers(30, 30) == list(range(30))
    for n_layers in range(1, 9):
        for keep in range(1, n_layers + 1):
            u = uniform_layers(n_layers, keep)
            assert len(u) == keep and u == sorted(set(u)) and (keep == 1 or (u[0] == 0 and u[-1] == n_layers - 1))
    scores = [0.3, 0.1, 0.5, 0.1, 0.2, 0.9]
    # angular: keep the highest scores, ties to the earlier block
    assert choose_layers(6, 3, "angular", layer_scores=scores) == [0, 2, 5]
    assert choose_layers(6, 4, "angular", layer_scores=scores) == [0, 2, 4, 5]
    assert choose_layers(6, 5, "angular", layer_scores=scores) == [0, 1, 2, 4, 5]
    # contiguous: brute force over every run of n = L - keep blocks
    span_scores = [0.4, 0.2, 0.35, 0.2]  # n = 3 for L = 6, keep = 3: starts 0..3
    best = min(range(4), key=lambda s: (span_scores[s], s))
    brute = [i for i in range(6) if not best <= i < best + 3]
    assert choose_layers(6, 3, "contiguous", span_scores=span_scores) == brute
    assert choose_layers(6, 3, "contiguous", span_scores=span_scores) == [0, 4, 5]
    assert choose_layers(6, 6, "contiguous") == list(range(6))


@pytest.mark.parametrize("call, message", [
    (lambda: choose_layers(6, 0, "uniform"), "keep between 1 and 6 of the teacher's 6 layers, got 0"),
    (lambda: choose_layers(6, 7, "angular", layer_scores=[0] * 6), "keep between 1 and 6 .* got 7"),
    (lambda: choose_layers(6, 2, "angular", layer_scores=[0] * 5), "one score per block \\(6\\), got 5"),
    (lambda: choose_layers(6, 2, "greedy"), "unknown pruning method 'greedy'"),
])
def test_bad_counts_are_one_line(call, message):
    with pytest.raises(PruneError, match=message) as err:
        call()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("keep, message", [
    ([0, 6], r"indices \[6\] outside 0..5"), ([-1, 2], r"indices \[-1\] outside 0..5"),
    ([1, 1, 2], r"repeated indices \[1\]"), ([], "got no layers"),
])
def test_bad_indices_are_one_line(teacher, keep, message):
    with pytest.raises(PruneError, match=message) as err:
        prune_layers(teacher, keep)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# the command
@pytest.fixture(scope="module")
def teacher_dir(teacher, tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    teacher.save_pretrained(folder)
    tok.save_pretrained(folder)
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return folder, prompts


@pytest.mark.parametrize("method", ["angular", "contiguous", "uniform"])
def test_make_student_writes_the_pruned_model_and_its_card(teacher, tok, teacher_dir, tmp_path, method, capsys):
    folder, prompts = teacher_dir
    out = tmp_path / "student"
    assert main(["make-student", str(folder), str(out), "--keep", "3", "--method", method,
                 "--prompts", str(prompts), "--batch-size", "3"]) == 0
    card = json.loads((out / "opd_card.json").read_text())
    # the scores, recomputed naively: mean over prompts of the per-row distances
    ids, mask = _batch(tok)
    per_row = block_distances(layer_hidden_states(teacher, ids, mask), mask)
    scores = per_row.mean(dim=0).tolist()
    assert [card["score"]["per_layer"][str(i)] for i in range(LAYERS)] == pytest.approx(scores, abs=1e-5)
    if method == "angular":
        want = sorted(sorted(range(LAYERS), key=lambda i: -scores[i])[:3])
    elif method == "uniform":
        want = [0, 2, 5]  # round(i * 5 / 2)
    else:
        span = block_distances(layer_hidden_states(teacher, ids, mask), mask, span=3).mean(dim=0).tolist()
        start = min(range(len(span)), key=lambda s: span[s])
        want = [i for i in range(LAYERS) if not start <= i < start + 3]
        assert [card["span_scores"]["start_to_score"][str(i)] for i in range(4)] == pytest.approx(span, abs=1e-5)
    assert card["kept_layers"] == want and card["method"] == method and card["teacher_layers"] == LAYERS
    assert card["removed_layers"] == [i for i in range(LAYERS) if i not in want]
    student = load_model(out)
    assert student.config.num_hidden_layers == 3 and load_tokenizer(out).get_vocab() == tok.get_vocab()
    row = tok("ab+cd=", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(student(row).logits[0], naive_logits(teacher, row[0], want), rtol=1e-4, atol=1e-5)
    assert f"kept 3 of {LAYERS} blocks ({method}): {want}" in capsys.readouterr().out


def test_make_student_explicit_layers(teacher_dir, tmp_path):
    folder, prompts = teacher_dir
    out = tmp_path / "s"
    assert main(["make-student", str(folder), str(out), "--layers", "5, 0,3", "--prompts", str(prompts)]) == 0
    card = json.loads((out / "opd_card.json").read_text())
    assert card["kept_layers"] == [0, 3, 5] and card["method"] == "explicit" and len(card["score"]["per_layer"]) == 6


@pytest.mark.parametrize("extra, message", [
    ([], "say how many blocks the student keeps: --keep N"),
    (["--keep", "0"], "--keep must be at least 1, got 0"),
    (["--keep", "9"], "--keep 9: the teacher has 6 decoder blocks; keep between 1 and 6"),
    (["--layers", "0,x"], "--layers '0,x': 'x' is not a block index"),
    (["--layers", "0,7"], r"--layers must list distinct block indices in 0..5 .* indices \[7\] outside 0..5"),
    (["--layers", "1,2", "--keep", "3"], "--keep 3 but --layers lists 2 blocks"),
    (["--keep", "2", "--prompts", "nope.jsonl"], "--prompts nope.jsonl: no such file"),
])
def test_make_student_errors_are_one_line(teacher_dir, tmp_path, capsys, extra, message):
    folder, _ = teacher_dir
    assert main(["make-student", str(folder), str(tmp_path / "out"), *extra]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("Loading weights")]
    assert len(err) == 2 and err[1] == "(set OPD_TRACEBACK=1 for the full traceback)"
    import re

    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "out").exists()


def test_make_student_refuses_a_used_folder(teacher_dir, tmp_path, capsys):
    folder, prompts = teacher_dir
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("keep me")
    assert main(["make-student", str(folder), str(tmp_path / "used"), "--keep", "2"]) == 2
    assert "already exists and is not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "used" / "x").read_text() == "keep me"
