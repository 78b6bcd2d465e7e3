"""Per-item agreement with lm-evaluation-harness (bench/eval_agreement.py): gsm8k and
mmlu (0- and 5-shot) prompts, answers and scores; mbpp prompts and generations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "eval_agreement.py"


def test_items_agree_with_lm_eval(tiny_model_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", tiny_model_dir, "--limit", "3",
         "--batch-size", "2", "--json"], capture_output=True, text=True, timeout=1200,
        cwd=tmp_path)
    assert result.returncode in (0, 1), result.stderr[-3000:]
    report = json.loads(result.stdout)
    for task in ("gsm8k", "mmlu", "mmlu_5shot", "mbpp"):
        assert report[task]["problems"] == [], report[task]
    assert report["gsm8k"]["items"] == 3 and report["mbpp"]["items"] == 3
    for task in ("mmlu", "mmlu_5shot"):  # 3 per subject, 4 subjects
        assert report[task]["items"] == 12
        assert report[task]["max_abs_ll_diff"] < 1e-4
    assert report["agree"] and result.returncode == 0
