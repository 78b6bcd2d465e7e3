"""A stand-in model for GSM8K speed benchmarks: answers of varied length that end
where lm-eval's stop string cuts them, as a real model's do.

A random model never writes `Question:`, so every answer runs to the 256-token cap,
and no static batch ever waits for its longest row while the others are done: the
waste continuous batching removes does not occur. Real models answer GSM8K in a few
worked lines and then start the next question. Teaching the small test model real
arithmetic takes far longer than a benchmark should; what it learns in a few minutes
on CPU is to memorise one worked answer per name (one to eight worked lines, 48 to
273 tokens) and to follow it with the next `Question:`. Asked a GSM8K-format question,
it answers at a length set by the question's name, from a few dozen tokens to past
the cap, imperfectly remembered (so answers vary more than the eight lengths).

The trained model is cached by recipe so reruns skip the training (~8 minutes on a
2-core VM).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from gsm8k_items import MAX_STEPS, NAMES, make_problem

# answer lines per name: one to eight, so lengths spread from ~40 tokens to the cap
LINES = dict(zip(NAMES, (1, 2, 3, 4, 5, 6, 7, 8, 2, 4), strict=True))
RECIPE = {"version": 1, "steps": 250, "seed": 0, "lr": 1e-3, "shots": 4, "rows": 2}


def _answers() -> dict[str, str]:
    return {name: make_problem(random.Random(i), LINES[name], name=name)["answer"]
            for i, name in enumerate(NAMES)}


def _training_docs(n: int, seed: int) -> list[dict]:
    answers, rng = _answers(), random.Random(seed)
    docs = []
    for _ in range(n):
        problem = make_problem(rng, rng.randint(1, MAX_STEPS))
        docs.append({"question": problem["question"],
                     "answer": answers[problem["question"].split()[0]]})
    return docs


def build(cache: Path, log=print) -> Path:
    """The trained model's directory under `cache`, training it if it is not there."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.testmodel import create_test_model

    model_dir = Path(cache) / f"gsm8k-standin-v{RECIPE['version']}"
    marker = model_dir / "bench_recipe.json"
    if marker.exists() and json.loads(marker.read_text()) == RECIPE:
        return model_dir
    create_test_model(model_dir, "small", seed=RECIPE["seed"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.train()
    torch.manual_seed(RECIPE["seed"])
    rng = random.Random(RECIPE["seed"] + 1)
    docs = _training_docs(500, RECIPE["seed"] + 2)
    opt = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"])
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 20))
    steps = RECIPE["steps"]
    for step in range(steps):
        # lm-eval's few-shot layout ("Question: q\nAnswer: a", blank line between),
        # ending in the next "Question:" so the model learns where an answer stops
        texts = ["\n\n".join(f"Question: {d['question']}\nAnswer: {d['answer']}"
                             for d in rng.sample(docs, RECIPE["shots"])) + "\n\nQuestion:"
                 for _ in range(RECIPE["rows"])]
        batch = tok(texts, return_tensors="pt", padding=True, truncation=True,
                    max_length=768)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        warmup.step()
        opt.zero_grad()
        if step % 25 == 0 or step == steps - 1:
            log(f"training the stand-in model: step {step + 1}/{steps}, loss {loss.item():.3f}")
    model.eval()
    model.save_pretrained(model_dir)
    marker.write_text(json.dumps(RECIPE))
    return model_dir
