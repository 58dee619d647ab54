"""Conversation -> fixed-shape arrays: token/label/slot layout, truncation, question, prompts."""

import numpy as np
import pytest
from tokenizers import Tokenizer

from vlm_jax.data import errors, features
from tests.tokenizer_fixtures import build_tokenizer_json
from vlm_jax.data.tokenize import HFTokenizer, WordTokenizer

TURNS = [("user", "<image>\nWhat color is it?"), ("assistant", "Red."),
         ("user", "Why?"), ("assistant", "It is red because it is.")]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = build_tokenizer_json(str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))
    return HFTokenizer(path), Tokenizer.from_file(path)


def test_llava_record_layout_exact_tokens_targets_loss_and_slots(hf):
    tok, raw = hf
    layout = features.TextLayout(seq_len=40, question_len=8, num_visual_tokens=3)
    ex = features.encode_conversation(tok, TURNS, layout, has_image=True)
    slot = "<|endoftext|>"  # no <image> in this vocabulary: the slots hold the pad id
    expected = (["<|im_start|>", "user", "Ċ", slot, slot, slot, "Ċ", "What", "Ġcolor", "Ġis", "Ġit", "?",
                 "<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ", "Red", ".", "<|im_end|>", "Ċ",
                 "<|im_start|>", "user", "Ċ", "Why", "?", "<|im_end|>", "Ċ",
                 "<|im_start|>", "assistant", "Ċ", "It", "Ġis", "Ġred", "Ġbecause", "Ġit", "Ġis", ".",
                 "<|im_end|>", "Ċ"])
    n, length = len(expected), 43
    want_tokens = [raw.token_to_id(t) for t in expected] + [tok.pad_id] * (length - n)
    np.testing.assert_array_equal(ex["tokens"], want_tokens)
    np.testing.assert_array_equal(ex["targets"], want_tokens[1:n] + [0] * (length - n + 1))
    np.testing.assert_array_equal(ex["attention_mask"], [1] * n + [0] * (length - n))
    np.testing.assert_array_equal(ex["image_positions"], [3, 4, 5])
    # Loss sits on the positions whose *target* is an answer token: "Red . <|im_end|>" (tokens 17..19) and
    # "It ... . <|im_end|>" (tokens 31..38), i.e. loss positions 16..18 and 30..37.
    assert np.flatnonzero(ex["loss_mask"]).tolist() == [16, 17, 18] + list(range(30, 38))
    assert ex["loss_mask"].dtype == np.float32 and set(np.unique(ex["loss_mask"])) == {0.0, 1.0}
    # The question: the first user turn without the placeholder, right-padded.
    q = [raw.token_to_id(t) for t in ["What", "Ġcolor", "Ġis", "Ġit", "?"]]
    np.testing.assert_array_equal(ex["question_tokens"], q + [tok.pad_id] * 3)
    np.testing.assert_array_equal(ex["question_mask"], [1] * 5 + [0] * 3)
    assert {k: v.dtype for k, v in ex.items() if k != "loss_mask"} == {
        k: np.dtype(np.int32) for k in ex if k != "loss_mask"}


def test_truncation_cuts_the_tail_but_keeps_slots_and_first_answer(hf):
    tok, _ = hf
    layout = features.TextLayout(seq_len=18, question_len=8, num_visual_tokens=3)  # L = 21: cut inside turn 2
    ex = features.encode_conversation(tok, TURNS, layout, has_image=True)
    full = features.encode_conversation(tok, TURNS, features.TextLayout(40, 8, 3), has_image=True)
    np.testing.assert_array_equal(ex["tokens"], full["tokens"][:21])
    np.testing.assert_array_equal(ex["image_positions"], [3, 4, 5])
    assert ex["attention_mask"].all()
    assert ex["targets"][-1] == 0 and ex["loss_mask"][-1] == 0  # the last kept token has no next token
    assert np.flatnonzero(ex["loss_mask"]).tolist() == [16, 17, 18]


def test_text_longer_than_the_limit_is_too_long_when_slots_or_all_answers_would_be_cut(hf):
    tok, _ = hf
    long_q = [("user", "What color is it? " * 10 + "<image>"), ("assistant", "Red.")]
    with pytest.raises(errors.BadRecord, match="image slots end"):
        features.encode_conversation(tok, long_q, features.TextLayout(20, 8, 3), has_image=True)
    with pytest.raises(errors.BadRecord, match="no answer token"):  # slots fit, the answer does not
        features.encode_conversation(tok, TURNS, features.TextLayout(12, 8, 3), has_image=True)


def test_text_only_record_points_every_slot_out_of_range(hf):
    tok, _ = hf
    layout = features.TextLayout(seq_len=30, question_len=4, num_visual_tokens=5)
    ex = features.encode_conversation(tok, [("user", "Why?"), ("assistant", "Red.")], layout, has_image=False)
    np.testing.assert_array_equal(ex["image_positions"], [35] * 5)
    assert tok.pad_id not in ex["tokens"][: ex["attention_mask"].sum()]


def test_long_question_keeps_its_end_for_the_compressor():
    tok = WordTokenizer(["a", "b", "c", "d", "e"])
    tokens, mask = features.encode_question(tok, "a b c d e", 3)
    assert tok.decode(tokens) == "c d e" and mask.tolist() == [1, 1, 1]
    tokens, mask = features.encode_question(tok, "", 3)
    assert tokens.tolist() == [tok.eos_id, tok.pad_id, tok.pad_id] and mask.tolist() == [1, 0, 0]


@pytest.mark.parametrize("turns, has_image, reason", [
    ([], True, errors.EMPTY_CONVERSATION),
    ([("user", "<image>\nhi")], True, errors.ONE_SIDED_CONVERSATION),
    ([("assistant", "hi")], False, errors.ONE_SIDED_CONVERSATION),
    ([("assistant", "x"), ("user", "<image>")], True, errors.BAD_ROLES),
    ([("user", "hi"), ("assistant", "x")], True, errors.IMAGE_PLACEHOLDERS),
    ([("user", "<image><image>"), ("assistant", "x")], True, errors.IMAGE_PLACEHOLDERS),
    ([("user", "<image>"), ("assistant", "x")], False, errors.IMAGE_PLACEHOLDERS),
    ([("user", "hi"), ("assistant", "<image>")], True, errors.IMAGE_PLACEHOLDERS),
])
def test_check_turns_rejects_malformed_conversations(turns, has_image, reason):
    with pytest.raises(errors.BadRecord) as e:
        features.check_turns(turns, has_image)
    assert e.value.reason == reason


def test_prompt_ends_with_the_assistant_header_and_reports_its_length():
    tok = WordTokenizer(["what", "color"])
    layout = features.TextLayout(seq_len=16, question_len=4, num_visual_tokens=2)
    p = features.encode_prompt(tok, "<image>\nwhat color?", layout)
    n = int(p["prompt_length"])
    names = [tok.pieces[i] for i in p["tokens"][:n]]
    assert names[-3:] == ["<|im_start|>", "assistant", "\n"] and names.count("<image>") == 2
    assert p["attention_mask"].sum() == n and p["tokens"][n:].tolist() == [tok.pad_id] * (18 - n)
    np.testing.assert_array_equal(p["image_positions"], [3, 4])
    with pytest.raises(ValueError, match="does not fit"):
        features.encode_prompt(tok, "<image>\n" + "what " * 30, layout)
