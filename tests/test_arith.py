"""The arith task (format, determinism, held-out disjointness, verifier) and its shipped checkpoints."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.shipped.arith import PHASES, Phase, generate_completions, greedy_accuracy, main, train_phase
from opd.tasks import ArithTask, Example, Task, arith_checkpoint, arith_tokenizer, make_task
from opd.tokenization import check_tokenizers_agree


def test_format_by_hand():
    task = ArithTask(digits=3)
    ex = task.example(123, 45)
    assert ex.prompt == "321+540=" and ex.answer == "861" and ex.teacher_context == "861|"
    assert ex.fields == {"a": 123, "b": 45, "digits": 3}
    assert task.example(999, 1).answer == "0001"  # 1000, least-significant digit first
    assert task.example(0, 0).answer == "0" and task.example(0, 0).prompt == "000+000="
    assert task.example(60, 0).answer == "06"  # no leading zeros of the sum, reversed
    assert ArithTask(digits=3, reverse_operands=False).example(123, 45).prompt == "123+045="
    assert ArithTask(context="none").example(1, 2).teacher_context is None
    assert task.max_new_tokens == 5
    assert isinstance(task, Task) and isinstance(make_task("arith", digits=2), ArithTask)


def test_tokenized_prompt_and_teacher_text():
    tok = arith_tokenizer()
    assert len(tok) == 17
    ex = ArithTask().example(123, 45)
    ids = tok(ex.prompt).input_ids
    assert ids[0] == tok.bos_token_id and tok.decode(ids) == "^321+540="
    assert tok.decode(tok(ex.teacher_context + ex.prompt).input_ids) == "^861|321+540="
    assert tok(ex.answer + "$", add_special_tokens=False).input_ids[-1] == tok.eos_token_id


def test_train_examples_deterministic_in_seed_and_step():
    task = ArithTask()
    first = task.train_examples(step=7, batch_size=64, seed=1)
    ArithTask().train_examples(step=3, batch_size=64, seed=1)  # other calls do not matter
    assert ArithTask().train_examples(step=7, batch_size=64, seed=1) == first
    assert task.train_examples(step=8, batch_size=64, seed=1) != first
    assert task.train_examples(step=7, batch_size=64, seed=2) != first
    assert len({e.prompt for e in first}) > 60  # actually random
    assert all(len(e.prompt) == 8 for e in first)  # fixed width: no padding needed


def test_eval_set_fixed_and_disjoint_from_training():
    task = ArithTask(digits=2, eval_size=500)
    held_out = task.eval_examples()
    assert len({e.prompt for e in held_out}) == 500
    assert task.eval_examples(10) == held_out[:10] == ArithTask(digits=2, eval_size=500).eval_examples(10)
    held_prompts = {e.prompt for e in held_out}
    # 2-digit: 10,000 pairs; 300 steps of 128 draws cover nearly all 9,500 training pairs.
    seen = {e.prompt for step in range(300) for e in task.train_examples(step, 128, seed=0)}
    assert len(seen) > 9_000
    assert not seen & held_prompts
    big = ArithTask(digits=3)
    big_held = {e.prompt for e in big.eval_examples()}
    assert not big_held & {e.prompt for s in range(50) for e in big.train_examples(s, 256, seed=0)}
    assert ArithTask(digits=3, seed=1).eval_examples(5) != big.eval_examples(5)


def test_constructor_and_argument_errors():
    with pytest.raises(ValueError, match=r"digits must be an integer in \[1, 12\]"):
        ArithTask(digits=0)
    with pytest.raises(ValueError, match=r"eval_size must be an integer in \[1, 50\] for digits=1"):
        ArithTask(digits=1, eval_size=500)
    with pytest.raises(ValueError, match="context must be 'answer' or 'none'"):
        ArithTask(context="hint")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"n must be in \[1, eval_size=500\]"):
        ArithTask().eval_examples(501)
    with pytest.raises(ValueError, match="unknown task 'gsm8k'"):
        make_task("gsm8k")


@pytest.mark.parametrize(
    "completion, score",
    [
        ("861$", 1.0),
        ("861$__", 1.0),  # padding after EOS is ignored
        ("861$123", 1.0),  # so is anything after the first EOS
        ("861", 0.0),  # missing EOS: truncated rollout
        ("86$", 0.0),  # truncated answer
        ("8610$", 0.0),  # extra digit
        ("168$", 0.0),  # not reversed
        ("$", 0.0),
        ("", 0.0),
        ("^861$", 0.0),  # the completion must not contain the prompt's BOS
    ],
)
def test_verifier(completion, score):
    task = ArithTask()
    assert task.verify(task.example(123, 45), completion) == score


def test_verifier_needs_an_answer():
    with pytest.raises(ValueError, match="example.answer is None"):
        ArithTask().verify(Example(prompt="1+1="), "2$")


# --- the training helpers, on a tiny budget ------------------------------------------------------


def _tiny(name: str, teacher: str | None = None) -> Phase:
    return Phase(name, digits=2, layers=1, hidden=16, lr=3e-3, batch_size=16, warmup=2, max_steps=4,
                 target=1.0, min_accuracy=0.0, teacher=teacher, eval_every=2, eval_size=50)


def test_train_phase_runs_both_kinds(tmp_path):
    teacher, card = train_phase(_tiny("t"), log=lambda s: None)
    assert card["steps"] == 4 and card["parameters"] > 0 and [h[0] for h in card["history"]] == [2, 4]
    student, card = train_phase(_tiny("s", teacher="t"), teacher, log=lambda s: None)
    assert card["steps"] == 4
    with pytest.raises(ValueError, match="pass its model as teacher="):
        train_phase(_tiny("s", teacher="t"))
    with pytest.raises(RuntimeError, match=r"outside the accepted range \[90%, 100%\]"):
        train_phase(dataclasses.replace(_tiny("t"), min_accuracy=0.9), log=lambda s: None)


def test_generate_completions_cut_after_eos():
    tok = arith_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(arith_checkpoint("smoke_teacher"))
    task = ArithTask(digits=2)
    examples = task.eval_examples(20)
    completions = generate_completions(model, tok, [e.prompt for e in examples], task.max_new_tokens, sample=False)
    for ids in completions:
        assert len(ids) <= task.max_new_tokens
        assert tok.eos_token_id not in ids[:-1]


def test_main_refuses_a_student_without_its_teacher(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--only", "smoke_student", "--out", str(tmp_path)])
    assert "needs its teacher 'smoke_teacher'" in capsys.readouterr().err


def test_make_checkpoints_takes_the_family_first(tmp_path, capsys):
    from opd.cli import main as opd_main
    from opd.shipped import FAMILIES, family_main
    from opd.shipped import main as make

    assert make([]) == 2 and "name a family" in capsys.readouterr().err
    assert make(["arithmetic"]) == 2 and "unknown family 'arithmetic'" in capsys.readouterr().err
    assert make(["--help"]) == 0
    usage = capsys.readouterr().out
    assert all(f"  {name} " in usage for name in FAMILIES)
    assert family_main("arith") is main
    with pytest.raises(ValueError, match="unknown checkpoint family 'x'; choose one of arith, cases, chat, arith_bpe"):
        family_main("x")
    # through the command line: the family's own options follow it
    with pytest.raises(SystemExit):
        opd_main(["make-checkpoints", "arith", "--only", "smoke_student", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "needs its teacher 'smoke_teacher'" in err and "opd make-checkpoints arith" in err


# --- the shipped checkpoints ---------------------------------------------------------------------


def test_arith_checkpoint_names():
    with pytest.raises(ValueError, match=r"unknown arith checkpoint 'big'; choose one of \['teacher'"):
        arith_checkpoint("big")
    assert arith_checkpoint("student").name == "student"


@pytest.mark.parametrize("teacher_name, student_name, digits", [("teacher", "student", 3),
                                                                ("smoke_teacher", "smoke_student", 2)])
def test_shipped_checkpoints(teacher_name, student_name, digits):
    task = ArithTask(digits=digits)
    examples = task.eval_examples(100)
    accuracies = {}
    for name in (teacher_name, student_name):
        path = arith_checkpoint(name)
        model = AutoModelForCausalLM.from_pretrained(path)  # offline: conftest sets HF_HUB_OFFLINE
        tok = AutoTokenizer.from_pretrained(path)
        check_tokenizers_agree(tok, arith_tokenizer())
        assert next(model.parameters()).dtype == torch.float32
        assert model.config.num_hidden_layers == PHASES[name].layers
        assert model.config.hidden_size == PHASES[name].hidden
        size = sum(p.stat().st_size for p in path.iterdir())
        assert size < 4.5e6
        card = json.loads((path / "opd_card.json").read_text())
        assert card["name"] == name and card["bytes_on_disk"] == size - len((path / "opd_card.json").read_bytes())
        accuracies[name] = greedy_accuracy(model.eval(), tok, task, examples)
    assert accuracies[teacher_name] >= 0.95, accuracies
    assert 0.2 <= accuracies[student_name] <= 0.85, accuracies


def test_shared_sft_helpers_by_hand():
    import math

    from opd.shipped.sft import lr_factor, pad_batch

    assert [lr_factor(s, warmup=4, max_steps=14, cosine=False) for s in (0, 3, 4, 13)] == [0.25, 1.0, 1.0, 1.0]
    assert lr_factor(4, warmup=4, max_steps=14, cosine=True) == 1.0
    halfway = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2))
    assert lr_factor(9, warmup=4, max_steps=14, cosine=True) == pytest.approx(halfway)
    assert lr_factor(14, warmup=4, max_steps=14, cosine=True) == pytest.approx(0.1)
    ids, mask, labels = pad_batch([[5, 6], [7]], [[1, 2], [3]], pad_id=0)
    assert ids.tolist() == [[5, 6, 1, 2], [7, 3, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert labels.tolist() == [[-100, -100, 1, 2], [-100, 3, -100, -100]]
