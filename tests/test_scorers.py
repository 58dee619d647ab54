"""Benchmark scorers against hand-computed cases."""

import pytest

from vlm_jax.evaluation import scorers


def _refs(*answer_lists):
    return [{"question_id": i, "answers": a} for i, a in enumerate(answer_lists)]


# ---------------------------------------------------------------------------------------------------------- VQA


@pytest.mark.parametrize("prediction, normalized", [
    ("Two", "2"),                       # number words -> digits
    ("A dog.", "dog"),                  # article dropped, final period removed
    ("the  Red  Car ", "red car"),      # articles, case, whitespace
    ("2.5", "2.5"),                     # a period before a digit stays
    ("1,000", "1000"),                  # comma inside a number disappears
    ("t-shirt", "t shirt"),             # a hyphen not touching a space becomes a space
    ("yes, it is", "yes it is"),        # ',' removed
    ("dont know", "don't know"),        # contractions restored
    ("None", "0"),
    ("What's that?", "what 's that"),   # the EvalAI processor splits "'s" and drops '?'
])
def test_vqa_prediction_normalisation(prediction, normalized):
    assert scorers.normalize_vqa_prediction(prediction) == normalized


def test_vqa_punctuation_rule_deletes_marks_next_to_spaces_and_splits_others():
    assert scorers.vqa_punctuation("left - right") == "left  right"
    assert scorers.vqa_punctuation("left-right") == "left right"
    assert scorers.vqa_punctuation("1,000-2") == "10002"        # a digit,digit comma deletes every mark


def test_vqa_accuracy_averages_min_matches_over_3_across_leave_one_out_subsets():
    # 2 of 10 annotators said "2": leaving out one of them leaves 1 match (1/3), any other leaves 2 (2/3).
    assert scorers.vqa_accuracy("2", ["2"] * 2 + ["3"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    # 3 matches: left-out match -> 2/3, left-out other -> 3/3.
    assert scorers.vqa_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert scorers.vqa_accuracy("2", ["2"] * 4 + ["3"] * 6) == 1.0
    assert scorers.vqa_accuracy("4", ["2"] * 4 + ["3"] * 6) == 0.0


def test_vqa_accuracy_normalises_numbers_articles_and_punctuation():
    # References disagree, so they are normalised too: "the dog" counts as "dog" (3 matches in all).
    refs = ["dog", "dog", "the dog"] + ["cat"] * 7
    assert scorers.vqa_accuracy("A dog.", refs) == pytest.approx(0.9)
    assert scorers.vqa_accuracy("two", ["2"] * 10) == 1.0
    assert scorers.vqa_accuracy("Don't know", ["dont know"] * 4 + ["no"] * 6) == 1.0


def test_vqav2_keeps_unanimous_references_verbatim_but_textvqa_normalises_them():
    refs = _refs(["t-shirt"] * 10)
    assert scorers.get("vqav2")(["t-shirt"], refs).score == 0.0     # the official code's quirk
    assert scorers.get("textvqa")(["t-shirt"], refs).score == 1.0
    assert scorers.get("vizwiz")(["unanswerable"], _refs(["unanswerable"] * 10)).score == 1.0


def test_vqa_scorer_reads_the_annotation_format_and_averages():
    refs = [{"question_id": 1, "answers": [{"answer": "2", "answer_id": i} for i in range(10)]},
            {"question_id": 2, "answers": ["yes"] * 3 + ["no"] * 7}]
    score = scorers.get("vqav2")(["two", "Yes"], refs)
    assert score.per_item == pytest.approx([1.0, 0.9])
    assert score.score == pytest.approx(0.95)


# ---------------------------------------------------------------------------------------------------------- GQA


def test_gqa_exact_match_strips_trailing_period_and_case_only():
    refs = [{"answer": "yes"}, {"answer": "table"}, {"answer": "table"}]
    score = scorers.get("gqa")(["Yes.", "the table", " Table "], refs)
    assert score.per_item == [1.0, 0.0, 1.0]


# ---------------------------------------------------------------------------------------------------------- POPE


@pytest.mark.parametrize("answer, parsed", [
    ("No, there is not.", "no"),
    ("Yes, there is a dog in the image.", "yes"),
    ("There is no dog. Yes.", "no"),          # only the first sentence counts
    ("Not really", "yes"),                    # the official rule only knows "No", "no", "not"
    ("yes", "yes"),
])
def test_pope_answer_rule(answer, parsed):
    assert scorers.pope_yes_no(answer) == parsed


def test_pope_metrics_per_split_and_mean():
    preds = ["Yes", "No, there is not.", "no", "Yes there is", "yes",     # split a
             "no", "no"]                                                 # split b
    labels = ["yes", "yes", "no", "no", "yes", "yes", "no"]
    refs = [{"question_id": i, "label": lab, "category": "a" if i < 5 else "b"} for i, lab in enumerate(labels)]
    score = scorers.get("pope")(preds, refs)
    m = score.metrics
    # split a: TP 2, FN 1, TN 1, FP 1.
    assert m["a/accuracy"] == pytest.approx(3 / 5)
    assert m["a/precision"] == pytest.approx(2 / 3)
    assert m["a/recall"] == pytest.approx(2 / 3)
    assert m["a/f1"] == pytest.approx(2 / 3)
    assert m["a/yes_ratio"] == pytest.approx(3 / 5)
    # split b: TP 0, FN 1, TN 1 -> precision and recall 0, F1 0, accuracy 1/2.
    assert m["b/accuracy"] == pytest.approx(0.5)
    assert m["b/f1"] == 0.0
    assert m["accuracy"] == pytest.approx((3 / 5 + 1 / 2) / 2)
    assert m["f1"] == pytest.approx((2 / 3 + 0) / 2)
    assert score.score == m["accuracy"]
    assert score.per_item == [1, 0, 1, 0, 1, 0, 1]


# ---------------------------------------------------------------------------------------------------------- MC


OPTIONS = ["cat", "dog", "bird"]


@pytest.mark.parametrize("answer, letter", [
    ("B", "B"),
    ("(C)", "C"),
    ("B.", "B"),
    ("B. dog", "B"),
    ("The answer is C.", "C"),
    ("Answer: A", "A"),
    ("I would say B", "B"),
    ("The dog.", "B"),                  # option text instead of a letter
    ("A cat", "A"),                     # "A" is an article here; the text "cat" decides
    ("bird", "C"),
    ("the answer is a dog", "B"),       # lower-case "a" is not a letter
    ("cat or dog", None),               # two options: ambiguous
    ("D", None),                        # not one of the three options
    ("I don't know", None),
])
def test_multiple_choice_letter_extraction(answer, letter):
    assert scorers.extract_choice(answer, OPTIONS) == letter


def test_multiple_choice_prefers_the_longest_option_text():
    assert scorers.extract_choice("It is dark red.", ["red", "dark red", "blue"]) == "B"


def test_multiple_choice_accuracy_accepts_letters_or_indices():
    refs = [{"question_id": 1, "answer": "B", "options": OPTIONS},
            {"question_id": 2, "answer": 2, "options": OPTIONS},
            {"question_id": 3, "answer": "a", "options": OPTIONS}]
    score = scorers.get("scienceqa_img")(["dog", "C", "???"], refs)
    assert score.per_item == [1.0, 1.0, 0.0]
    assert score.metrics["unparsed"] == pytest.approx(1 / 3)


def test_mmbench_circular_evaluation_needs_every_rotation_right():
    def rot(qid, answer, group=None):
        r = {"question_id": qid, "answer": answer, "options": OPTIONS}
        if group is not None:
            r["group"] = group
        return r
    # question 5 in three rotations (MMBench ids 5, 1000005, 2000005), all right; question 7 in two, one wrong.
    refs = [rot(5, "A"), rot(1000005, "B"), rot(2000005, "C"), rot("q7", "A", "g7"), rot("q7r", "B", "g7")]
    score = scorers.get("mmbench")(["A", "B", "C", "A", "A"], refs)
    assert score.metrics["vanilla_accuracy"] == pytest.approx(4 / 5)
    assert score.metrics["circular_accuracy"] == pytest.approx(1 / 2)
    assert score.score == pytest.approx(1 / 2)
    # Without rotations, plain accuracy.
    plain = scorers.get("mmbench")(["A", "C"], [rot(1, "A"), rot(2, "B")])
    assert plain.score == pytest.approx(1 / 2)


# ------------------------------------------------------------------------------------------------ MME, SEED-Bench


def test_mme_acc_and_acc_plus_per_subtask_by_hand():
    def q(qid, image, category, answer):
        return {"question_id": qid, "image": image, "category": category, "answer": answer}

    refs = [q(1, "a.png", "count", "Yes"), q(2, "a.png", "count", "No"),     # both right
            q(3, "b.png", "count", "Yes"), q(4, "b.png", "count", "Yes"),    # one right
            q(5, "c.png", "OCR", "Yes"), q(6, "c.png", "OCR", "No")]         # one right
    preds = ["Yes, there are two.", "No", "yes", "Not really", "YES", "maybe"]
    score = scorers.get("mme")(preds, refs)
    assert score.per_item == [1, 1, 1, 0, 1, 0]
    m = score.metrics
    assert (m["count/acc"], m["count/acc_plus"], m["count/score"]) == (0.75, 0.5, 125.0)
    assert (m["OCR/acc"], m["OCR/acc_plus"], m["OCR/score"]) == (0.5, 0.0, 50.0)
    assert m["total"] == 175.0
    assert score.score == pytest.approx(((0.75 + 0.5) / 2 + (0.5 + 0.0) / 2) / 2)


def test_mme_reads_yes_no_like_its_tool():
    assert [scorers.mme_yes_no(t) for t in ("no", " Yes ", "Yes.", "No, it is not", "It is yes", "none")] == \
        ["no", "yes", "yes", "no", "other", "no"]


def test_seed_bench_letter_accuracy_overall_and_per_type():
    refs = [{"question_id": 1, "answer": "A", "category": "scene"},
            {"question_id": 2, "answer": "B", "category": "scene"},
            {"question_id": 3, "answer": "C", "category": "count"},
            {"question_id": 4, "answer": "B", "category": "count",
             "options": ["a blue ball", "a red ball", "a cube", "a cone"]}]
    score = scorers.get("seed_bench")(["A", "(B) a cat", "The answer is D", "a red ball"], refs)
    assert score.per_item == [1, 1, 0, 1]
    assert score.score == 0.75
    assert score.metrics["scene/accuracy"] == 1.0 and score.metrics["count/accuracy"] == 0.5


# ----------------------------------------------------------------------------------------- DocVQA, ChartQA, OCRBench


def test_levenshtein_by_hand():
    assert scorers.levenshtein("kitten", "sitting") == 3      # k->s, e->i, +g
    assert scorers.levenshtein("", "abc") == 3
    assert scorers.levenshtein("flaw", "lawn") == 2
    assert scorers.levenshtein("same", "same") == 0


def test_anls_takes_the_closest_reference_and_zeroes_distant_answers():
    refs = _refs(["sitting", "standing"],     # kitten/sitting: NL 3/7, similarity 4/7
                 ["abcd"],                    # wxyz: NL 1, similarity 0
                 ["abcdef"],                  # abcxyz: NL 3/6 = 0.5, similarity 0.5 kept (official code)
                 ["abcdefg"],                 # abcwxyz: NL 4/7 > 0.5, similarity 3/7 -> 0
                 [{"answer": "Total  Amount", "answer_id": 0}])   # case and inner spaces normalised
    score = scorers.get("anls")(["kitten", "wxyz", "abcxyz", "abcwxyz", " total amount "], refs)
    assert score.per_item == pytest.approx([4 / 7, 0.0, 0.5, 0.0, 1.0])
    assert score.score == pytest.approx((4 / 7 + 0.5 + 1.0) / 5)
    assert score.metrics["anls"] == score.score


@pytest.mark.parametrize("prediction, target, correct", [
    ("104", "100", True),          # 4% off
    ("95", "100", True),           # 5% off: the bound is inclusive
    ("106", "100", False),         # 6% off
    ("-104", "-100", True),        # relative to |target|
    ("12%", "0.12", True),         # '%' divides by 100, as Pix2Struct's code does
    ("12%", "12", False),          # ... so it does not match the bare number
    ("12%", "12.5%", True),        # 0.12 vs 0.125: 4% off
    ("0.01", "0", False),          # zero target: exact match only,
    ("0.0", "0", False),           # even between equal numbers
    ("0", "0", True),
    (" Yes ", "yes", True),        # text: stripped, case-insensitive
    ("Blue", "Dark Blue", False),
    ("1,000", "1000", False),      # no comma parsing: text comparison
])
def test_relaxed_correctness(prediction, target, correct):
    assert scorers.relaxed_correct(prediction, target) is correct


def test_relaxed_accuracy_is_right_for_any_reference_and_averages():
    refs = [{"question_id": 1, "answer": "100"}, {"question_id": 2, "answer": "100"},
            {"question_id": 3, "answers": ["Germany", "50"]}]
    score = scorers.get("relaxed_accuracy")(["104", "106", "51"], refs)
    assert score.per_item == [1.0, 0.0, 1.0]
    assert score.score == pytest.approx(2 / 3)


def test_ocrbench_substring_rule_and_math_expression_whitespace():
    hme = "Handwritten Mathematical Expression Recognition"
    refs = [{"question_id": 0, "type": "Regular Text Recognition", "answers": ["STOP"]},
            {"question_id": 1, "type": "Regular Text Recognition", "answers": ["exit", "way out"]},
            {"question_id": 2, "type": "Doc-oriented VQA", "answers": "$12.50"},     # a lone string answer
            {"question_id": 3, "type": "Doc-oriented VQA", "answers": ["12.50"]},
            {"question_id": 4, "type": hme, "answers": ["x ^ { 2 } + 1"]},
            {"question_id": 5, "type": hme, "answers": ["\\frac { a } { b }"]},
            {"question_id": 6, "category": hme, "dataset_name": "HME100k", "answers": ["X"]}]
    preds = ["The sign says stop.",      # substring, case-folded
             "It reads: Way\nOut",       # a newline counts as a space
             "12.50",                    # '$12.50' is not in it
             "The total is $12.50",
             "x^{2}+1",                  # whitespace removed on both sides
             "\\frac{a}{b}",
             "x"]                        # case kept for expressions, as in OCRBench's code
    score = scorers.get("ocrbench")(preds, refs)
    assert score.per_item == [1, 1, 0, 1, 1, 1, 0]
    assert score.metrics["correct"] == 5.0
    assert score.score == pytest.approx(5 / 7)
    assert score.metrics["Regular Text Recognition/accuracy"] == 1.0
    assert score.metrics["Doc-oriented VQA/accuracy"] == 0.5
    assert score.metrics[f"{hme}/accuracy"] == pytest.approx(2 / 3)
    # Without the expression rule the spaced reference is not found.
    assert not scorers.ocrbench_correct("x^{2}+1", ["x ^ { 2 } + 1"])


@pytest.mark.parametrize("name, scorer", [
    ("anls", scorers.anls), ("relaxed_accuracy", scorers.relaxed_accuracy), ("ocrbench", scorers.ocrbench)])
def test_ocr_scorers_are_registered_under_the_grid_names(name, scorer):
    assert scorers.get(name) is scorer


def test_a_registered_scorer_is_found_by_name():
    @scorers.register("always_right")
    def always_right(predictions, references):
        return scorers.Score(1.0, {}, [1.0] * len(predictions))

    try:
        assert scorers.get("always_right") is always_right
        with pytest.raises(ValueError, match="registered twice"):
            scorers.register("always_right")(always_right)
    finally:
        scorers.SCORERS.pop("always_right")


# ---------------------------------------------------------------------------------------------------------- errors


def test_scorers_reject_bad_input_naming_it():
    with pytest.raises(ValueError, match="unknown benchmark scorer 'vqa3'"):
        scorers.get("vqa3")
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        scorers.exact_match(["a", "b"], [{"answer": "a"}])
    with pytest.raises(ValueError, match="label 'maybe'"):
        scorers.pope(["yes"], [{"question_id": 3, "label": "maybe"}])
    with pytest.raises(ValueError, match="needs 'options'"):
        scorers.multiple_choice(["A"], [{"question_id": 4, "answer": "A"}])
    with pytest.raises(ValueError, match="answer 'E' is not a letter"):
        scorers.multiple_choice(["A"], [{"question_id": 4, "answer": "E", "options": OPTIONS}])
    with pytest.raises(ValueError, match="no 'answers' or 'answer'"):
        scorers.get("vqav2")(["a"], [{"question_id": 9}])
