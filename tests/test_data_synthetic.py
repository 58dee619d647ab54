"""The synthetic benchmark: determinism, disjoint splits, answers that are true of the pixels, LLaVA round trip."""

import collections
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from vlm_jax.data import pipeline, synthetic
from vlm_jax.data.synthetic import SyntheticOptions, reasoning


def test_examples_are_a_pure_function_of_split_family_index_and_seed():
    a = synthetic.make_example("train", "ocr", 7)
    b = synthetic.make_example("train", "ocr", 7)
    assert (a.question, a.answer, a.id) == (b.question, b.answer, b.id)
    np.testing.assert_array_equal(a.image, b.image)
    c = synthetic.make_example("train", "ocr", 7, SyntheticOptions(seed=1))
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
    ex = synthetic.make_example("train", "reasoning", 0, SyntheticOptions(image_size=96))
    assert ex.image.shape == (96, 96, 3) and ex.image.dtype == np.uint8


def test_colour_count_answers_match_the_blobs_in_the_image():
    checked = 0
    for ex in synthetic.make_examples("validation", "reasoning", 200, SyntheticOptions(reasoning_kinds="count_color")):
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


def test_ocr_read_answers_are_drawn_in_the_asked_quadrant():
    font = ImageFont.load_default_imagefont()
    checked = 0
    for ex in synthetic.make_examples("validation", "ocr", 150):
        if ex.kind != "read":
            continue
        glyph = Image.new("L", (40, 12), 0)
        ImageDraw.Draw(glyph).text((0, 0), ex.answer, fill=255, font=font)
        g = np.kron(np.asarray(glyph) > 0, np.ones((2, 2), bool))  # default ocr_scale=2: each font pixel is 2x2
        rows, cols = np.flatnonzero(g.any(1)), np.flatnonzero(g.any(0))
        g = g[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        q = synthetic.QUADRANTS.index(ex.question.removeprefix("what is written in the ").removesuffix("?"))
        ink = ex.image.max(-1) < 128
        quad = ink[(q // 2) * 32:(q // 2) * 32 + 32, (q % 2) * 32:(q % 2) * 32 + 32]
        h, w = g.shape
        found = any(np.array_equal(quad[y:y + h, x:x + w], g) for y in range(33 - h) for x in range(33 - w))
        assert found, (ex.id, ex.answer)
        checked += 1
    assert checked > 20


def test_detail_answers_are_the_colour_inside_the_asked_marker():
    checked = 0
    for ex in synthetic.make_examples("validation", "detail", 100):
        outer = ex.question.removeprefix("what color is inside the ").removesuffix(" one?")
        coloured = np.all(ex.image == np.array(synthetic.COLORS[outer], np.uint8), axis=-1)
        parts, n = ndimage.label(coloured)
        # Exactly one ring of that colour (8x8 minus its 4x4 centre; another marker's centre may share the colour).
        rings = [k for k in range(1, n + 1) if (parts == k).sum() == 64 - 16]
        assert len(rings) == 1, ex.id
        rows, cols = np.flatnonzero((parts == rings[0]).any(1)), np.flatnonzero((parts == rings[0]).any(0))
        assert rows[-1] - rows[0] == cols[-1] - cols[0] == 7 and rows[0] % 8 == 0 == cols[0] % 8, ex.id   # one patch
        centre = ex.image[rows[0] + 2:rows[0] + 6, cols[0] + 2:cols[0] + 6].reshape(-1, 3)
        assert {tuple(c) for c in centre} == {synthetic.INNER_COLORS[ex.answer]}, ex.id
        checked += 1
    assert checked == 100


def test_all_question_kinds_occur_with_short_balanced_answers():
    exs = [e for f in synthetic.FAMILIES for e in synthetic.make_examples("train", f, 600)]
    kinds = collections.Counter(e.kind for e in exs)
    assert set(kinds) == set(reasoning.DEFAULT_KINDS) | {"read", "where", "inside"}   # single characters by default
    longer = synthetic.make_examples("train", "ocr", 300, SyntheticOptions(ocr_length=2))
    assert {e.kind for e in longer} == {"read", "where", "char"}
    assert max(len(e.answer) for e in longer if e.kind == "read") == 2
    # compare_color is left out: a scene of 5 objects in 5 colours allows only "no"; has_shape: a scene holding all
    # three shapes allows only "yes" (checked below on the smoke grid's scenes of 2-4 objects).
    yes_no = collections.Counter(e.answer for e in exs if e.answer in ("yes", "no")
                                 and e.kind not in ("compare_color", "has_shape"))
    assert abs(yes_no["yes"] - yes_no["no"]) < 0.15 * sum(yes_no.values())
    shapes = collections.Counter(e.answer for e in synthetic.make_examples(
        "train", "reasoning", 300, SyntheticOptions(reasoning_kinds="has_shape", reasoning_grid=2)))
    assert set(shapes) == {"yes", "no"} and shapes["yes"] < 0.65 * sum(shapes.values())
    assert max(len(e.answer.split()) for e in exs) <= 2


def test_a_coarser_reasoning_grid_draws_bigger_objects_whose_colours_answer_has_color():
    for ex in synthetic.make_examples("validation", "reasoning", 60, SyntheticOptions(
            reasoning_grid=2, reasoning_kinds="count_all,has_color")):
        painted = np.any(ex.image != np.array(synthetic.BACKGROUND, np.uint8), axis=-1)
        parts, n = ndimage.label(painted)
        sizes = [int((parts == k).sum()) for k in range(1, n + 1)]
        assert 2 <= n <= 4 and min(sizes) > 400, ex.id   # 2-4 objects of a 32-px cell each (16-px cells: < 200 px)
        if ex.kind == "count_all":
            assert ex.answer == str(n), ex.id
        else:
            colour = ex.question.split()[3]
            present = np.all(ex.image == np.array(synthetic.COLORS[colour], np.uint8), axis=-1).any()
            assert ex.answer == ("yes" if present else "no"), ex.id


def test_reasoning_kinds_select_the_questions():
    exs = synthetic.make_examples("train", "reasoning", 200, SyntheticOptions(reasoning_kinds="count_all,compare"))
    assert {e.kind for e in exs} == {"count_all", "compare"}
    colours_only = synthetic.make_examples("train", "reasoning", 100, SyntheticOptions(reasoning_kinds="compare_color"))
    assert all(e.question.endswith(" shapes?") and e.question.count("shapes") == 2 for e in colours_only)
    same = synthetic.make_examples("train", "reasoning", 50, SyntheticOptions(reasoning_kinds=""))
    assert [e.question for e in same] == [e.question for e in synthetic.make_examples("train", "reasoning", 50)]


def test_follow_up_questions_are_about_the_same_image_and_give_nothing_away():
    for family in synthetic.FAMILIES:
        for j in range(40):
            one = synthetic.make_example("train", family, j)
            three = synthetic.make_example("train", family, j, SyntheticOptions(questions=3))
            np.testing.assert_array_equal(one.image, three.image)
            assert (three.question, three.answer) == (one.question, one.answer)   # the first is the same
            questions = [one.question] + [q for q, _ in three.more]
            assert len(set(questions)) == len(questions)
            turns = three.turns()
            assert [r for r, _ in turns] == ["user", "assistant"] * (1 + len(three.more))
            if family == "detail":   # each follow-up is about another marker
                outers = [q.split()[-2] for q in questions]
                assert len(set(outers)) == len(outers)
            if family == "ocr":   # each follow-up is about another quadrant's string
                answers = [one.answer] + [a for _, a in three.more]
                quadrants = [a if q.startswith("where") else q.removesuffix("?").split("the ")[-1]
                             for q, a in zip(questions, answers)]
                assert len(set(quadrants)) == len(quadrants) and set(quadrants) <= set(synthetic.QUADRANTS)


def test_bad_names_raise_clear_errors():
    with pytest.raises(ValueError, match="family"):
        synthetic.make_example("train", "maths", 0)
    with pytest.raises(ValueError, match="split"):
        synthetic.make_example("test", "ocr", 0)
    with pytest.raises(ValueError, match="ocr_alphabet"):
        synthetic.make_example("train", "ocr", 0, SyntheticOptions(ocr_alphabet="ab"))
    with pytest.raises(ValueError, match="distinct strings"):
        synthetic.make_example("train", "ocr", 0, SyntheticOptions(ocr_alphabet="AB", ocr_length=1))
    with pytest.raises(ValueError, match="must fit a 32 px quadrant"):
        synthetic.make_example("train", "ocr", 0, SyntheticOptions(ocr_length=3, ocr_scale=2))
    with pytest.raises(ValueError, match="reasoning_kinds"):
        synthetic.make_example("train", "reasoning", 0, SyntheticOptions(reasoning_kinds="count_all,astrology"))
    with pytest.raises(ValueError, match="may fit no scene"):
        synthetic.make_example("train", "reasoning", 0, SyntheticOptions(reasoning_kinds="color_of"))
    with pytest.raises(ValueError, match="reasoning_grid"):
        synthetic.make_example("train", "reasoning", 0, SyntheticOptions(reasoning_grid=3))
    with pytest.raises(ValueError, match="questions"):
        synthetic.make_example("train", "reasoning", 0, SyntheticOptions(questions=0))
    with pytest.raises(ValueError, match="families"):
        synthetic.parse_families("reasoning,reasoning")


def test_options_are_read_from_data_synthetic_with_one_question_per_image_outside_training():
    s = pipeline.default_config().synthetic
    s.seed, s.max_items, s.train_questions, s.detail_kinds, s.describe = 3, 2, 4, "corner", True
    train = SyntheticOptions.from_config(s, image_size=32, split="train")
    assert train == SyntheticOptions(seed=3, image_size=32, questions=4, max_items=2, detail_kinds="corner",
                                     describe=True)
    assert SyntheticOptions.from_config(s, image_size=32) == dataclasses.replace(train, questions=1)
    older = {"seed": 3, "ocr_length": 2}   # a run's config from before later keys existed: their defaults
    assert SyntheticOptions.from_config(older) == SyntheticOptions(seed=3, ocr_length=2)
    # kind lists are kept checked, so equal options draw equal items
    assert SyntheticOptions(reasoning_kinds="") == SyntheticOptions(reasoning_kinds=list(reasoning.DEFAULT_KINDS))
    assert SyntheticOptions(detail_kinds=" ").detail_kinds == "inside"
    with pytest.raises(dataclasses.FrozenInstanceError):
        train.seed = 1


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


def test_family_weights_repeat_a_family_in_the_cycle_and_every_item_is_drawn_once():
    source = synthetic.SyntheticSource("train", 40, families="reasoning,detail", family_weights="1,3")
    ids = [source[i]["id"] for i in range(40)]
    # cycle of 4: one reasoning item, then three detail items; each family's items counted 0, 1, 2, ... in order
    assert ids[:8] == ["train-reasoning-0", "train-detail-0", "train-detail-1", "train-detail-2",
                       "train-reasoning-1", "train-detail-3", "train-detail-4", "train-detail-5"]
    per_family = collections.Counter(i.split("-")[1] for i in ids)
    assert per_family == {"reasoning": 10, "detail": 30}
    assert len(set(ids)) == 40
    # the item is the family's own item of that number, whatever the cycle
    assert source[7]["turns"] == synthetic.SyntheticSource("train", 40, families="detail")[5]["turns"]
    for bad in ("1", "1,0", "1,x", "1,2,3"):
        with pytest.raises(ValueError, match="family_weights"):
            synthetic.SyntheticSource("train", 40, families="reasoning,detail", family_weights=bad)


def test_a_described_detail_scene_holds_each_marker_as_one_word_and_the_same_answers():
    """Told in words, a detail scene is a row of 'empty' and one word per marker (outer then centre colour); the
    question about the marker named 'red' is answered by that word's second colour, as in the picture."""
    for j in range(50):
        ex = synthetic.make_example("train", "detail", j, SyntheticOptions(describe=True, questions=3))
        assert ex.image is None and "<image>" not in ex.prompt
        words = ex.description.split()
        markers = [w for w in words if w != synthetic.EMPTY_SLOT]
        assert 4 <= len(markers) <= 5 and len(words) <= 64 and len(set(markers)) == len(markers)
        split = {next(o for o in synthetic.COLORS if w.startswith(o)): w for w in markers}
        for question, answer in [(ex.question, ex.answer), *ex.more]:
            outer = question.split()[-2]
            assert split[outer] == outer + answer and answer in synthetic.INNER_COLORS
    with pytest.raises(ValueError, match="described"):
        synthetic.make_example("train", "ocr", 0, SyntheticOptions(describe=True))
    with pytest.raises(ValueError, match="detail_kinds"):
        synthetic.make_example("train", "detail", 0, SyntheticOptions(detail_kinds="nope"))


def test_corner_scenes_ask_the_centre_of_the_top_left_marker_in_three_sizes_and_tell_the_same_cells_in_words():
    """The `corner` kind: the answer is the centre colour of the marker drawn in the top-left corner, 8, 16 or 32 px
    wide (read off the pixels: the widest square whose 2-px ring and centre are one colour each); other 8-px markers
    sit in some of the cells it leaves free; told in words, word k is cell k in reading order."""
    others, sizes = [], []
    for j in range(90):
        ex = synthetic.make_example("validation", "detail", j, SyntheticOptions(detail_kinds="corner"))
        assert ex.question == "what color is inside the top left marker?"
        img = ex.image.astype(int)

        def one_colour(region):
            return len({tuple(c) for c in region.reshape(-1, 3)}) == 1
        size = max(s for s in (8, 16, 32) if one_colour(img[2:s - 2, 2:s - 2]) and one_colour(
            np.concatenate([img[:2, :s].reshape(-1, 3), img[s - 2:s, :s].reshape(-1, 3),
                            img[:s, :2].reshape(-1, 3), img[:s, s - 2:s].reshape(-1, 3)])))
        sizes.append(size)
        assert tuple(img[4, 4]) == synthetic.INNER_COLORS[ex.answer], ex.id
        assert tuple(img[0, 0]) in synthetic.COLORS.values(), ex.id
        span = size // 8
        painted = [c for c in range(64) if (img[c // 8 * 8, c % 8 * 8] != synthetic.BACKGROUND).any()]
        outside = [c for c in painted if c // 8 >= span or c % 8 >= span]
        others.append(len(outside))
        told = synthetic.make_example("validation", "detail", j, SyntheticOptions(detail_kinds="corner", describe=True))
        words = told.description.split()
        assert len(words) == 64 and told.answer == ex.answer
        assert [c for c, w in enumerate(words) if w != synthetic.EMPTY_SLOT] == [0] + outside, ex.id
        assert words[0].endswith(ex.answer)
    assert set(sizes) == {8, 16, 32} and min(sizes.count(s) for s in (8, 16, 32)) > 15
    assert 3 < np.mean(others) < 30 and min(others) < max(others)   # neighbours to pool with, in varying number


def test_a_described_reasoning_scene_names_its_objects_and_keeps_the_questions_of_the_drawn_one():
    for j in range(40):
        drawn = synthetic.make_example("train", "reasoning", j, SyntheticOptions(
            reasoning_grid=2, questions=3, reasoning_kinds="has_color,has_shape"))
        told = synthetic.make_example("train", "reasoning", j, SyntheticOptions(
            reasoning_grid=2, questions=3, reasoning_kinds="has_color,has_shape", describe=True))
        assert told.image is None and (told.question, told.answer, told.more) == (drawn.question, drawn.answer,
                                                                                drawn.more)
        words = told.description.split()
        colours, shapes = set(words[0::2]), {w for w in words[1::2]}
        assert colours <= set(synthetic.COLORS) and shapes <= set(synthetic.SHAPES)
        painted = {tuple(c) for c in drawn.image.reshape(-1, 3)} - {synthetic.BACKGROUND}
        assert {synthetic.COLORS[c] for c in colours} <= painted   # every colour told is drawn
        for question, answer in [(told.question, told.answer), *told.more]:
            asked = question.removeprefix("is there a ").removesuffix("?").removesuffix(" shape")
            assert answer == ("yes" if asked in colours | shapes else "no"), (question, words)


def test_value_questions_answer_one_value_per_drawn_colour_plus_or_times_the_asked_number():
    """Invariants, not the table: the answer minus the asked number depends on the drawn colour alone, the five
    colours have five different values, times 1 is that value and times 0 is 0."""
    value_of: dict[tuple, set] = collections.defaultdict(set)
    times: list[tuple] = []
    for ex in synthetic.make_examples("validation", "reasoning", 600, SyntheticOptions(
            reasoning_grid=2, reasoning_objects=1, reasoning_kinds="has_color,value_plus,value_times")):
        if ex.kind == "has_color":
            continue
        k = int(ex.question.removesuffix("?").split()[-1])
        colours = {tuple(c) for c in ex.image.reshape(-1, 3)} - {synthetic.BACKGROUND}
        drawn = max(colours, key=lambda c: (ex.image.reshape(-1, 3) == c).all(1).sum())   # edges blend a little
        if ex.kind == "value_plus":
            value_of[drawn].add(int(ex.answer) - k)
        else:
            times.append((drawn, k, int(ex.answer)))
    assert set(value_of) == {tuple(c) for c in synthetic.COLORS.values()}
    assert all(len(v) == 1 for v in value_of.values()) and len({min(v) for v in value_of.values()}) == 5
    ones, zeros = [(c, a) for c, k, a in times if k == 1], [a for _, k, a in times if k == 0]
    assert ones and zeros and all({a} == value_of[c] for c, a in ones) and set(zeros) == {0}


def test_big_times_questions_compute_by_hand_and_stay_out_of_the_default_kinds():
    """value_times_big on fixed one-object scenes, answers worked by hand from COLOR_VALUES (blue = 3, purple = 5);
    '' does not select it, so configs that select '' draw the items they drew before."""
    blue = [reasoning.ColoredShape("blue", "circle", (0, 0))]
    purple = [reasoning.ColoredShape("purple", "square", (0, 0))]

    class Fixed:   # the draws in order: which one-of-its-shape object (the only one), then the number
        def __init__(self, *values):
            self.values = [0, *values]

        def integers(self, *args):
            return self.values.pop(0)
    big = reasoning.REASONING_KINDS["value_times_big"]
    assert big(Fixed(57), blue) == ("what is the value of the circle times 57?", "171")   # 3 * 57
    assert big(Fixed(99), purple) == ("what is the value of the square times 99?", "495")   # the largest answer
    assert not set(reasoning.OPT_IN_KINDS) & set(SyntheticOptions().reasoning_kinds.split(","))
    # every answer is at most 3 digits (the grid's 3 answer tokens) and the number asked falls in 20-99
    tok = pipeline.make_tokenizer(pipeline.default_config())
    for ex in synthetic.make_examples("validation", "reasoning", 300, SyntheticOptions(
            reasoning_grid=1, reasoning_objects=1, reasoning_kinds="has_color,value_times_big")):
        if ex.kind == "value_times_big":
            (number,) = [int(w) for w in ex.question.removesuffix("?").split() if w.isdigit()]
            assert 20 <= number < 100 and len(tok.encode(ex.answer)) <= 3 and int(ex.answer) <= 495
