"""MMLU-format items per second: llmctl's eval runner vs lm-evaluation-harness's `hf`.

Both evaluate the same model (by default the ~35M-parameter `small` test model,
built here) on the same MMLU-format items (generated deterministically from the
project's fixtures: the four subjects, questions of varied length, the fixtures'
dev items as few-shot examples), in one process, with the same batch size and
torch threads, alternating rounds and keeping each side's best round. Timed: the
whole evaluation call with the model already loaded (lm-eval: `simple_evaluate`
with an HFLM instance, task files pointing at the items; llmctl: `prepare_task` +
`run_eval`, including its database writes). Both accuracies are printed as a
sanity check (they must be equal).

Usage: python bench/eval_mmlu_speed.py [--model DIR] [--items-per-subject 50]
       [--shots 0 5] [--batch-size 8] [--rounds 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT / "evalsuite" / "fixtures" / "mmlu"

WORDS = ("the of and to in is that it for was on are as with his they at be this from have "
         "or by one had not but what all were when we there can an your which their said if "
         "do will each about how up out them then she many some so these would other into "
         "has more two time could no make than first been its who now people my made over "
         "did down only way find use may water long little very after words called just "
         "where most know get through back much before go good new write our used me man "
         "too any day same right look think also around another came come work three word "
         "must because does part even place well such here take why things help put years "
         "different away again off went old number great tell men say small every found").split()


def make_items(per_subject: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    rows = [json.loads(x) for x in (FIXTURES / "test.jsonl").read_text().splitlines()]
    dev = [json.loads(x) for x in (FIXTURES / "dev.jsonl").read_text().splitlines()]
    test = []
    for subject in sorted({r["subject"] for r in rows}):
        base = [r for r in rows if r["subject"] == subject]
        for i in range(per_subject):
            b = base[i % len(base)]
            stem = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 90)))
            choices = [c + " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 6)))
                       for c in b["choices"]]
            test.append({"question": f"{stem.capitalize()}. {b['question']}",
                         "subject": subject, "choices": choices, "answer": rng.randint(0, 3)})
    return test, dev


def write_data(work: Path, test: list[dict], dev: list[dict]) -> tuple[Path, Path, list[str]]:
    import yaml
    from lm_eval import tasks as lm_tasks

    data = work / "data"
    data.mkdir()
    for name, rows in (("test", test), ("dev", dev)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    include = work / "tasks"
    include.mkdir()
    tdir = Path(lm_tasks.__file__).parent / "mmlu" / "default"
    template = yaml.safe_load((tdir / "_default_template_yaml").read_text())
    names = []
    for subject in sorted({r["subject"] for r in test}):
        files = {}
        for split, rows in (("test", test), ("dev", dev)):
            path = include / f"{subject}_{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows
                                    if r["subject"] == subject))
            files[split] = str(path)
        desc = yaml.safe_load((tdir / f"mmlu_{subject}.yaml").read_text())["description"]
        cfg = {**template, "task": f"speed_mmlu_{subject}", "dataset_path": "json",
               "dataset_kwargs": {"data_files": files}, "description": desc}
        (include / f"speed_mmlu_{subject}.yaml").write_text(yaml.safe_dump(cfg))
        names.append(f"speed_mmlu_{subject}")
    return data, include, names


def time_lm_eval(lm, include: Path, names: list[str], shots: int) -> tuple[float, float]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include))
    start = time.perf_counter()
    res = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=shots,
                                  task_manager=manager, log_samples=False)
    seconds = time.perf_counter() - start
    accs = res["results"]
    total = sum(accs[t]["acc,none"] * res["n-samples"][t]["effective"] for t in names)
    count = sum(res["n-samples"][t]["effective"] for t in names)
    return seconds, total / count


def time_llmctl(model, data: Path, shots: int, db) -> tuple[float, float]:
    from evalsuite import data as data_mod
    from evalsuite import runner
    from evalsuite.tasks import TaskOptions

    start = time.perf_counter()
    prepared = runner.prepare_task("mmlu", TaskOptions(num_fewshot=shots),
                                   data_mod.DataOptions(data=data))
    result = runner.run_eval(prepared, model, db, model_identity=model.identity(),
                             resume=False)
    seconds = time.perf_counter() - start
    return seconds, result.metrics["metrics"]["acc"]["value"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: build the small test model)")
    parser.add_argument("--items-per-subject", type=int, default=50)
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 5])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM

    from evalsuite.hf_model import HFModel
    from server.db.engine import Database

    transformers.utils.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="llmctl-mmlu-speed-"))
    model_dir = args.model
    if not model_dir:
        from server.testmodel import create_test_model

        model_dir = str(create_test_model(work / "small", "small"))
    test, dev = make_items(args.items_per_subject)
    data, include, names = write_data(work, test, dev)
    lm = HFLM(pretrained=model_dir, batch_size=args.batch_size, device="cpu")
    ours = HFModel(model_dir, batch_size=args.batch_size, device="cpu")
    db = Database(f"sqlite:///{work / 'eval.db'}")
    report = {"model": model_dir, "items": len(test), "batch_size": args.batch_size,
              "torch_threads": torch.get_num_threads(), "results": []}
    for shots in args.shots:
        best = {"lm_eval": float("inf"), "llmctl": float("inf")}
        acc = {}
        for _ in range(args.rounds):
            s, acc["lm_eval"] = time_lm_eval(lm, include, names, shots)
            best["lm_eval"] = min(best["lm_eval"], s)
            s, acc["llmctl"] = time_llmctl(ours, data, shots, db)
            best["llmctl"] = min(best["llmctl"], s)
        row = {"shots": shots, "seconds": {k: round(v, 2) for k, v in best.items()},
               "items_per_s": {k: round(len(test) / v, 2) for k, v in best.items()},
               "speedup": round(best["lm_eval"] / best["llmctl"], 2),
               "acc": {k: round(v, 4) for k, v in acc.items()}}
        report["results"].append(row)
        if not args.json:
            print(f"{shots}-shot: lm-eval {row['items_per_s']['lm_eval']} items/s, llmctl "
                  f"{row['items_per_s']['llmctl']} items/s ({row['speedup']}x); acc "
                  f"{row['acc']['lm_eval']} vs {row['acc']['llmctl']}", flush=True)
    if args.json:
        print(json.dumps(report, indent=2))
    same = all(r["acc"]["lm_eval"] == r["acc"]["llmctl"] for r in report["results"])
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
