"""Each fine-tuning task's official metrics, computed locally (no `evaluate`, no hub): GLUE's
(accuracy, F1 of the positive class, Matthews correlation, Pearson and Spearman correlation)
and SQuAD's exact match and F1 with the official answer normalisation (v1.1 and v2.0 scripts).
Every function takes plain sequences and returns a float (scores in [0, 100] for SQuAD, as its
scripts print them; GLUE's in [0, 1] or [-1, 1])."""
from __future__ import annotations

import collections
import math
import re
import string
from typing import Sequence

import numpy as np


def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    pred, gold = np.asarray(pred), np.asarray(gold)
    return float((pred == gold).mean()) if len(gold) else float("nan")


def f1_binary(pred: Sequence[int], gold: Sequence[int], positive: int = 1) -> float:
    """F1 of the positive class (MRPC and QQP report it for label 1); 0 when nothing is predicted
    or present positive (sklearn's zero_division=0)."""
    pred, gold = np.asarray(pred) == positive, np.asarray(gold) == positive
    tp = float((pred & gold).sum())
    denom = float(pred.sum() + gold.sum())
    return 2 * tp / denom if denom else 0.0


def matthews(pred: Sequence[int], gold: Sequence[int]) -> float:
    """Matthews correlation (CoLA) for two or more classes (Gorodkin's R_K, what sklearn
    computes); 0 when either side is constant."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    classes = np.union1d(pred, gold)
    c = np.array([[np.sum((gold == a) & (pred == b)) for b in classes] for a in classes], dtype=np.float64)
    t, p, n = c.sum(axis=1), c.sum(axis=0), c.sum()
    cov = np.trace(c) * n - t @ p
    denom = math.sqrt((n * n - p @ p) * (n * n - t @ t))
    return float(cov / denom) if denom else 0.0


def pearson(pred: Sequence[float], gold: Sequence[float]) -> float:
    x, y = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y / denom) if denom else 0.0


def _ranks(v: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank (as scipy's rankdata)."""
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v), dtype=np.float64)
    sorted_v = v[order]
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(pred: Sequence[float], gold: Sequence[float]) -> float:
    return pearson(_ranks(np.asarray(pred, dtype=np.float64)), _ranks(np.asarray(gold, dtype=np.float64)))


# -- SQuAD (the official evaluation scripts' normalisation and scores)

def normalize_answer(s: str) -> str:
    """Lower case, punctuation and the articles a/an/the removed, whitespace collapsed."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:  # v2.0: an unanswerable question scores 1 only for an empty answer
        return float(p == g)
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: dict[str, str], answers: dict[str, list[str]]) -> dict[str, float]:
    """`exact_match` and `f1` (0-100) over every question in ANSWERS, each the best over its gold
    answers (an unanswerable one: the empty answer); a question without a prediction scores 0.
    With unanswerable questions, also `HasAns_*` and `NoAns_*` as the v2.0 script reports them."""
    em, f1, has = {}, {}, {}
    for qid, golds in answers.items():
        golds = [a for a in golds if normalize_answer(a)] or [""]
        has[qid] = golds != [""]
        pred = predictions.get(qid)
        em[qid] = 0.0 if pred is None else max(exact_match(pred, g) for g in golds)
        f1[qid] = 0.0 if pred is None else max(token_f1(pred, g) for g in golds)

    def mean(scores: dict, keep) -> float:
        vals = [v for q, v in scores.items() if keep(q)]
        return 100.0 * sum(vals) / len(vals) if vals else float("nan")

    out = {"exact_match": mean(em, lambda q: True), "f1": mean(f1, lambda q: True)}
    if not all(has.values()):
        for name, keep in (("HasAns", lambda q: has[q]), ("NoAns", lambda q: not has[q])):
            out[f"{name}_exact_match"], out[f"{name}_f1"] = mean(em, keep), mean(f1, keep)
    return out
