"""Adaptive V at inference: answer with the fewest visual tokens first, and ask again with more only when the answer
is unsure (elastic V, vlm_jax/elastic.py: one model serves every V of its set).

Confidence of an answer: the geometric mean of its tokens' probabilities, stop token included (it says the answer
is complete), in (0, 1]: `confidence`. The policy for a threshold t over a ladder V_1 < V_2 < ... < V_K: answer at
V_1; while the confidence is below t and a larger V is left, answer again at the next V; keep the last answer. Its
cost per question is the sum of the inference FLOPs of every V it tried (each retry runs the LLM again over the
new prompt; the tower's features could be kept between tries, so the FLOPs measure is the LLM's).

Greedy answers are deterministic, so the policy's outcome for any threshold and ladder follows from every question
answered once at every V (`choose`, `policy`, `sweep`): what the grid reports, for every ladder from the smallest V
to the largest (`ladders`: skipping rungs saves the tries of questions that need the largest V anyway), and the
best of them at each cost (`pareto`). `AdaptiveAnswerer` runs the policy live,
answering at a larger V only the questions that escalate; tests check the two agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

# Thresholds swept by default: 0 (never escalate: always the first V), 0.01 ... 1 in steps of 0.01 and finer
# towards 1 (where a small model's confident answers sit), and 1.01 (always escalate to the largest V).
THRESHOLDS = tuple(sorted({round(t, 4) for t in np.linspace(0.0, 1.0, 101)}
                          | {0.991, 0.993, 0.995, 0.997, 0.998, 0.999, 0.9995, 0.9999, 1.01}))


def ladders(tokens: Sequence[int]) -> list[tuple[int, ...]]:
    """Every ladder from the smallest V of the set to the largest, through any subset of the others (2^(K-2) of
    them): skipping rungs saves the tries of questions that need the largest V anyway."""
    vs = sorted(tokens)
    if len(vs) < 2:
        return [tuple(vs)]
    middle = vs[1:-1]
    out = [(vs[0], *[v for i, v in enumerate(middle) if mask >> i & 1], vs[-1]) for mask in range(2 ** len(middle))]
    return sorted(out, key=lambda ladder: (len(ladder), ladder))


def confidence(logprobs, lengths) -> np.ndarray:
    """float[B] in (0, 1]: exp of the mean log probability of each answer's tokens and its stop token.
    logprobs float[B, T] (GenerationOutput.logprobs); lengths int[B]: tokens before the stop token (T: none came,
    and all T count)."""
    logprobs = np.asarray(logprobs, np.float64)
    t = logprobs.shape[1]
    count = np.minimum(np.asarray(lengths) + 1, t)                       # the stop token counts when it came
    used = np.arange(t)[None, :] < count[:, None]
    return np.exp((logprobs * used).sum(1) / count)


def choose(confidences, threshold: float) -> np.ndarray:
    """int[Q]: the index (into the ladder) of the V each question is answered with. confidences float[K, Q]: each
    question's confidence at each V of the ladder, smallest V first."""
    c = np.asarray(confidences)
    sure = c >= threshold
    sure[-1] = True   # the largest V answers whatever its confidence
    return np.argmax(sure, axis=0)


def policy(credits, confidences, flops, threshold: float) -> dict:
    """The policy at `threshold`: {'threshold', 'error' (1 - mean credit), 'flops' (mean per question),
    'share': fraction of questions answered at each V, 'tried': fraction that tried each V (the FLOPs at any
    other cost per V are tried . cost)}. credits float[K, Q] (1 = right), flops float[K]: one answer's inference
    FLOPs at each V of the ladder."""
    credits, flops = np.asarray(credits, np.float64), np.asarray(flops, np.float64)
    chosen = choose(confidences, threshold)
    q = np.arange(credits.shape[1])
    tried = [float(np.mean(chosen >= k)) for k in range(credits.shape[0])]   # every V up to the chosen one
    return {"threshold": float(threshold), "error": float(1.0 - credits[chosen, q].mean()),
            "flops": float(np.dot(tried, flops)),
            "share": [float(np.mean(chosen == k)) for k in range(credits.shape[0])], "tried": tried}


def sweep(credits, confidences, flops, thresholds: Sequence[float] = THRESHOLDS) -> list[dict]:
    """`policy` at every threshold."""
    return [policy(credits, confidences, flops, t) for t in thresholds]


def matching(curve: Sequence[dict], target_error: float, cost=lambda p: p["flops"]) -> dict | None:
    """The cheapest point (by `cost`) of a sweep whose error is at most `target_error` (None if none reaches it)."""
    ok = [p for p in curve if p["error"] <= target_error + 1e-12]
    return min(ok, key=lambda p: (cost(p), p["threshold"])) if ok else None


def pareto(points: Sequence[dict]) -> list[dict]:
    """The points no other beats in both FLOPs and error, cheapest first: the best any ladder and threshold
    reach at each cost."""
    out: list[dict] = []
    for p in sorted(points, key=lambda p: (p["flops"], p["error"])):
        if not out or p["error"] < out[-1]["error"]:
            out.append(p)
    return out


class AdaptiveAnswerer:
    """The policy, live: `answer_at[V](items) -> (answers, confidences)` for each V of the ladder (e.g. an
    evaluation Answerer per V of one elastic model); only questions still unsure are asked again at the next V."""

    def __init__(self, answer_at: Mapping[int, Callable], threshold: float):
        self.ladder = sorted(answer_at)
        self.answer_at, self.threshold = answer_at, threshold

    def __call__(self, items: Sequence) -> tuple[list[str], np.ndarray]:
        """(answers, the V each question was answered with)."""
        answers: list = [None] * len(items)
        used = np.zeros(len(items), np.int64)
        pending = list(range(len(items)))
        for k, v in enumerate(self.ladder):
            got, conf = self.answer_at[v]([items[i] for i in pending])
            last = k == len(self.ladder) - 1
            still = []
            for i, a, c in zip(pending, got, np.asarray(conf)):
                answers[i], used[i] = a, v
                if c < self.threshold and not last:
                    still.append(i)
            pending = still
            if not pending:
                break
        return answers, used
