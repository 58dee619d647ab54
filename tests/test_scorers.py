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


def test_vqa_accuracy_with_one_reference_is_zero_as_in_the_official_protocol():
    # Leave-one-out over a single annotator leaves no other annotator to match: min(0 / 3, 1) = 0.
    assert scorers.vqa_accuracy("dog", ["dog"]) == 0.0
    assert scorers.vqa_accuracy("dog", ["dog"], always_normalize_references=True) == 0.0
    # Two annotators: leaving out 'dog' leaves no match, leaving out 'cat' leaves one (1/3): mean 1/6.
    assert scorers.vqa_accuracy("dog", ["dog", "cat"]) == pytest.approx(1 / 6)


def test_vqa_scorers_report_exact_match_beside_the_official_accuracy():
    # The official key stays the VQA accuracy; `exact_match` (the project's addition) says whether the processed
    # prediction equals any normalised reference, which stays meaningful with one reference per question.
    refs = _refs(["dog"], ["t-shirt"] * 10, ["2"] * 2 + ["3"] * 8)
    for name in ("vqav2", "textvqa"):
        score = scorers.get(name)(["Dog.", "T-shirt", "two"], refs)
        assert score.per_item[0] == 0.0 and score.per_item[2] == pytest.approx((2 / 3 * 8 + 1 / 3 * 2) / 10)
        assert score.metrics["exact_match"] == 1.0
        assert score.score == score.metrics["accuracy"]


def test_vqav2_keeps_unanimous_references_verbatim_but_textvqa_normalises_them():
    refs = _refs(["t-shirt"] * 10)
    assert scorers.get("vqav2")(["t-shirt"], refs).score == 0.0     # the official code's quirk
    assert scorers.get("textvqa")(["t-shirt"], refs).score == 1.0
    assert scorers.get("vizwiz")(["unanswerable"], _refs(["unanswerable"] * 10)).score == 1.0


@pytest.mark.parametrize("prediction, reference", [
    ("McDonald's", "mcdonald's"),   # the "'s" split applies to the references too: both 'mcdonald 's'
    ("a,b", "a,b"),                 # ',' is dropped before the punctuation rule: both 'ab'
])
def test_textvqa_runs_the_full_answer_processor_on_every_reference(prediction, reference):
    # TextVQA's evaluator (LLaVA's llava/eval/m4c_evaluator.py, from MMF) processes each ground-truth answer
    # exactly like the prediction (EvalAIAnswerProcessor), so these score 1 against 10 identical references.
    score = scorers.get("textvqa")([prediction], _refs([reference] * 10))
    assert score.score == 1.0
    assert score.metrics["exact_match"] == 1.0


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
    # Headline: the mean F1 over splits, what LLaVA reports (llava/eval/eval_pope.py); accuracy beside it.
    assert score.score == pytest.approx((2 / 3 + 0) / 2)
    assert score.score == m["f1"] != m["accuracy"]
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
    ("A or B", None),                   # "A" before a conjunction is the letter, not the article: ambiguous
    ("A and B", None),
    ("Both A and B", None),
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
    score = scorers.get("scienceqa_img")(["B", "C", "???"], refs)
    assert score.per_item == [1.0, 1.0, 0.0]
    assert score.metrics["unparsed"] == pytest.approx(1 / 3)


def test_scienceqa_reads_the_letter_as_llavas_script_does():
    # haotian-liu/LLaVA, llava/eval/eval_science_qa.py: the text is a bare option letter, or starts with
    # 'X. ', or holds exactly one match of r'The answer is ([A-Z]).' (any character after the letter); anything
    # else is FAILED, which is wrong. The lenient reading stays under `lenient_accuracy`.
    preds = ["B", "B. dog", "The answer is B.", "The answer is Bx",     # read as B
             "The answer is B",                  # no character after the letter: no match
             "(B)", "B.", "Answer: B", "dog",   # decorations and option text are not read
             " B",                               # the bare-letter test is on the text as given
             "The answer is B. The answer is B."]   # two matches: FAILED
    refs = [{"question_id": i, "answer": "B", "options": OPTIONS} for i in range(len(preds))]
    score = scorers.get("scienceqa_img")(preds, refs)
    assert score.per_item == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert score.score == pytest.approx(4 / 11)
    assert score.metrics["unparsed"] == pytest.approx(7 / 11)
    lenient = [scorers.extract_choice(p, OPTIONS) == "B" for p in preds]
    assert score.metrics["lenient_accuracy"] == pytest.approx(sum(lenient) / 11)


def test_mmbench_reads_the_letter_as_vlmevalkits_rule_stage():
    # open-compass/VLMEvalKit, vlmeval/utils/matching_util.py `can_infer`: split on whitespace after turning
    # .()[],:;!*#{} into spaces; exactly one option letter among the words wins (an "A" is never taken for the
    # article); else exactly one option text that is a substring of the lower-cased answer; else no answer
    # (the GPT matcher's part, not reproduced: counted wrong).
    cases = [("A dog", "A", 1),                  # the letter A, not the article
             ("A. The answer is B.", "A", 0),    # two letters: ambiguous, no option text either
             ("a catalog", "A", 1),              # 'cat' is a substring of 'catalog'
             ("A or B", "B", 0),                 # two letters
             ("The answer is B", "B", 1),
             ("bird", "C", 1)]
    refs = [{"question_id": i, "answer": a, "options": OPTIONS} for i, (_, a, _) in enumerate(cases)]
    score = scorers.get("mmbench")([p for p, _, _ in cases], refs)
    assert score.per_item == [c for _, _, c in cases]
    assert score.metrics["unparsed"] == pytest.approx(2 / 6)
    # Text stage: two option texts inside the answer ('red' and 'dark red') is ambiguous.
    assert scorers.mmbench_choice("It is dark red.", ["red", "dark red", "blue"]) is None
    assert scorers.mmbench_choice("Cannot determine the answer", OPTIONS) == "Z"   # a refusal: wrong


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
    # Both sub-tasks are Perception tasks; no Cognition task was scored, so no Cognition total.
    assert m["perception"] == 175.0
    assert "cognition" not in m and "total" not in m
    assert score.score == pytest.approx(((0.75 + 0.5) / 2 + (0.5 + 0.0) / 2) / 2)


def test_mme_reports_perception_and_cognition_apart():
    # MME's calculation.py: Perception = sum of the 10 perception sub-task scores, Cognition = sum of the 4
    # cognition ones, each sub-task out of 200; the two are never added into one number.
    def q(qid, image, category, answer):
        return {"question_id": qid, "image": image, "category": category, "answer": answer}

    refs = [q(1, "a", "existence", "yes"), q(2, "a", "existence", "no"),                        # 200
            q(3, "b", "artwork", "yes"), q(4, "b", "artwork", "no"),                            # acc 1/2: 50
            q(5, "c", "code_reasoning", "yes"), q(6, "c", "code_reasoning", "no"),              # 200
            q(7, "d", "numerical_calculation", "yes"), q(8, "d", "numerical_calculation", "no")]  # 0
    preds = ["yes", "no", "yes", "yes", "yes", "no", "no", "yes"]
    m = scorers.get("mme")(preds, refs).metrics
    assert m["perception"] == 250.0
    assert m["cognition"] == 200.0
    assert "total" not in m
    assert m["code_reasoning/score"] == 200.0 and m["artwork/score"] == 50.0


def test_mme_refuses_a_sub_task_outside_perception_and_cognition():
    with pytest.raises(ValueError, match="MME sub-task 'counting'"):
        scorers.get("mme")(["yes"], [{"question_id": 1, "image": "a", "category": "counting", "answer": "yes"}])


def test_mme_reads_yes_no_like_its_tool():
    assert [scorers.mme_yes_no(t) for t in ("no", " Yes ", "Yes.", "No, it is not", "It is yes", "none")] == \
        ["no", "yes", "yes", "no", "other", "no"]


def test_seed_bench_letter_accuracy_overall_and_per_type():
    refs = [{"question_id": 1, "answer": "A", "category": "scene"},
            {"question_id": 2, "answer": "B", "category": "scene"},
            {"question_id": 3, "answer": "C", "category": "count"},
            {"question_id": 4, "answer": "B", "category": "count",
             "options": ["a blue ball", "a red ball", "a cube", "a cone"]}]
    # LLaVA's scripts/convert_seed_for_submission.py: right only when the answer text equals the letter.
    score = scorers.get("seed_bench")(["A", "(B) a cat", "The answer is D", "a red ball"], refs)
    assert score.per_item == [1, 0, 0, 0]
    assert score.score == 0.25
    assert score.metrics["scene/accuracy"] == 0.5 and score.metrics["count/accuracy"] == 0.0
    assert score.metrics["lenient_accuracy"] == 0.75      # the project's lenient reading, beside it
    bare = scorers.get("seed_bench")(["B", "B.", "b", " B"], [refs[1]] * 4)
    assert bare.per_item == [1, 0, 0, 0]


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


@pytest.mark.parametrize("prediction, reference, credit", [
    # The DocVQA evaluator's distance compares the lower-cased, stripped, whitespace-collapsed answers, but divides
    # by the longer of the raw answers' upper-cased lengths.
    ("ab  XY", "abcd", 0.5),            # distance('ab xy', 'abcd') = 3, length max(6, 4) = 6
    ("abcxyz  ", "abcdef", 1 - 3 / 8),  # trailing spaces count in the length: 3 / 8
    ("\u00dfa", "xa", 1 - 1 / 3),        # 'ß' upper-cases to 'SS': length 3, distance 1
    ("a  b", "a b", 1.0),               # whitespace never adds to the distance
])
def test_anls_divides_by_the_raw_upper_cased_lengths(prediction, reference, credit):
    assert scorers.anls_similarity(prediction, [reference]) == pytest.approx(credit)


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
    ("Yes", "yes", True),          # text: case-insensitive exact match
    (" Yes ", "yes", False),       # ... of the strings as given: the official function strips nothing
    ("12%%", "0.12", True),        # rstrip('%') removes every trailing '%'
    ("50%%", "50%", True),
    ("12% ", "0.12", False),       # a space after the '%': not a percentage, not a number, text differs
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


@pytest.mark.parametrize("prediction, answer, correct", [
    # OCRBench's rule for HME100k: strip, newlines -> spaces, then only ' ' removed; other whitespace stays.
    ("x^{2}\t+1", "x ^ { 2 } + 1", False),     # an inner tab is kept
    ("x^{2}\r\n+1", "x^{2}+1", False),         # '\r' is kept, only the '\n' goes
    ("ab", "a\u00a0b", False),                  # a non-breaking space is kept
    ("\tx^{2}\n+ 1\t", "x ^ {2}+1", True),     # outer whitespace stripped, '\n' and ' ' removed
])
def test_ocrbench_math_expressions_remove_only_spaces_and_newlines(prediction, answer, correct):
    assert scorers.ocrbench_correct(prediction, [answer], math_expression=True) is correct


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
