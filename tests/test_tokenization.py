"""Character tokenizer round-trip and the teacher/student tokenizer agreement check."""

from __future__ import annotations

import pytest
from tokenizers import processors
from transformers import AutoTokenizer

from opd.tokenization import (
    TokenizerComparison,
    TokenizerMismatchError,
    char_tokenizer,
    check_tokenizers_agree,
    compare_tokenizers,
)

ALPHABET = "0123456789+="


@pytest.fixture
def tok():
    return char_tokenizer(ALPHABET)


def test_ids_and_special_tokens(tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("_", "^", "$", "?")
    assert len(tok) == len(ALPHABET) + 4
    expected = {c: 4 + i for i, c in enumerate(ALPHABET)}
    assert {c: tok.convert_tokens_to_ids(c) for c in ALPHABET} == expected
    assert tok.padding_side == "left"


def test_encode_decode(tok):
    ids = tok("321+540=").input_ids
    assert ids == [1] + [4 + ALPHABET.index(c) for c in "321+540="]
    assert tok("12", add_special_tokens=False).input_ids == [5, 6]
    # The EOS string inside a text is the EOS token; unknown characters become unk.
    assert tok("86$", add_special_tokens=False).input_ids == [12, 10, 2]
    assert tok("1a", add_special_tokens=False).input_ids == [5, 3]
    assert tok.decode([1, 12, 10, 5, 2, 0, 0]) == "^861$__"
    assert tok.decode([1, 12, 10, 5, 2, 0, 0], skip_special_tokens=True) == "861"


def test_left_padding(tok):
    batch = tok(["1+2=", "12+34="], padding=True)
    assert batch.input_ids[0][:2] == [0, 0] and batch.attention_mask[0] == [0, 0, 1, 1, 1, 1, 1]
    assert batch.input_ids[1][0] == 1


def test_save_pretrained_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab()
    for role in ("bos", "eos", "pad", "unk"):
        assert getattr(loaded, f"{role}_token_id") == getattr(tok, f"{role}_token_id")
        assert getattr(loaded, f"{role}_token") == getattr(tok, f"{role}_token")
    assert loaded.padding_side == "left"
    for text in ["321+540=", "861$", "9+9=", ""]:
        assert loaded(text).input_ids == tok(text).input_ids
    assert loaded.decode(tok("861$").input_ids) == "^861$"
    assert check_tokenizers_agree(loaded, tok).ok


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alphabet": ""}, "alphabet is empty"),
        ({"alphabet": "0120"}, r"repeats the characters \['0'\]"),
        ({"alphabet": "01$"}, "also appear in the alphabet"),
        ({"alphabet": "01", "pad": "^"}, "must be distinct"),
        ({"alphabet": "01", "eos": ""}, "eos must be a non-empty string"),
    ],
)
def test_char_tokenizer_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        char_tokenizer(**kwargs)


def test_identical_tokenizers_agree(tok):
    comparison = compare_tokenizers(tok, char_tokenizer(ALPHABET))
    assert comparison == TokenizerComparison(errors=[], warnings=[])
    assert check_tokenizers_agree(tok, char_tokenizer(ALPHABET)).ok


def test_different_vocabulary(tok):
    other = char_tokenizer("0123456789+-")
    errors = compare_tokenizers(tok, other).errors
    assert len(errors) == 1
    assert errors[0].startswith("vocabulary: student has 16 tokens vs teacher 16")
    assert "'=': student 15 vs teacher missing" in errors[0]
    assert "'-': student missing vs teacher 15" in errors[0]
    bigger = compare_tokenizers(tok, char_tokenizer(ALPHABET + "*")).errors
    assert "student has 16 tokens vs teacher 17" in bigger[0] and "'*': student missing vs teacher 16" in bigger[0]


def test_different_eos(tok):
    other = char_tokenizer(ALPHABET)
    other.eos_token = "="
    errors = compare_tokenizers(tok, other).errors
    assert errors == ["eos_token_id: student 2 ('$') vs teacher 15 ('=')"]
    with pytest.raises(TokenizerMismatchError, match=r"eos_token_id: student 2 \('\$'\) vs teacher 15 \('='\)"):
        check_tokenizers_agree(tok, other)


def test_pad_equal_eos_is_a_warning(tok):
    student, teacher = char_tokenizer(ALPHABET), char_tokenizer(ALPHABET)
    student.pad_token, teacher.pad_token = "$", "$"
    comparison = check_tokenizers_agree(student, teacher)  # a warning does not raise
    assert comparison.ok and comparison.errors == []
    assert len(comparison.warnings) == 2
    assert comparison.warnings[0].startswith("student pad_token_id == eos_token_id == 2 ('$')")
    assert comparison.warnings[1].startswith("teacher pad_token_id == eos_token_id == 2")
    # Only one side: a pad-id mismatch (error) and one warning.
    mixed = compare_tokenizers(tok, teacher)
    assert mixed.errors == ["pad_token_id: student 0 ('_') vs teacher 2 ('$')"]
    assert len(mixed.warnings) == 1 and mixed.warnings[0].startswith("teacher pad_token_id")


def test_chat_template(tok):
    with_template = char_tokenizer(ALPHABET)
    with_template.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}="
    other_template = char_tokenizer(ALPHABET)
    other_template.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    # plain prompts: templates are not used, a difference is only a warning
    prompt_mode = compare_tokenizers(tok, with_template)
    assert prompt_mode.ok and prompt_mode.warnings == [
        "chat_template: the teacher tokenizer has one and the student has none (not used: prompts are plain text, "
        "data.format=prompt)"]
    # conversations, one tokenizer: the teacher reads the student's rendering, so templates must agree
    assert compare_tokenizers(tok, with_template, chat=True).errors[0].startswith(
        "chat_template: data.format=chat renders conversations with the student's chat template, but its tokenizer "
        "has none")
    errors = compare_tokenizers(with_template, other_template, chat=True).errors
    assert len(errors) == 1 and errors[0].startswith("chat_template: student and teacher templates differ; the "
                                                     "teacher would read conversations in the student's format")
    assert "teacher.tokenizer=own" in errors[0]
    same = char_tokenizer(ALPHABET)
    same.chat_template = with_template.chat_template
    assert compare_tokenizers(with_template, same, chat=True).ok
    # conversations, own tokenizers: each model renders with its own template
    own = compare_tokenizers(with_template, other_template, teacher_tokenizer="own", chat=True)
    assert own.ok and own.aligned == ["chat_template: student and teacher templates differ: each model renders the "
                                      "conversation with its own template"]
    missing = compare_tokenizers(with_template, char_tokenizer(ALPHABET), teacher_tokenizer="own", chat=True)
    assert missing.errors == ["chat_template: data.format=chat renders conversations with the teacher's chat template, "
                              "but its tokenizer has none; set tokenizer.chat_template"]


def test_own_tokenizer_mode_aligns_what_differs(tok):
    other = char_tokenizer("0123456789+=", bos="<", eos=">", pad="~", unk="!")
    own = compare_tokenizers(tok, other, teacher_tokenizer="own")
    assert own.ok and own.errors == []
    assert own.report() == [f"aligned: {a}" for a in own.aligned]
    assert own.aligned[0].startswith("vocabulary: student has 16 tokens vs teacher 16; 100% of the student's tokens "
                                     "have a teacher token with the same text")
    assert "eos_token_id: student 2 ('$') vs teacher 2 ('>'): the student's EOS is scored as the teacher's EOS" in \
        own.aligned
    narrow = char_tokenizer("0123456789+")  # no "=": the probe text does not survive the teacher's tokenizer
    warned = compare_tokenizers(tok, narrow, teacher_tokenizer="own")
    assert warned.ok and "does not spell the student's probe text" in warned.warnings[0]
    no_eos = char_tokenizer(ALPHABET)
    no_eos.eos_token = None
    assert "teacher tokenizer has no eos_token" in compare_tokenizers(tok, no_eos, teacher_tokenizer="own").errors[0]
    with pytest.raises(ValueError, match="must be 'same' or 'own'"):
        compare_tokenizers(tok, other, teacher_tokenizer="shared")


def test_same_vocab_different_encoding(tok):
    no_bos = char_tokenizer(ALPHABET)
    no_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")
    assert no_bos("12").input_ids == [5, 6]
    errors = compare_tokenizers(tok, no_bos).errors
    assert len(errors) == 1 and errors[0].startswith("encoding of the probe text '0123456789+=': student [1, 4,")


def test_mismatch_error_lists_every_difference_and_names_the_fixes(tok):
    other = char_tokenizer("0123456789+-", eos="#")
    other.chat_template = "x"
    with pytest.raises(TokenizerMismatchError) as info:
        check_tokenizers_agree(tok, other, chat=True, teacher_name="path/to/teacher")
    message = str(info.value)
    assert "4 difference(s)" in message
    assert "vocabulary:" in message and "eos_token_id: student 2 ('$') vs teacher 2 ('#')" in message
    assert "chat_template:" in message
    first = message.splitlines()[0]
    assert "student.tokenizer=path/to/teacher" in first and "teacher.tokenizer=own" in first
    assert isinstance(info.value, ValueError) and len(info.value.comparison.errors) == 4
    # the same pair is accepted when the teacher keeps its own tokenizer
    assert check_tokenizers_agree(tok, other, teacher_tokenizer="own").ok
