"""Benchmark scorers, each following its benchmark's official protocol.

Every scorer is `scorer(predictions, references) -> Score`: predictions are the model's decoded answers (strings),
references the ground-truth records (dicts, one per prediction, in the same order; fields listed per scorer).
`Score.score` is the headline number in [0, 1] that the evaluation summary averages into the downstream error.

- VQAv2 / VizWiz (`vqav2`, `vizwiz`): the official VQA accuracy. The prediction is normalised like the EvalAI
  answer processor LLaVA and lmms-eval apply before submission (lower case, ',' '?' removed, "'s" split, punctuation
  rule, number words -> digits, articles dropped, contractions restored); references are normalised only when the
  annotators disagree, as the official evaluation code does. Accuracy = mean over the leave-one-out subsets of the
  annotators of min(#matches / 3, 1), so a question with a single reference scores 0, as in the official code
  (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py). `exact_match`, an additional key of the
  project, is the fraction of predictions equal to some reference, both through the full answer processor.
  References: `answers` (list, usually 10).
- TextVQA (`textvqa`): the same accuracy with every reference run through the full answer processor, exactly as
  the prediction (lower case, ',' '?' removed, "'s" split, ...), as the TextVQA/M4C evaluator LLaVA uses does
  (llava/eval/m4c_evaluator.py): "McDonald's" matches "mcdonald's".
- GQA (`gqa`): exact match after LLaVA's conversion (trailing '.' stripped, lower case). Reference: `answer`.
- POPE (`pope`): LLaVA's rule turns a free answer into yes/no (keep the first sentence, drop commas; 'no' if the
  words include "No", "no" or "not", else 'yes'); accuracy, precision, recall, F1 and yes-ratio per split
  (`category`), and their means over splits. Headline: mean F1, what LLaVA reports (llava/eval/eval_pope.py);
  the mean accuracy is beside it (`accuracy`). F1 with 'yes' positive also credits a model that always says yes
  (F1 2/3 on balanced splits), so read it with `yes_ratio`. Per-item credits are still right/wrong answers.
  Reference: `answer` or `label` ('yes'/'no'), optional `category`.
- Multiple choice (`scienceqa_img`, `mmbench`, `ai2d`): the option letter is read by each benchmark's official
  rule; an unreadable answer is wrong and counted in `unparsed`. ScienceQA-IMG: LLaVA's
  llava/eval/eval_science_qa.py (a bare letter, 'X. ...', or exactly one "The answer is X" followed by any
  character). MMBench: VLMEvalKit's rule stage (vlmeval/utils/matching_util.py `can_infer`: exactly one option
  letter among the words, an "A" included, else exactly one option text inside the answer); VLMEvalKit's GPT
  matcher for the answers that stage cannot read is not reproduced, so those count wrong. MMBench uses circular
  evaluation when its rotations are present: a question counts only if every rotation of it (same `group`) is
  right. `lenient_accuracy`, an additional key of the project, reads the letter leniently instead (a decorated
  letter, "answer: X", a single stand-alone letter, else one option's text; `extract_choice`); AI2D, which has
  no official script here, uses that reading as its accuracy. References: `answer` (letter or 0-based index),
  `options` (list of option texts), for MMBench optionally `group`.
- MME (`mme`): yes/no questions, two per image. The answer is read as MME's tool does (the whole answer, else its
  first four characters, holding 'yes' or 'no'; anything else is wrong). Per sub-task (`category`): acc = questions
  right, acc+ = images (`image`, else `question_id`) with both questions right, score = 100 (acc + acc+);
  `perception` and `cognition` are the sums of the 10 perception and 4 cognition sub-task scores, reported apart
  as MME's calculation.py and LLaVA do. Headline: mean over sub-tasks of (acc + acc+) / 2, i.e. the
  MME score scaled to [0, 1]. References: `answer` (yes/no), `category`, `image`. Question ids must be unique
  (the question loader refuses duplicates), so LLaVA's per-image ids need a suffix per question.
- SEED-Bench (`seed_bench`): multiple choice among A-D, right only when the answer is exactly the reference letter,
  as LLaVA's scripts/convert_seed_for_submission.py scores it; accuracy overall (the headline) and per question
  type (`category`); `lenient_accuracy` as for multiple choice (option texts optional). SEED-Bench's likelihood
  protocol is not reproduced. Reference: `answer` (letter).
- DocVQA (`anls`): ANLS (Biten et al. 2019) as the official evaluation computes it: both answers lower-cased,
  stripped and their inner whitespace collapsed; NL = Levenshtein distance between those / the longer of the raw
  answers' upper-cased lengths (the RRC DocVQA evaluation script's quirk); credit
  1 - min over references of NL, set to 0 when below 0.5 (NL = 0.5 keeps 0.5, as in the evaluation code; the
  paper's formula zeroes it). References: `answers` (list), else `answer`.
- ChartQA (`relaxed_accuracy`): Pix2Struct's relaxed correctness, any reference: when both parse as numbers and
  the reference is not 0, within 5% of it; otherwise case-insensitive exact match (nothing stripped, as in that
  code). Trailing '%'s are all removed and divide by 100, as in that code, so '12%' and '12%%' match '0.12', not
  '12'. References: `answers` or `answer`.
- OCRBench (`ocrbench`): right if any reference (lower case, stripped, newlines as spaces) is a substring of the
  prediction treated alike; for handwritten mathematical expressions (`type`/`category` 'Handwritten Mathematical
  Expression Recognition', or `dataset_name` 'HME100k') both are stripped, newlines become spaces and then the
  spaces (' ' only; tabs, carriage returns, non-breaking spaces stay) are removed, case kept, as in OCRBench's
  example.py. Headline: accuracy; `correct` is OCRBench's score (out of its 1000 questions); accuracy per
  type (`category`, else `type`). References: `answers` (list or one string), else `answer`.
- `exact_match` (the synthetic tasks): normalised exact match (whitespace, case, trailing '.').

A scorer is added with `@register("name")`; `get(name)` is the only lookup.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from vlm_jax.registry import Registry


Scorer = Callable[[Sequence[str], Sequence[Mapping]], "Score"]
SCORERS = Registry("benchmark scorer")   # a benchmark's `scorer` field -> Scorer
register = SCORERS.register


def get(name: str) -> Scorer:
    return SCORERS.lookup(name)


@dataclasses.dataclass
class Score:
    """score: the headline number in [0, 1]; metrics: every reported number; per_item: each prediction's credit;
    protocol: where the official protocol is not all reproduced here, what differs (written next to the number)."""

    score: float
    metrics: dict[str, float]
    per_item: list[float]
    protocol: str = ""


# ----------------------------------------------------------------------------------------------------------------------
# VQA answer normalisation (the tables of the official VQA evaluation).

# Apostrophe-less spellings -> the annotators' spelling (official table, including its odd entries).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
# A period not followed by a digit ("3." and "end." lose it, "2.5" keeps it). The official pattern also has a
# malformed look-behind that never applies, so a period after a digit is removed too when no digit follows.
_PERIOD = re.compile(r"\.(?!\d)")


def vqa_punctuation(text: str) -> str:
    """The official punctuation rule: a mark touching a space (or any text with a digit,digit comma) is deleted,
    otherwise replaced by a space ("t-shirt" -> "t shirt", "yes, sir" -> "yes sir"); then periods not followed
    by a digit are deleted."""
    out = text
    drop_all = _COMMA_IN_NUMBER.search(text) is not None
    for p in PUNCTUATION:
        if drop_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def vqa_digits_articles(text: str) -> str:
    """Lower case, number words -> digits, articles dropped, contractions restored, single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_vqa_answer(text: str) -> str:
    """The full normalisation of one answer (whitespace, punctuation, digits, articles, contractions)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_digits_articles(vqa_punctuation(text))


def normalize_vqa_prediction(text: str) -> str:
    """A model's answer as the EvalAI processor prepares it: lower case, ',' and '?' removed, "'s" split off,
    then `normalize_vqa_answer`."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return normalize_vqa_answer(text)


def vqa_accuracy(prediction: str, answers: Sequence[str], always_normalize_references: bool = False) -> float:
    """VQA accuracy of one prediction: mean over the leave-one-out subsets of `answers` of min(#matches / 3, 1).

    Official source: the VQA evaluation code (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py):
    for each annotator, the matches among the *other* annotators count. With a single reference there is no other
    annotator, so the accuracy is 0 whatever the prediction, as in that code; `vqa_exact_match` is the reading
    that stays meaningful with one reference. References are punctuation/digit/article-normalised only when the
    annotators disagree (that code's rule), unless `always_normalize_references`: then every reference goes
    through the full answer processor the prediction gets (`normalize_vqa_prediction`), as TextVQA's evaluator
    does (LLaVA, llava/eval/m4c_evaluator.py, `TextVQAAccuracyEvaluator`, from facebookresearch/mmf).
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa_prediction(prediction)
    if always_normalize_references:                     # TextVQA: each reference processed like the prediction
        refs = [normalize_vqa_prediction(a) for a in answers]
    else:
        refs = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
        if len(set(refs)) > 1:
            refs = [normalize_vqa_answer(a) for a in refs]
    matches = np.array([r == pred for r in refs], float)
    others = matches.sum() - matches                    # matches among the other annotators, per left-out one
    return float(np.mean(np.minimum(others / 3.0, 1.0)))


def vqa_exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1 if the processed prediction equals some reference processed alike (`normalize_vqa_prediction`), else 0:
    the project's additional, lenient key (no official protocol), meaningful also with one reference."""
    pred = normalize_vqa_prediction(prediction)
    return float(any(pred == normalize_vqa_prediction(a) for a in answers))


# ----------------------------------------------------------------------------------------------------------------------
# Reference fields.


def _answer_list(ref: Mapping[str, Any]) -> list[str]:
    if "answers" in ref:
        answers = ref["answers"]
        if isinstance(answers, str):                    # OCRBench stores a lone answer as a string
            return [answers]
        # The VQA annotation format: [{"answer": ..., "answer_confidence": ..., "answer_id": ...}, ...].
        return [a["answer"] if isinstance(a, Mapping) else str(a) for a in answers]
    if "answer" in ref:
        return [str(ref["answer"])]
    raise ValueError(f"reference {ref.get('question_id', ref)!r} has no 'answers' or 'answer'")


def _single_answer(ref: Mapping[str, Any], *keys: str) -> str:
    for k in keys:
        if k in ref:
            return str(ref[k])
    raise ValueError(f"reference {ref.get('question_id', ref)!r} has none of the fields {list(keys)}")


def _check_lengths(predictions: Sequence[str], references: Sequence[Mapping]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("nothing to score: no predictions")


# ----------------------------------------------------------------------------------------------------------------------
# Open-ended scorers.


def _vqa_scorer(always_normalize_references: bool) -> Scorer:
    def scorer(predictions, references):
        _check_lengths(predictions, references)
        answer_lists = [_answer_list(r) for r in references]
        per_item = [vqa_accuracy(p, a, always_normalize_references) for p, a in zip(predictions, answer_lists)]
        acc = float(np.mean(per_item))
        exact = float(np.mean([vqa_exact_match(p, a) for p, a in zip(predictions, answer_lists)]))
        return Score(acc, {"accuracy": acc, "exact_match": exact}, per_item)
    return scorer


def normalize_exact(text: str) -> str:
    """Whitespace trimmed, trailing periods stripped, lower case (LLaVA's GQA conversion, plus the trim)."""
    return text.strip().rstrip(".").strip().lower()


@register("exact_match", "gqa")
def exact_match(predictions: Sequence[str], references: Sequence[Mapping]) -> Score:
    """Normalised exact match against `answer` (or any of `answers`)."""
    _check_lengths(predictions, references)
    per_item = [float(normalize_exact(p) in {normalize_exact(a) for a in _answer_list(r)})
                for p, r in zip(predictions, references)]
    acc = float(np.mean(per_item))
    return Score(acc, {"accuracy": acc}, per_item)


register("vqav2", "vizwiz")(_vqa_scorer(always_normalize_references=False))
register("textvqa")(_vqa_scorer(always_normalize_references=True))


# ----------------------------------------------------------------------------------------------------------------------
# POPE.


def pope_yes_no(text: str) -> str:
    """LLaVA's POPE rule: first sentence, commas dropped, 'no' if the space-split words hold No/no/not."""
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def _binary_metrics(pred_yes: np.ndarray, label_yes: np.ndarray) -> dict[str, float]:
    tp = float(np.sum(pred_yes & label_yes))
    fp = float(np.sum(pred_yes & ~label_yes))
    fn = float(np.sum(~pred_yes & label_yes))
    tn = float(np.sum(~pred_yes & ~label_yes))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / len(pred_yes), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": float(np.mean(pred_yes))}


@register("pope")
def pope(predictions: Sequence[str], references: Sequence[Mapping]) -> Score:
    """POPE metrics per split (`category`, default 'all') and their means; headline = mean F1 over the splits.

    Official source: LLaVA, llava/eval/eval_pope.py (the POPE reading LLaVA-1.5 reports): the yes/no rule of
    `pope_yes_no`, then per split accuracy, precision, recall, F1 and yes-ratio with 'yes' the positive class.
    LLaVA's tables give F1 averaged over the random, popular and adversarial splits, so the headline is the mean
    F1; the mean accuracy stays beside it under `accuracy`.
    """
    _check_lengths(predictions, references)
    labels = []
    for r in references:
        label = _single_answer(r, "label", "answer").strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"POPE reference {r.get('question_id')!r} has label {label!r}; expected yes/no")
        labels.append(label == "yes")
    pred_yes = np.array([pope_yes_no(p) == "yes" for p in predictions])
    labels = np.array(labels)
    splits = np.array([str(r.get("category", "all")) for r in references])
    metrics: dict[str, float] = {}
    per_split = {s: _binary_metrics(pred_yes[splits == s], labels[splits == s]) for s in sorted(set(splits))}
    for s, m in per_split.items():
        metrics.update({f"{s}/{k}": v for k, v in m.items()})
    for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        metrics[k] = float(np.mean([m[k] for m in per_split.values()]))
    return Score(metrics["f1"], metrics, [float(p == lab) for p, lab in zip(pred_yes, labels)])


# ----------------------------------------------------------------------------------------------------------------------
# Multiple choice.

LETTERS = string.ascii_uppercase
_WRAPPED_LETTER = re.compile(r"^[(\[]?([A-Z])[)\].:]?$")
_LEADING_LETTER = re.compile(r"^[(\[]?([A-Z])(?:[)\].:]|\s*[)\].:])\s")
# Keywords in any case, the letter itself upper case ("the answer is a dog" names no letter).
_ANSWER_IS = re.compile(r"\b(?i:answer|option|choice)\s*(?i:is|:)?\s*(?i:option\s*)?[(\[]?([A-Z])\b(?!')")


_CONJUNCTIONS = frozenset({"and", "or", "nor"})


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


def _option_text_key(text: str) -> str:
    return " ".join(w.lower() for w in _words(text))


def extract_choice(prediction: str, options: Sequence[str]) -> str | None:
    """The option letter a free-form answer picks, or None when it picks none or several.

    The project's lenient reading (no benchmark's official rule; reported as `lenient_accuracy` beside the
    official accuracy, and the reading of AI2D). In order: a bare or decorated letter ("B", "(B)", "B."), a
    leading letter ("B. dog", "(B) dog"), "the answer is B" / "Answer: B", exactly one stand-alone option letter
    among the words (the article "A" before a lower-case word does not count, except before "and", "or", "nor":
    "A or B" names two letters and is ambiguous), then the text of exactly one option (the longest wins when one
    option's text contains another's, as with "red" and "dark red").
    """
    valid = LETTERS[:len(options)]
    text = prediction.strip()
    for pattern in (_WRAPPED_LETTER, _LEADING_LETTER):
        m = pattern.match(text)
        if m and m.group(1) in valid:
            return m.group(1)
    found = {m.group(1) for m in _ANSWER_IS.finditer(text)} & set(valid)
    if len(found) == 1:
        return found.pop()
    words = _words(text)
    letters = set()
    for i, w in enumerate(words):
        if len(w) == 1 and w in valid:
            is_article = (w == "A" and i + 1 < len(words) and words[i + 1][:1].islower()
                          and words[i + 1] not in _CONJUNCTIONS)
            if not is_article:
                letters.add(w)
    if len(letters) == 1:
        return letters.pop()
    if letters:
        return None
    said = f" {_option_text_key(text)} "
    hits = [k for k, opt in enumerate(options) if _option_text_key(opt) and f" {_option_text_key(opt)} " in said]
    hits = [k for k in hits if not any(j != k and _option_text_key(options[k]) in _option_text_key(options[j])
                                       for j in hits)]
    return valid[hits[0]] if len(hits) == 1 else None


SCIENCEQA_LETTERS = ("A", "B", "C", "D", "E")      # LLaVA's script's `--options`
_SCIENCEQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")   # '.' is any character, as in that script


def scienceqa_choice(prediction: str, n_options: int) -> str | None:
    """The option letter LLaVA's ScienceQA evaluation reads, or None (its FAILED, or a letter beyond the options).

    Official source: haotian-liu/LLaVA, llava/eval/eval_science_qa.py. On the answer text as given: the whole
    text is one of A-E; else it has 3+ characters and starts with a letter A-E followed by '. '; else
    r'The answer is ([A-Z]).' matches exactly once (the '.' there matches any character, so "The answer is B"
    at the very end does not match and "The answer is Bx" reads B). The letter must be among the first
    `n_options` of A-E, else the question is wrong.
    """
    if prediction in SCIENCEQA_LETTERS:
        letter = prediction
    elif len(prediction) >= 3 and prediction[0] in SCIENCEQA_LETTERS and prediction[1:3] == ". ":
        letter = prediction[0]
    else:
        found = _SCIENCEQA_ANSWER_IS.findall(prediction)
        letter = found[0] if len(found) == 1 else None
    return letter if letter in SCIENCEQA_LETTERS[:n_options] else None


_MMBENCH_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                     "I'm sorry, but without the image provided", "Cannot determine the answer")
_MMBENCH_SEPARATORS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})


def mmbench_choice(prediction: str, options: Sequence[str]) -> str | None:
    """The option letter MMBench's rule stage reads, 'Z' for a refusal, or None when it reads none.

    Official source: open-compass/VLMEvalKit, vlmeval/utils/matching_util.py, `can_infer` (option stage, then
    text stage), which runs before its GPT-based matcher. Option stage: a known refusal sentence gives 'Z';
    otherwise the characters .()[],:;!*#{} become spaces and the text is split on whitespace; exactly one option
    letter among the words is the answer (an "A" counts even as an article: "A dog" reads A); no letter but a
    word "Z" gives 'Z'. Text stage (when the option stage reads nothing, including two or more letters): the one
    option whose lower-cased text is a substring of the lower-cased answer ("cat" is found in "catalog"); two or
    more such options read nothing. 'Z' and None are wrong: the GPT matcher that handles None officially (or,
    without it, a random option) is not reproduced.
    """
    if any(refusal in prediction for refusal in _MMBENCH_REFUSALS):
        return "Z"
    letters = LETTERS[:len(options)]
    words = prediction.translate(_MMBENCH_SEPARATORS).split()
    named = [c for c in letters if c in words]
    if len(named) == 1:
        return named[0]
    if not named and "Z" in words:
        return "Z"
    text = prediction.lower()
    hits = [c for c, option in zip(letters, options) if str(option).lower() in text]
    return hits[0] if len(hits) == 1 else None


def _mc_target(ref: Mapping[str, Any]) -> tuple[str, list[str]]:
    options = ref.get("options")
    if not options or not isinstance(options, Sequence) or isinstance(options, str):
        raise ValueError(f"multiple-choice reference {ref.get('question_id')!r} needs 'options' (a list of texts)")
    answer = ref.get("answer")
    if isinstance(answer, (int, np.integer)) and not isinstance(answer, bool):
        letter = LETTERS[int(answer)] if 0 <= int(answer) < len(options) else None
    else:
        letter = str(answer).strip().upper() if answer is not None else None
    if letter is None or letter not in LETTERS[:len(options)]:
        raise ValueError(f"multiple-choice reference {ref.get('question_id')!r}: answer {answer!r} is not a letter "
                         f"or index of its {len(options)} options")
    return letter, list(options)


def _read_choices(predictions: Sequence[str], references: Sequence[Mapping],
                  read: Callable[[str, list[str]], str | None]) -> tuple[list[float], list[float], int]:
    """(credits under `read(prediction, options)`, credits under the lenient `extract_choice`, how many `read`
    could not read)."""
    _check_lengths(predictions, references)
    official, lenient, unparsed = [], [], 0
    for p, r in zip(predictions, references):
        letter, options = _mc_target(r)
        choice = read(p, options)
        unparsed += choice is None
        official.append(float(choice == letter))
        lenient.append(float(extract_choice(p, options) == letter))
    return official, lenient, unparsed


def _choice_score(predictions: Sequence[str], references: Sequence[Mapping],
                  read: Callable[[str, list[str]], str | None]) -> Score:
    """Accuracy of the letter `read(prediction, options)` gives, the fraction read as nothing (`unparsed`), and
    the lenient reading's accuracy (`lenient_accuracy`, `extract_choice`)."""
    per_item, lenient, unparsed = _read_choices(predictions, references, read)
    acc = float(np.mean(per_item))
    return Score(acc, {"accuracy": acc, "unparsed": unparsed / len(predictions),
                       "lenient_accuracy": float(np.mean(lenient))}, per_item)


@register("ai2d")
def multiple_choice(predictions: Sequence[str], references: Sequence[Mapping]) -> Score:
    """Accuracy of the option letter read by the project's lenient `extract_choice` (AI2D; no official rule is
    reproduced for it)."""
    return dataclasses.replace(_choice_score(predictions, references, extract_choice),
                               protocol="no official rule reproduced: the project's lenient letter reading")


@register("scienceqa_img")
def scienceqa(predictions: Sequence[str], references: Sequence[Mapping]) -> Score:
    """ScienceQA-IMG: accuracy of the letter LLaVA's evaluation script reads (`scienceqa_choice`; unread is
    wrong), with the lenient reading's accuracy beside it (`lenient_accuracy`)."""
    return _choice_score(predictions, references, lambda p, options: scienceqa_choice(p, len(options)))


def mmbench_group(ref: Mapping[str, Any]) -> Any:
    """The question a row is a rotation of: `group`, else MMBench's convention index % 1e6 for integer ids."""
    if "group" in ref:
        return ref["group"]
    qid = ref.get("question_id")
    try:
        return int(qid) % 1_000_000
    except (TypeError, ValueError):
        return qid


@register("mmbench")
def mmbench(predictions: Sequence[str], references: Sequence[Mapping]) -> Score:
    """MMBench: circular accuracy (every rotation of a question right) when rotations are present, else plain.

    The letter is read by VLMEvalKit's rule stage (`mmbench_choice`); answers it cannot read, which VLMEvalKit
    hands to its GPT matcher, are counted wrong here (`unparsed` says how many). CircularEval follows
    VLMEvalKit: a question counts only if all its rotations are right. `lenient_accuracy` is the same
    (circular or plain) accuracy under the lenient `extract_choice`.
    """
    official, lenient, unparsed = _read_choices(predictions, references, mmbench_choice)
    groups: dict[Any, list[int]] = collections.defaultdict(list)
    for i, r in enumerate(references):
        groups[mmbench_group(r)].append(i)
    has_rotations = any(len(rows) > 1 for rows in groups.values())

    def accuracies(credits: list[float]) -> tuple[float, float]:
        return float(np.mean(credits)), float(np.mean([min(credits[i] for i in rows) for rows in groups.values()]))

    vanilla, circular = accuracies(official)
    lenient_vanilla, lenient_circular = accuracies(lenient)
    metrics = {"vanilla_accuracy": vanilla, "circular_accuracy": circular, "questions": float(len(groups)),
               "unparsed": unparsed / len(predictions),
               "accuracy": circular if has_rotations else vanilla,
               "lenient_accuracy": lenient_circular if has_rotations else lenient_vanilla}
    return Score(metrics["accuracy"], metrics, official,
                 protocol="VLMEvalKit's rule stage only: answers its GPT matcher would read count wrong (see "
                          "`unparsed`); dev split, scored here, not the server's test split")


# ----------------------------------------------------------------------------------------------------------------------
# MME and SEED-Bench.


def mme_yes_no(text: str) -> str:
    """'yes', 'no' or 'other': the whole answer if it is yes/no, else whichever of them its first 4 characters
    hold ('yes' first), the reading MME's evaluation tool applies."""
    text = text.strip().lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


# MME's sub-tasks by group, as its evaluation tool (eval_tool/calculation.py, distributed with the benchmark by
# BradyFU/Awesome-Multimodal-Large-Language-Models, branch Evaluation) and LLaVA report them.
MME_GROUPS = {
    "perception": ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                   "artwork", "OCR"),
    "cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"),
}


@register("mme")
def mme(predictions: Sequence[str], references: Sequence[Mapping]) -> Score:
    """MME acc, acc+ and score per sub-task, the Perception and Cognition totals, and the [0, 1] headline.

    Official source: MME's evaluation tool, eval_tool/calculation.py (distributed with the benchmark by
    BradyFU/Awesome-Multimodal-Large-Language-Models, branch Evaluation), which LLaVA runs
    (scripts/v1_5/eval/mme.sh). Per sub-task, score =
    100 (acc + acc+) out of 200; `perception` sums the 10 perception sub-tasks' scores (out of 2000), `cognition`
    the 4 cognition ones (out of 800), each only when one of its sub-tasks was scored. They are reported apart,
    as MME and LLaVA do; there is no all-14 total. A sub-task outside the two groups is refused.
    """
    _check_lengths(predictions, references)
    per_item = []
    for p, r in zip(predictions, references):
        label = _single_answer(r, "answer", "label").strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"MME reference {r.get('question_id')!r} has answer {label!r}; expected yes/no")
        per_item.append(float(mme_yes_no(p) == label))
    tasks: dict[str, dict[Any, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    known = {t for members in MME_GROUPS.values() for t in members}
    for credit, r in zip(per_item, references):
        category = str(_single_answer(r, "category"))
        if category not in known:
            raise ValueError(f"MME sub-task {category!r} (question {r.get('question_id')!r}) is neither a "
                             f"perception nor a cognition sub-task: {sorted(known)}")
        tasks[category][r.get("image", r.get("question_id"))].append(credit)
    metrics: dict[str, float] = {}
    halves = []
    for task, images in sorted(tasks.items()):
        credits = [c for per_image in images.values() for c in per_image]
        acc = float(np.mean(credits))
        acc_plus = float(np.mean([min(c) for c in images.values()]))
        metrics.update({f"{task}/acc": acc, f"{task}/acc_plus": acc_plus, f"{task}/score": 100 * (acc + acc_plus)})
        halves.append((acc + acc_plus) / 2)
    for group, members in MME_GROUPS.items():
        present = [t for t in members if t in tasks]
        if present:
            metrics[group] = sum(metrics[f"{t}/score"] for t in present)
    metrics["accuracy"] = float(np.mean(halves))
    return Score(metrics["accuracy"], metrics, per_item)


@register("seed_bench")
def seed_bench(predictions: Sequence[str], references: Sequence[Mapping]) -> Score:
    """SEED-Bench: accuracy of the option letter (A-D), overall and per question type (`category`).

    Official source: haotian-liu/LLaVA, scripts/convert_seed_for_submission.py (the accuracy LLaVA reports for
    SEED-Bench's image questions): a question is right only when the answer text equals the reference letter
    ("B", not "B." or "(B) ..."); overall accuracy is right answers over all questions. SEED-Bench's own
    likelihood protocol (ranking the options by the model's likelihood) is not reproduced. `lenient_accuracy` is
    the accuracy under the lenient `extract_choice`.
    """
    _check_lengths(predictions, references)
    per_item, lenient = [], []
    for p, r in zip(predictions, references):
        options = list(r.get("options") or [""] * 4)   # texts optional: '' never matches an answer's words
        letter, _ = _mc_target(dict(r, options=options))
        per_item.append(float(p == letter))
        lenient.append(float(extract_choice(p, options) == letter))
    metrics = {"accuracy": float(np.mean(per_item)), "lenient_accuracy": float(np.mean(lenient))}
    by_type: dict[str, list[float]] = collections.defaultdict(list)
    for credit, r in zip(per_item, references):
        if "category" in r:
            by_type[str(r["category"])].append(credit)
    metrics.update({f"{t}/accuracy": float(np.mean(c)) for t, c in sorted(by_type.items())})
    return Score(metrics["accuracy"], metrics, per_item,
                 protocol="generated letter against the reference (LLaVA's reading); SEED-Bench's own likelihood "
                          "protocol, which ranks the options by the model's likelihood, is not reproduced")


# ----------------------------------------------------------------------------------------------------------------------
# DocVQA, ChartQA and OCRBench.


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each), two rows at a time."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls_similarity(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """One question's ANLS credit: 1 - the smallest normalised distance to a reference, 0 below `threshold`.

    Official source: the DocVQA / InfographicVQA evaluation script of the Robust Reading Competition
    (rrc.cvc.uab.es, DocVQA tasks; `evaluate_method`). The edit distance is taken between the answers lower-cased,
    stripped and with inner whitespace collapsed, but it is divided by the longer of the *raw* answers' lengths
    after upper-casing (`max(len(answer.upper()), len(prediction.upper()))`), so extra spaces and characters that
    upper-case to several ('ß' -> 'SS') lengthen the denominator: 'ab  XY' vs 'abcd' is 1 - 3/6 = 0.5. A length
    of 0 counts as distance 0. A credit below the threshold becomes 0 (exactly 0.5 is kept).
    """
    if not answers:
        raise ValueError("ANLS needs at least one reference answer")
    pred = " ".join(prediction.strip().lower().split())
    distances = []
    for answer in answers:
        ref = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), len(prediction.upper()))
        distances.append(levenshtein(pred, ref) / length if length else 0.0)
    similarity = 1.0 - min(distances)
    return similarity if similarity >= threshold else 0.0


@register("anls")
def anls(predictions: Sequence[str], references: Sequence[Mapping]) -> Score:
    """DocVQA's ANLS: mean over questions of the thresholded similarity to the closest reference."""
    _check_lengths(predictions, references)
    per_item = [anls_similarity(p, _answer_list(r)) for p, r in zip(predictions, references)]
    value = float(np.mean(per_item))
    return Score(value, {"anls": value}, per_item)


def _relaxed_float(text: str) -> float | None:
    """A number as Pix2Struct reads it, or None: text ending in '%' loses every trailing '%' and is divided by
    100 ('12%' and '12%%' -> 0.12); otherwise Python's float()."""
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correct(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA's rule: numbers within 5% of a nonzero target, anything else case-insensitive exact match.

    Official source: google-research/pix2struct, pix2struct/metrics.py, `relaxed_correctness` (the ChartQA
    metric of Pix2Struct and of the ChartQA results LLaVA-style papers quote). Both strings are used as given
    (nothing is stripped; the evaluation loop already strips decoded answers): a string ending in '%' is read as
    float(text without its trailing '%'s) / 100, any other as float(text); when the prediction is a number and
    the target a nonzero number, |pred - target| / |target| <= 5% is right, else lower-cased exact match.
    """
    pred_value, target_value = _relaxed_float(prediction), _relaxed_float(target)
    if pred_value is not None and target_value:        # a zero target divides by zero: exact match instead
        return abs(pred_value - target_value) <= max_relative_change * abs(target_value)
    return prediction.lower() == target.lower()


@register("relaxed_accuracy")
def relaxed_accuracy(predictions: Sequence[str], references: Sequence[Mapping]) -> Score:
    """ChartQA's relaxed accuracy: a question is right if the prediction is relaxed-correct for any reference."""
    _check_lengths(predictions, references)
    per_item = [float(any(relaxed_correct(p, a) for a in _answer_list(r))) for p, r in zip(predictions, references)]
    acc = float(np.mean(per_item))
    return Score(acc, {"accuracy": acc}, per_item)


HME_CATEGORY = "Handwritten Mathematical Expression Recognition"


def _ocrbench_category(ref: Mapping[str, Any]) -> str:
    return str(ref.get("category", ref.get("type", "all")))


def ocrbench_correct(prediction: str, answers: Sequence[str], math_expression: bool = False) -> bool:
    """OCRBench's rule: some reference occurs in the prediction, both prepared alike.

    Official source: Yuliang-Liu/MultimodalOCR, OCRBench/example.py (the scoring after generation). Every
    question: lower-cased, stripped, newlines turned into spaces. Handwritten mathematical expressions (HME100k):
    stripped, newlines turned into spaces, then every ' ' removed, case kept; only the space character goes, so
    inner tabs, carriage returns and non-breaking spaces stay and must match.
    """
    def prepare(text: str) -> str:
        text = text.strip().replace("\n", " ")
        return text.replace(" ", "") if math_expression else text.lower()
    pred = prepare(prediction)
    return any(prepare(a) in pred for a in answers)


@register("ocrbench")
def ocrbench(predictions: Sequence[str], references: Sequence[Mapping]) -> Score:
    """OCRBench: questions right (its score out of 1000), accuracy (the headline) and accuracy per type."""
    _check_lengths(predictions, references)
    per_item = []
    for p, r in zip(predictions, references):
        math_expression = (_ocrbench_category(r) == HME_CATEGORY or r.get("type") == HME_CATEGORY
                           or r.get("dataset_name") == "HME100k")
        per_item.append(float(ocrbench_correct(p, _answer_list(r), math_expression)))
    metrics = {"accuracy": float(np.mean(per_item)), "correct": float(sum(per_item))}
    by_type: dict[str, list[float]] = collections.defaultdict(list)
    for credit, r in zip(per_item, references):
        by_type[_ocrbench_category(r)].append(credit)
    metrics.update({f"{t}/accuracy": float(np.mean(c)) for t, c in sorted(by_type.items())})
    return Score(metrics["accuracy"], metrics, per_item)
