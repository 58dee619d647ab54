"""Tokenizers and the ChatML template."""

import pytest
from tokenizers import Tokenizer

from vlm_jax.data import synthetic
from tests.tokenizer_fixtures import build_tokenizer_json
from vlm_jax.data.tokenize import HFTokenizer, WordTokenizer, render_chat


def build_hf_tokenizer(path, extra_specials=()):
    return build_tokenizer_json(str(path), extra_specials=extra_specials)


def test_word_tokenizer_round_trips_every_synthetic_text_without_unknowns():
    tok = WordTokenizer(synthetic.VOCAB_WORDS)
    assert tok.vocab_size <= 128
    for family in synthetic.FAMILIES:
        for ex in synthetic.make_examples("train", family, 200):
            for text in (ex.question, ex.answer):
                ids = tok.encode(text)
                assert tok.unk_id not in ids, text
                assert tok.decode(ids) == text


def test_word_tokenizer_spells_unknown_words_and_marks_their_space():
    tok = WordTokenizer(["where", "is", "written"])
    ids = tok.encode("where is K7 written?")
    assert [tok.pieces[i] for i in ids] == ["where", "is", "\u2581", "K", "7", "written", "?"]
    assert tok.decode(ids) == "where is K7 written?"
    assert tok.encode("zebra") == [tok.unk_id]  # lower-case letters outside the word list are not spellable


def test_word_tokenizer_rejects_ids_outside_its_vocabulary():
    tok = WordTokenizer(["a"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_render_chat_layout_and_answer_flags_with_word_tokenizer():
    tok = WordTokenizer(["what", "color", "red"])
    ids, is_answer, slots = render_chat(tok, [("user", "<image>\nwhat color?"), ("assistant", "red")],
                                        num_visual_tokens=2)
    names = [tok.pieces[i] for i in ids]
    assert names == ["<|im_start|>", "user", "\n", "<image>", "<image>", "\n", "what", "color", "?", "<|im_end|>",
                     "\n", "<|im_start|>", "assistant", "\n", "red", "<|im_end|>", "\n"]
    assert slots == [3, 4]
    assert [n for n, a in zip(names, is_answer) if a] == ["red", "<|im_end|>"]


def test_render_chat_generation_prompt_and_system_turn():
    tok = WordTokenizer(["hi"])
    ids, is_answer, slots = render_chat(tok, [("user", "hi")], num_visual_tokens=4, system_prompt="hi",
                                        add_generation_prompt=True)
    assert [tok.pieces[i] for i in ids] == ["<|im_start|>", "system", "\n", "hi", "<|im_end|>", "\n",
                                            "<|im_start|>", "user", "\n", "hi", "<|im_end|>", "\n",
                                            "<|im_start|>", "assistant", "\n"]
    assert not any(is_answer) and slots == []


def test_render_chat_rejects_unknown_roles():
    with pytest.raises(ValueError, match="chat role"):
        render_chat(WordTokenizer([]), [("gpt", "x")], num_visual_tokens=1)


def test_hf_tokenizer_loads_specials_by_name_and_falls_back_to_pad_for_image_slots(tmp_path):
    tok = HFTokenizer(build_hf_tokenizer(tmp_path / "tokenizer.json"))
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.pad_id == raw.token_to_id("<|endoftext|>")
    assert tok.eos_id == raw.token_to_id("<|im_end|>")
    assert tok.im_start_id == raw.token_to_id("<|im_start|>")
    assert tok.image_slot_id == tok.pad_id
    assert tok.decode(tok.encode("What color is it?")) == "What color is it?"


def test_hf_tokenizer_uses_an_image_token_when_the_vocabulary_has_one(tmp_path):
    tok = HFTokenizer(build_hf_tokenizer(tmp_path / "t.json", extra_specials=["<image>"]))
    assert tok.image_slot_id == Tokenizer.from_file(str(tmp_path / "t.json")).token_to_id("<image>")
    assert tok.image_slot_id != tok.pad_id


def test_hf_tokenizer_errors_name_the_missing_token_or_file(tmp_path):
    path = build_hf_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="no eos token '<eos>'"):
        HFTokenizer(path, eos_token="<eos>")
    with pytest.raises(ValueError, match="cannot load tokenizer.json"):
        HFTokenizer(str(tmp_path / "missing.json"))


# --- Qwen ChatML and LLaVA plain layouts with a byte-level BPE tokenizer --------------------------------------------

_RECORD = [("user", "<image>\nWhat color is it?"), ("assistant", "Red."), ("user", "Why?"),
           ("assistant", "It is red because it is.")]


def _expected(tok, text: str, answers: list[str]):
    """Ids of the whole rendered text encoded at once (special tokens recognised), and per id whether it lies in an
    answer span (found in the text by position, not by our renderer)."""
    enc = tok.encode(text, add_special_tokens=False)
    spans, start = [], 0
    for answer in answers:
        start = text.index(answer, start)
        spans.append((start, start + len(answer)))
        start += len(answer)
    flags = [any(a <= s and e <= b for a, b in spans) for s, e in enc.offsets]
    return enc.ids, flags


def test_chatml_layout_of_a_two_turn_record_token_by_token(tmp_path):
    from tests.tokenizer_fixtures import build_bpe_tokenizer_json
    from tokenizers import Tokenizer

    path = build_bpe_tokenizer_json(tmp_path / "tokenizer.json")
    ours = HFTokenizer(path)
    V = 3
    ids, is_answer, slots = render_chat(ours, _RECORD, num_visual_tokens=V, system_prompt="You are a helpful assistant.")
    # Qwen's chat template, written out as text
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\n" + "<image>" * V + "\nWhat color is it?<|im_end|>\n"
            "<|im_start|>assistant\nRed.<|im_end|>\n"
            "<|im_start|>user\nWhy?<|im_end|>\n"
            "<|im_start|>assistant\nIt is red because it is.<|im_end|>\n")
    tok = Tokenizer.from_file(path)
    want_ids, _ = _expected(tok, text, [])
    # loss on each answer and the <|im_end|> that closes it
    _, want_flags = _expected(tok, text, ["Red.<|im_end|>", "It is red because it is.<|im_end|>"])
    assert ids == want_ids
    assert is_answer == want_flags
    assert [ids[i] for i in slots] == [tok.token_to_id("<image>")] * V and len(set(slots)) == V


def test_plain_layout_of_a_two_turn_record_token_by_token(tmp_path):
    from tests.tokenizer_fixtures import build_bpe_tokenizer_json
    from tokenizers import Tokenizer

    from vlm_jax.data.tokenize import render_plain

    path = build_bpe_tokenizer_json(tmp_path / "tokenizer.json")
    ours, tok, V = HFTokenizer(path), Tokenizer.from_file(path), 4
    record = [("user", "Describe the image briefly.\n<image>"), ("assistant", "A cat on a mat.")]
    ids, is_answer, slots = render_plain(ours, record, num_visual_tokens=V, system_prompt="ignored")
    text = "<image>" * V + "A cat on a mat.\n"      # LLaVA's plain: the image, the caption, the separator
    want_ids, want_flags = _expected(tok, text, ["A cat on a mat.\n"])
    assert ids == want_ids and is_answer == want_flags and slots == list(range(V))
    with pytest.raises(ValueError, match="plain format takes one user turn"):
        render_plain(ours, _RECORD, num_visual_tokens=V)
