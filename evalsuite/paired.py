"""Paired comparison of two runs over the same items: is B's difference from A noise?

Per metric, over the items both runs scored:
- 0/1 scores (accuracy, exact match, pass@1): McNemar's exact test, i.e. a two-sided
  binomial test with p = 1/2 on the discordant pairs (A right and B wrong, or the
  reverse); concordant items carry no information about the difference;
- other scores (ROUGE, toxicity): a two-sided paired-bootstrap p-value, the share of
  resampled mean differences on the other side of zero, doubled.
Every metric also gets a percentile paired-bootstrap confidence interval for the mean
difference B - A (items resampled with replacement, both runs' scores together,
`BOOTSTRAP_SAMPLES` resamples, fixed seed so reports repeat).
"""

from __future__ import annotations

import math

import numpy as np

BOOTSTRAP_SAMPLES = 10_000
SEED = 1234


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def bootstrap(diffs: list[float], *, samples: int = BOOTSTRAP_SAMPLES, seed: int = SEED,
              confidence: float = 0.95) -> tuple[float, float, float]:
    """(lower, upper, two-sided p) for the mean of paired differences."""
    d = np.asarray(diffs, dtype=float)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(samples, len(d)))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lower, upper = np.quantile(means, [alpha, 1.0 - alpha])
    p = min(1.0, 2.0 * min(float((means <= 0).mean()), float((means >= 0).mean())))
    return float(lower), float(upper), p


def _binary(values: list[float]) -> bool:
    return all(v in (0.0, 1.0) for v in values)


def compare_metric(a: list[float], b: list[float]) -> dict:
    """Paired statistics for one metric; a[i] and b[i] score the same item."""
    n = len(a)
    if n == 0:
        return {"n": 0, "test": None, "delta": None, "ci": None, "p_value": None}
    diffs = [y - x for x, y in zip(a, b, strict=True)]
    lower, upper, p_boot = bootstrap(diffs)
    out = {"n": n, "delta": sum(diffs) / n, "ci": [lower, upper]}
    if _binary(a) and _binary(b):
        a_only = sum(1 for x, y in zip(a, b, strict=True) if x > y)
        b_only = sum(1 for x, y in zip(a, b, strict=True) if y > x)
        out.update(test="mcnemar", p_value=mcnemar_exact(a_only, b_only),
                   discordant={"a_only": a_only, "b_only": b_only})
    else:
        out.update(test="bootstrap", p_value=p_boot)
    return out
