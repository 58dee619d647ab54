"""Benchmark scorers, each following its benchmark's official protocol.

Every scorer is `scorer(predictions, references) -> Score`: predictions are the model's decoded answers (strings),
references the ground-truth records (dicts, one per prediction, in the same order; fields listed per scorer).
`Score.score` is the headline number in [0, 1] that the evaluation summary averages into the downstream error.

- VQAv2 / VizWiz (`vqav2`, `vizwiz`): the official VQA accuracy. The prediction is normalised like the EvalAI
  answer processor LLaVA and lmms-eval apply before submission (lower case, ',' '?' removed, "'s" split, punctuation
  rule, number words -> digits, articles dropped, contractions restored); references are normalised only when the
  annotators disagree, as the official evaluation code does. Accuracy = mean over the leave-one-out subsets of the
  annotators of min(#matches / 3, 1). References: `answers` (list, usually 10).
- TextVQA (`textvqa`): the same accuracy with every reference normalised (the TextVQA/M4C evaluator).
- GQA (`gqa`): exact match after LLaVA's conversion (trailing '.' stripped, lower case). Reference: `answer`.
- POPE (`pope`): LLaVA's rule turns a free answer into yes/no (keep the first sentence, drop commas; 'no' if the
  words include "No", "no" or "not", else 'yes'); accuracy, precision, recall, F1 and yes-ratio per split
  (`category`), and their means over splits. Headline: mean accuracy, since the summary averages accuracies (LLaVA
  reports F1, which is in the metrics; F1 also rewards a model that always says yes). Reference: `answer` or
  `label` ('yes'/'no'), optional `category`.
- Multiple choice (`scienceqa_img`, `ai2d`, `mmbench`): the option letter is read from the prediction (a bare or
  decorated letter, "the answer is X", a single stand-alone option letter) or, failing that, from an option's text
  quoted in it; an unreadable answer is wrong. MMBench uses circular evaluation when its rotations are present:
  a question counts only if every rotation of it (same `group`) is right. References: `answer` (letter or 0-based
  index), `options` (list of option texts), for MMBench optionally `group`.
- MME (`mme`): yes/no questions, two per image. The answer is read as MME's tool does (the whole answer, else its
  first four characters, holding 'yes' or 'no'; anything else is wrong). Per sub-task (`category`): acc = questions
  right, acc+ = images (`image`, else `question_id`) with both questions right, score = 100 (acc + acc+); `total`
  is the sum of the sub-task scores, as MME reports. Headline: mean over sub-tasks of (acc + acc+) / 2, i.e. the
  MME score scaled to [0, 1]. References: `answer` (yes/no), `category`, `image`. Question ids must be unique
  (the question loader refuses duplicates), so LLaVA's per-image ids need a suffix per question.
- SEED-Bench (`seed_bench`): multiple choice among A-D (the letter read as for multiple choice; option texts are
  optional), accuracy overall (the headline) and per question type (`category`). Reference: `answer` (letter).
- DocVQA (`anls`): ANLS (Biten et al. 2019) as the official evaluation computes it: both answers lower-cased,
  stripped and their inner whitespace collapsed; NL = Levenshtein distance / the longer length; credit
  1 - min over references of NL, set to 0 when below 0.5 (NL = 0.5 keeps 0.5, as in the evaluation code; the
  paper's formula zeroes it). References: `answers` (list), else `answer`.
- ChartQA (`relaxed_accuracy`): Pix2Struct's relaxed correctness, any reference: when both parse as numbers and
  the reference is not 0, within 5% of it; otherwise case-insensitive exact match (both stripped). A trailing '%'
  divides by 100, as in that code, so '12%' matches '0.12', not '12'. References: `answers` or `answer`.
- OCRBench (`ocrbench`): right if any reference (lower case, stripped, newlines as spaces) is a substring of the
  prediction treated alike; for handwritten mathematical expressions (`type`/`category` 'Handwritten Mathematical
  Expression Recognition', or `dataset_name` 'HME100k') all whitespace is removed instead and case kept, as in
  OCRBench's code. Headline: accuracy; `correct` is OCRBench's score (out of its 1000 questions); accuracy per
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
    """score: the headline number in [0, 1]; metrics: every reported number; per_item: each prediction's credit."""

    score: float
    metrics: dict[str, float]
    per_item: list[float]


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

    With a single reference answer (not the VQA setting) it is plain normalised exact match.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa_prediction(prediction)
    refs = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if always_normalize_references or len(set(refs)) > 1:
        refs = [normalize_vqa_answer(a) for a in refs]
    if len(refs) == 1:
        return float(pred == refs[0])
    matches = np.array([r == pred for r in refs], float)
    others = matches.sum() - matches                    # matches among the other annotators, per left-out one
    return float(np.mean(np.minimum(others / 3.0, 1.0)))


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
        per_item = [vqa_accuracy(p, _answer_list(r), always_normalize_references)
                    for p, r in zip(predictions, references)]
        acc = float(np.mean(per_item))
        return Score(acc, {"accuracy": acc}, per_item)
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
    """POPE metrics per split (`category`, default 'all') and their means; headline = mean accuracy."""
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
    return Score(metrics["accuracy"], metrics, [float(p == lab) for p, lab in zip(pred_yes, labels)])


# ----------------------------------------------------------------------------------------------------------------------
# Multiple choice.

LETTERS = string.ascii_uppercase
_WRAPPED_LETTER = re.compile(r"^[(\[]?([A-Z])[)\].:]?$")
_LEADING_LETTER = re.compile(r"^[(\[]?([A-Z])(?:[)\].:]|\s*[)\].:])\s")
# Keywords in any case, the letter itself upper case ("the answer is a dog" names no letter).
_ANSWER_IS = re.compile(r"\b(?i:answer|option|choice)\s*(?i:is|:)?\s*(?i:option\s*)?[(\[]?([A-Z])\b(?!')")


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


def _option_text_key(text: str) -> str:
    return " ".join(w.lower() for w in _words(text))


def extract_choice(prediction: str, options: Sequence[str]) -> str | None:
    """The option letter a free-form answer picks, or None when it picks none or several.

    In order: a bare or decorated letter ("B", "(B)", "B."), a leading letter ("B. dog", "(B) dog"), "the answer
    is B" / "Answer: B", exactly one stand-alone option letter among the words (the article "A" before a
    lower-case word does not count), then the text of exactly one option (the longest wins when one option's text
    contains another's, as with "red" and "dark red").
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
            is_article = w == "A" and i + 1 < len(words) and words[i + 1][:1].islower()
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


@register("scienceqa_img", "ai2d")
def multiple_choice(predictions: Sequence[str], references: Sequence[Mapping]) -> Score:
    """Accuracy of the extracted option letter (ScienceQA-IMG, AI2D)."""
    _check_lengths(predictions, references)
    per_item, unparsed = [], 0
    for p, r in zip(predictions, references):
        letter, options = _mc_target(r)
        choice = extract_choice(p, options)
        unparsed += choice is None
        per_item.append(float(choice == letter))
    acc = float(np.mean(per_item))
    return Score(acc, {"accuracy": acc, "unparsed": unparsed / len(predictions)}, per_item)


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
    """MMBench: circular accuracy (every rotation of a question right) when rotations are present, else plain."""
    base = multiple_choice(predictions, references)
    groups: dict[Any, list[float]] = collections.defaultdict(list)
    for credit, r in zip(base.per_item, references):
        groups[mmbench_group(r)].append(credit)
    circular = float(np.mean([min(c) for c in groups.values()]))
    has_rotations = any(len(c) > 1 for c in groups.values())
    metrics = {"vanilla_accuracy": base.score, "circular_accuracy": circular, "questions": float(len(groups)),
               "unparsed": base.metrics["unparsed"]}
    metrics["accuracy"] = circular if has_rotations else base.score
    return Score(metrics["accuracy"], metrics, base.per_item)


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


@register("mme")
def mme(predictions: Sequence[str], references: Sequence[Mapping]) -> Score:
    """MME acc, acc+ and score per sub-task, their total, and the [0, 1] headline (module docstring)."""
    _check_lengths(predictions, references)
    per_item = []
    for p, r in zip(predictions, references):
        label = _single_answer(r, "answer", "label").strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"MME reference {r.get('question_id')!r} has answer {label!r}; expected yes/no")
        per_item.append(float(mme_yes_no(p) == label))
    tasks: dict[str, dict[Any, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for credit, r in zip(per_item, references):
        tasks[str(_single_answer(r, "category"))][r.get("image", r.get("question_id"))].append(credit)
    metrics: dict[str, float] = {}
    halves = []
    for task, images in sorted(tasks.items()):
        credits = [c for per_image in images.values() for c in per_image]
        acc = float(np.mean(credits))
        acc_plus = float(np.mean([min(c) for c in images.values()]))
        metrics.update({f"{task}/acc": acc, f"{task}/acc_plus": acc_plus, f"{task}/score": 100 * (acc + acc_plus)})
        halves.append((acc + acc_plus) / 2)
    metrics["total"] = sum(metrics[f"{t}/score"] for t in tasks)
    metrics["accuracy"] = float(np.mean(halves))
    return Score(metrics["accuracy"], metrics, per_item)


@register("seed_bench")
def seed_bench(predictions: Sequence[str], references: Sequence[Mapping]) -> Score:
    """SEED-Bench: accuracy of the option letter (A-D), overall and per question type (`category`)."""
    _check_lengths(predictions, references)
    per_item = []
    for p, r in zip(predictions, references):
        options = list(r.get("options") or [""] * 4)   # texts optional: '' never matches an answer's words
        letter, _ = _mc_target(dict(r, options=options))
        per_item.append(float(extract_choice(p, options) == letter))
    metrics = {"accuracy": float(np.mean(per_item))}
    by_type: dict[str, list[float]] = collections.defaultdict(list)
    for credit, r in zip(per_item, references):
        if "category" in r:
            by_type[str(r["category"])].append(credit)
    metrics.update({f"{t}/accuracy": float(np.mean(c)) for t, c in sorted(by_type.items())})
    return Score(metrics["accuracy"], metrics, per_item)


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
    """One question's ANLS credit: 1 - the smallest normalised distance to a reference, 0 below `threshold`."""
    if not answers:
        raise ValueError("ANLS needs at least one reference answer")
    pred = " ".join(prediction.strip().lower().split())
    distances = []
    for answer in answers:
        ref = " ".join(answer.strip().lower().split())
        longest = max(len(pred), len(ref))
        distances.append(levenshtein(pred, ref) / longest if longest else 0.0)
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
    """A number as Pix2Struct reads it ('12%' -> 0.12), or None."""
    try:
        return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correct(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA's rule: numbers within 5% of a nonzero target, anything else case-insensitive exact match."""
    prediction, target = prediction.strip(), target.strip()
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
    """OCRBench's rule: some reference occurs in the prediction (case-folded, or whitespace-free for HME)."""
    def prepare(text: str) -> str:
        text = text.strip().replace("\n", " ")
        return "".join(text.split()) if math_expression else text.lower()
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
