"""Synthetic GSM8K-format items for benchmarks, at GSM8K's lengths.

The project's gsm8k fixtures are ten short problems (answers of about 65 tokens with
the test model's tokenizer, 5-shot prompts of about 660), shorter than the real
dataset's. These are word problems of one to five steps in GSM8K's format, each step
a worked line with a <<a+b=c>> annotation, then `#### N`: answers of 46 to 187 tokens
(mean about 113) and 5-shot prompts of 750 to 1,200 tokens (mean about 1,000), around
the size of lm-eval's gsm8k 5-shot prompts with common open-model tokenizers.
Deterministic for a seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ("Ava", "Ben", "Mia", "Leo", "Zoe", "Sam", "Ivy", "Max", "Eva", "Tom")
THINGS = ("apples", "marbles", "stickers", "coins", "books", "pencils", "cards", "shells")
GAIN = ("buys", "finds", "is given", "wins", "picks up")
LOSS = ("gives away", "loses", "sells", "uses", "trades away")
MAX_STEPS = 5


def make_problem(rng: random.Random, steps: int, name: str | None = None) -> dict:
    """One word problem of `steps` changes, one worked answer line per change."""
    name, thing = name or rng.choice(NAMES), rng.choice(THINGS)
    total = rng.randint(5, 60)
    question = [f"{name} has {total} {thing}."]
    answer = [f"{name} has {total} {thing}."]
    for _ in range(steps):
        if total > 3 and rng.random() < 0.4:
            n = rng.randint(1, total - 1)
            change, new = f"{name} {rng.choice(LOSS)} {n} {thing}", total - n
            work = f"{total} - {n} = <<{total}-{n}={new}>>{new}"
        else:
            n = rng.randint(1, 40)
            change, new = f"{name} {rng.choice(GAIN)} {n} {thing}", total + n
            work = f"{total} + {n} = <<{total}+{n}={new}>>{new}"
        question.append(f"Then {change}.")
        answer.append(f"{change}, so {work}.")
        total = new
    question.append(f"How many {thing} does {name} have now?")
    answer.append(f"#### {total}")
    return {"question": " ".join(question), "answer": "\n".join(answer)}


def make_split(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [make_problem(rng, rng.randint(1, MAX_STEPS)) for _ in range(n)]


def write_split(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
