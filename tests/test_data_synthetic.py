"""The synthetic benchmark: determinism, disjoint splits, answers that are true of the pixels, LLaVA round trip."""

import collections
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from vlm_jax.data import pipeline, synthetic


def test_examples_are_a_pure_function_of_split_family_index_and_seed():
    a = synthetic.make_example("train", "ocr", 7)
    b = synthetic.make_example("train", "ocr", 7)
    assert (a.question, a.answer, a.id) == (b.question, b.answer, b.id)
    np.testing.assert_array_equal(a.image, b.image)
    c = synthetic.make_example("train", "ocr", 7, seed=1)
    assert not np.array_equal(a.image, c.image)


def test_train_and_validation_are_different_streams():
    # Scenes are drawn from a finite set of fixed templates (a one-digit OCR image has 240 variants), so a few
    # validation items may repeat a training item by chance; a copied or shifted stream would repeat them all.
    def items(split, family):
        return [(e.image.tobytes(), e.question) for e in synthetic.make_examples(split, family, 300)]
    for family in synthetic.FAMILIES:
        train, val = items("train", family), items("validation", family)
        assert len(set(train)) > 250 and len(set(val)) > 250
        assert sum(v in set(train) for v in val) < 30


def test_image_size_follows_the_argument():
    assert synthetic.make_example("train", "reasoning", 0).image.shape == (64, 64, 3)
    ex = synthetic.make_example("train", "reasoning", 0, image_size=96)
    assert ex.image.shape == (96, 96, 3) and ex.image.dtype == np.uint8


def test_colour_count_answers_match_the_blobs_in_the_image():
    checked = 0
    for ex in synthetic.make_examples("validation", "reasoning", 400):
        if ex.kind != "count_color":
            continue
        color = ex.question.split()[2]  # "how many <color> shapes are there?"
        mask = np.all(ex.image == np.asarray(synthetic.COLORS[color], np.uint8), axis=-1)
        _, n_blobs = ndimage.label(mask)
        assert str(n_blobs) == ex.answer, (ex.id, ex.question)
        checked += 1
    assert checked > 30


def test_shapes_sit_inside_their_own_cells_on_a_plain_background():
    # One object per 16-px cell (= 2x2 patches of the tiny tower, one token of a 4x4 pooled grid): the layout the
    # learnability of the family rests on. count_all answers = the number of cells that hold paint.
    cell = synthetic.CANVAS // synthetic.GRID
    checked = 0
    for ex in synthetic.make_examples("validation", "reasoning", 200):
        paint = np.any(ex.image != np.asarray(synthetic.BACKGROUND, np.uint8), axis=-1)
        cells = paint.reshape(synthetic.GRID, cell, synthetic.GRID, cell).swapaxes(1, 2)
        assert not cells[:, :, 0, :].any() and not cells[:, :, :, 0].any(), ex.id  # a gap row/column per cell
        if ex.kind == "count_all":
            assert str(int(cells.any((2, 3)).sum())) == ex.answer, ex.id
            checked += 1
    assert checked > 10


def _ink_pixels(image: np.ndarray, ink: str) -> np.ndarray:
    return np.all(image == np.array(synthetic.INKS[ink], np.uint8), axis=-1)


def _crop(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def test_ocr_answers_are_the_characters_drawn_in_the_asked_ink():
    font = ImageFont.load_default_imagefont()
    glyphs = {}
    for ch in synthetic.DEFAULT_ALPHABET:   # each digit as the font draws it, independently of the module
        img = Image.new("L", (12, 12), 0)
        ImageDraw.Draw(img).text((0, 0), ch, fill=255, font=font)
        glyphs[ch] = _crop(np.asarray(img) > 0)
    checked = collections.Counter()
    for ex in synthetic.make_examples("validation", "ocr", 200):
        if ex.kind == "read":
            ink = ex.question.removeprefix("what is written in ").removesuffix("?")
            drawn = _crop(_ink_pixels(ex.image, ink))
            assert [ch for ch, g in glyphs.items() if g.shape == drawn.shape and np.array_equal(g, drawn)] == [
                ex.answer], ex.id
        else:
            ch = ex.question.removeprefix("what color is ").removesuffix(" written in?")
            drawn = _crop(_ink_pixels(ex.image, ex.answer))
            assert drawn.shape == glyphs[ch].shape and np.array_equal(drawn, glyphs[ch]), ex.id
        checked[ex.kind] += 1
    assert checked["read"] > 50 and checked["ink"] > 50


def test_ocr_characters_sit_in_their_own_slots():
    # One character per 8 x 16 slot: a pooled token of one slot column (V=64) never holds two inks.
    for ex in synthetic.make_examples("train", "ocr", 100):
        inked = ~np.all(ex.image == np.array(synthetic.PAPER, np.uint8), axis=-1)
        slots = inked.reshape(64 // synthetic.SLOT_H, synthetic.SLOT_H, 64 // synthetic.SLOT_W, synthetic.SLOT_W)
        colours_per_slot = [len({tuple(c) for c in ex.image[r * 16:(r + 1) * 16, c * 8:(c + 1) * 8][
            inked[r * 16:(r + 1) * 16, c * 8:(c + 1) * 8]]}) for r in range(4) for c in range(8)]
        assert max(colours_per_slot) == 1
        assert 2 <= sum(slots.any((1, 3)).ravel()) <= len(synthetic.INKS)


def test_all_question_kinds_occur_with_short_balanced_answers():
    exs = [e for f in synthetic.FAMILIES for e in synthetic.make_examples("train", f, 600)]
    kinds = collections.Counter(e.kind for e in exs)
    assert set(kinds) == set(synthetic.REASONING_KINDS) | {"read", "ink"}
    yes_no = collections.Counter(e.answer for e in exs if e.answer in ("yes", "no"))
    assert abs(yes_no["yes"] - yes_no["no"]) < 0.15 * sum(yes_no.values())
    assert max(len(e.answer.split()) for e in exs) <= 2


def test_reasoning_kinds_select_the_questions():
    exs = synthetic.make_examples("train", "reasoning", 200, reasoning_kinds="count_all,compare")
    assert {e.kind for e in exs} == {"count_all", "compare"}
    same = synthetic.make_examples("train", "reasoning", 50, reasoning_kinds="")
    assert [e.question for e in same] == [e.question for e in synthetic.make_examples("train", "reasoning", 50)]


def test_follow_up_questions_are_about_the_same_image_and_give_nothing_away():
    for family in synthetic.FAMILIES:
        for j in range(40):
            one = synthetic.make_example("train", family, j)
            three = synthetic.make_example("train", family, j, questions=3)
            np.testing.assert_array_equal(one.image, three.image)
            assert (three.question, three.answer) == (one.question, one.answer)   # the first is the same
            questions = [one.question] + [q for q, _ in three.more]
            assert len(set(questions)) == len(questions)
            turns = three.turns()
            assert [r for r, _ in turns] == ["user", "assistant"] * (1 + len(three.more))
            if family == "ocr":   # each follow-up is about another character: no answer is in an earlier turn
                said = " ".join(t for _, t in turns[:2]).replace("?", "").split()
                for q, a in three.more:
                    subject = q.split()[3] if q.startswith("what color") else q.rstrip("?").split()[-1]
                    assert a not in said and subject not in said, (j, turns)
                    said += q.replace("?", "").split() + [a]


def test_bad_names_raise_clear_errors():
    with pytest.raises(ValueError, match="family"):
        synthetic.make_example("train", "maths", 0)
    with pytest.raises(ValueError, match="split"):
        synthetic.make_example("test", "ocr", 0)
    with pytest.raises(ValueError, match="ocr_alphabet"):
        synthetic.make_example("train", "ocr", 0, ocr_alphabet="ab")
    with pytest.raises(ValueError, match="one per ink"):
        synthetic.make_example("train", "ocr", 0, ocr_alphabet="ABCD")
    with pytest.raises(ValueError, match="reasoning_kinds"):
        synthetic.make_example("train", "reasoning", 0, reasoning_kinds="count_all,astrology")
    with pytest.raises(ValueError, match="may fit no scene"):
        synthetic.make_example("train", "reasoning", 0, reasoning_kinds="color_of")
    with pytest.raises(ValueError, match="questions"):
        synthetic.make_example("train", "reasoning", 0, questions=0)
    with pytest.raises(ValueError, match="families"):
        synthetic.parse_families("reasoning,reasoning")


def test_written_out_as_llava_it_reads_back_into_identical_batches(tmp_path):
    n = 24
    cfg = pipeline.default_config()
    cfg.synthetic.train_size = n
    source = synthetic.SyntheticSource("train", n)
    examples = [synthetic.make_example("train", source.families[i % 2], i // 2) for i in range(n)]
    json_path = synthetic.write_llava(str(tmp_path), examples)
    with open(json_path) as f:
        record = json.load(f)[1]
    assert record["conversations"][0]["value"].startswith("<image>\n") and record["image"].endswith(".png")

    llava_cfg = pipeline.default_config()
    llava_cfg.source = "llava"
    llava_cfg.llava.json_path, llava_cfg.llava.image_dir = json_path, str(tmp_path)
    tok = pipeline.make_tokenizer(cfg)
    kw = {"tokenizer": tok, "num_visual_tokens": 4, "image_size": 64, "batch_size": 8, "seed": 5}
    direct = pipeline.make_train_iterator(cfg, **kw)
    via_llava = pipeline.make_train_iterator(llava_cfg, **kw)
    for _ in range(4):  # 32 examples: crosses an epoch boundary
        a, b = next(direct), next(via_llava)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert via_llava.bad_input.total == 0
