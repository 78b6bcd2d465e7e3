"""`llmctl eval compare`: paired statistics checked against references computed here
independently (scipy's binomial test; the exact bootstrap distribution enumerated),
and the --max-drop / --significance gate."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import binomtest

from evalsuite import store
from evalsuite.tasks.base import Sample
from server.db.engine import Database


def stored_run(db, task: str, scores: list[dict], fingerprint: str) -> str:
    run, _ = store.open_run(db, task=task, model="tiny", fingerprint=fingerprint,
                            config={}, n_items=len(scores), resume=False)
    store.save_samples(db, run.id, [Sample(i, str(i), f"prompt {i}", f"out {i} {s}", None,
                                           "t", s) for i, s in enumerate(scores)])
    names = scores[0].keys()
    metrics = {"metrics": {m: {"value": sum(s[m] for s in scores) / len(scores),
                               "stderr": None, "n": len(scores)} for m in names}}
    store.finish_run(db, run.id, metrics, {})
    return run.id


@pytest.fixture
def db(cli):
    return Database(f"sqlite:///{cli.home / 'llmctl.db'}")


def test_mcnemar_exact_p_value_matches_scipy(cli, db):
    # 20 items: 9 only A gets right, 2 only B gets right, 9 concordant.
    a = [1] * 9 + [0] * 2 + [1] * 5 + [0] * 4
    b = [0] * 9 + [1] * 2 + [1] * 5 + [0] * 4
    ra = stored_run(db, "mmlu", [{"acc": float(x)} for x in a], "fp-mmlu")
    rb = stored_run(db, "mmlu", [{"acc": float(x)} for x in b], "fp-mmlu")
    out = cli.json("eval", "compare", ra, rb)
    stats = out["metrics"]["acc"]["paired"]
    assert stats["test"] == "mcnemar" and stats["discordant"] == {"a_only": 9, "b_only": 2}
    reference = binomtest(2, 11, 0.5, alternative="two-sided").pvalue
    assert stats["p_value"] == pytest.approx(reference, rel=1e-12)
    assert out["metrics"]["acc"]["delta"] == pytest.approx(-7 / 20)

    # A drop of 0.35 with p ≈ 0.065: a gate that ignores noise passes at 0.05,
    # a plain --max-drop fails; --baseline last finds A as B's baseline.
    strict = cli("eval", "compare", ra, rb, "--max-drop", "acc=0.1")
    assert strict.exit_code == 1 and "allowed drop 0.1" in strict.output
    lenient = cli("eval", "compare", rb, "--baseline", "last", "--max-drop", "acc=0.1",
                  "--significance", "0.05", "--items", "--quiet")
    assert lenient.exit_code == 0, lenient.output
    assert cli.json("eval", "compare", ra, rb)["items"]["different"] == 11
    assert "differing items" not in cli("eval", "compare", ra, rb).output
    assert "differing items" in cli("eval", "compare", ra, rb, "--items").output


def test_bootstrap_interval_matches_the_exact_bootstrap_distribution(cli, db):
    # Six items with distinct ROUGE differences: the bootstrap distribution of the mean
    # difference can be enumerated exactly (6^6 equally likely resamples).
    a = [0.50, 0.20, 0.35, 0.10, 0.42, 0.30]
    b = [0.55, 0.12, 0.47, 0.08, 0.60, 0.33]
    ra = stored_run(db, "summarization", [{"rouge1": x} for x in a], "fp-sum")
    rb = stored_run(db, "summarization", [{"rouge1": x} for x in b], "fp-sum")
    stats = cli.json("eval", "compare", ra, rb)["metrics"]["rouge1"]["paired"]
    assert stats["test"] == "bootstrap"
    diffs = np.array(b) - np.array(a)
    means = np.array([diffs[list(idx)].mean()
                      for idx in itertools.product(range(6), repeat=6)])
    lower, upper = np.quantile(means, [0.025, 0.975])
    # 10,000 Monte-Carlo resamples against the exact distribution: within 0.005
    # (the mean differences span about 0.25).
    assert stats["ci"][0] == pytest.approx(lower, abs=0.005)
    assert stats["ci"][1] == pytest.approx(upper, abs=0.005)
    exact_p = 2 * min((means <= 0).mean(), (means >= 0).mean())
    assert stats["p_value"] == pytest.approx(exact_p, abs=0.02)
