"""Metric functions, the same as lm-evaluation-harness 0.4.x computes them.

Answer extraction (the regex / take_first filters), exact match with its
normalisation, ROUGE (the `rouge_score` package, as lm-eval and HELM use), and the
mean with its standard error (sample standard deviation / sqrt(n), lm-eval's
`mean_stderr`).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from functools import lru_cache

from server.extras import require

FALLBACK = "[invalid]"


def regex_extract(text: str, pattern: str, group_select: int = 0,
                  fallback: str = FALLBACK) -> str:
    """lm-eval's `regex` filter followed by `take_first` (filters/extraction.py)."""
    matches = re.findall(pattern, text if isinstance(text, str) else "")
    if not matches:
        return fallback
    match = matches[group_select]
    if isinstance(match, tuple):
        found = [m for m in match if m]
        match = found[0] if found else fallback
    return match.strip()


def exact_match(prediction: str, reference: str, *, regexes_to_ignore: Sequence[str] = (),
                ignore_case: bool = False, ignore_punctuation: bool = False) -> float:
    """lm-eval's `exact_match` (api/metrics.py exact_match_hf_evaluate) for one pair."""
    for pattern in regexes_to_ignore:
        prediction = re.sub(pattern, "", prediction)
        reference = re.sub(pattern, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        prediction, reference = prediction.translate(table), reference.translate(table)
    # numpy's fixed-width unicode arrays (which lm-eval compares) drop trailing NULs.
    return float(prediction.rstrip("\x00") == reference.rstrip("\x00"))


def normalize_whitespace(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@lru_cache(maxsize=1)
def _rouge_scorer():
    rouge_scorer = require("rouge_score.rouge_scorer", "eval", "ROUGE scoring")
    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measure with Porter stemming after whitespace normalisation
    (lm-eval's cnn_dailymail task)."""
    scores = _rouge_scorer().score(normalize_whitespace(reference),
                                   normalize_whitespace(prediction))
    return {name: scores[name].fmeasure for name in ("rouge1", "rouge2", "rougeL")}


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean; None for fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    mu = mean(values)
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def summarize(values: Sequence[float]) -> dict:
    """{"value", "stderr", "n"} for a per-item score list."""
    return {"value": mean(values), "stderr": mean_stderr(values), "n": len(values)}
