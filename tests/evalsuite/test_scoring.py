"""Scoring equals lm-evaluation-harness's own filters and metrics on tricky outputs."""

from __future__ import annotations

import math

import pytest

from evalsuite import scoring
from evalsuite.tasks import gsm8k

OUTPUTS = [
    "She has 5 + 3 = 8 apples.\n#### 8",
    "The answer is $1,234.",
    "#### -3.5\nQuestion: next",
    "no numbers here",
    "It costs $12.50 and then 7 more, so 19.",
    "#### 1,000,000",
    "",
    "1.",
    "values 3, 4 and 5",
]
REFERENCE = "Some working.\n#### 8"


@pytest.mark.parametrize("name", list(gsm8k.FILTERS))
def test_gsm8k_filters_match_lm_eval(name):
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    pattern, group = gsm8k.FILTERS[name]
    theirs = RegexFilter(regex_pattern=pattern, group_select=group).apply(
        [[o] for o in OUTPUTS], [{}] * len(OUTPUTS))
    for output, (their_answer,) in zip(OUTPUTS, theirs, strict=True):
        ours = scoring.regex_extract(output, pattern, group)
        assert ours == their_answer, output
        for reference in (REFERENCE, f"#### {their_answer}", "#### 1234", "#### 19"):
            expected = exact_match_hf_evaluate(
                predictions=[their_answer], references=[reference],
                regexes_to_ignore=list(gsm8k.IGNORE), ignore_case=True)["exact_match"]
            got = scoring.exact_match(ours, reference, regexes_to_ignore=gsm8k.IGNORE,
                                      ignore_case=True)
            assert got == expected, (output, reference)


def test_exact_match_punctuation_and_case_match_lm_eval():
    from lm_eval.api.metrics import exact_match_hf_evaluate

    for pred, ref in [("(B)", "b"), ("B.", "B"), ("c", "B"), (" A", "A")]:
        expected = exact_match_hf_evaluate(predictions=[pred], references=[ref],
                                           ignore_case=True, ignore_punctuation=True)
        assert scoring.exact_match(pred, ref, ignore_case=True,
                                   ignore_punctuation=True) == expected["exact_match"]


def test_mean_stderr_matches_lm_eval():
    from lm_eval.api.metrics import mean_stderr

    values = [1.0, 0.0, 1.0, 1.0, 0.0, 0.25]
    assert scoring.mean_stderr(values) == pytest.approx(mean_stderr(values))
    assert scoring.mean_stderr([1.0]) is None
    assert math.isnan(scoring.mean([]))


def test_rouge_stems_and_normalises_whitespace():
    from rouge_score import rouge_scorer

    pred, ref = "The cats  were\nrunning home .", "cat runs home"
    scores = scoring.rouge(pred, ref)
    direct = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(
        "cat runs home", "The cats were running home .")
    assert scores == {k: direct[k].fmeasure for k in ("rouge1", "rouge2", "rougeL")}
    assert scores["rouge1"] > 0.5  # stemming: cats/cat, running/runs
    assert scoring.rouge("", ref)["rouge1"] == 0.0
