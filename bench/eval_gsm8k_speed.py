"""GSM8K items per second: `llmctl eval gsm8k` vs `lm_eval --model hf`, same model,
same items, same run; with the MMLU 5-shot figure beside it.

Both evaluate one model on the same GSM8K-format items in one process, with the same
torch threads:

- lm-eval 0.4.x: `simple_evaluate` with an `HFLM` instance on a task file that is
  lm-eval's own gsm8k.yaml pointed at the items (`--batch-size-lm-eval`, default 8;
  lm-eval's own default is 1);
- llmctl: `prepare_task` + `run_eval` as `llmctl eval gsm8k` runs them (database
  writes included), generation through the continuous-batching scheduler
  (`--batch-size`, default 8 as in `llmctl eval`, rows decoded together).

The items are synthetic GSM8K-format problems at GSM8K's lengths
(bench/gsm8k_items.py: 5-shot prompts of ~1,000 tokens), the few-shot pool a second
such split. The model, by default, is a stand-in for a real one
(bench/gsm8k_model.py): the ~35M-parameter `small` test model trained for a few
minutes (cached) so that its answers vary in length (a few dozen tokens to the
256-token cap) and end in the next `Question:`, where lm-eval's stop string cuts
them. `--untrained` runs the random `small` model instead: it never writes the stop
string, every answer runs to the cap, no static batch waits for a long row while the
others are done, and the figure is the floor that per-step cost alone gives.

Rounds alternate (lm-eval, llmctl, llmctl, lm-eval, ...), the figures are medians.
Both extracted answers of every item must be identical; the exit status is 0 only
then (and 1 if --min-speedup is not reached). Whole generations are compared and
counted too: static and continuous batches pad differently, so float noise could flip
a near-tie between two tokens.

Usage: python bench/eval_gsm8k_speed.py [--items 64] [--rounds 3] [--batch-size 8]
       [--untrained] [--mmlu-items-per-subject 25] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import gsm8k_items  # noqa: E402
import gsm8k_model  # noqa: E402


def make_items(n: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The test items and the few-shot pool: synthetic GSM8K problems of one to eight
    steps (bench/gsm8k_items.py)."""
    return (gsm8k_items.make_split(n, 1000 + seed),
            gsm8k_items.make_split(50, 2000 + seed))


def write_task(work: Path, items: list[dict], pool: list[dict]) -> tuple[Path, Path]:
    import yaml
    from lm_eval import tasks as lm_tasks

    data = work / "gsm8k"
    data.mkdir()
    gsm8k_items.write_split(data / "test.jsonl", items)
    gsm8k_items.write_split(data / "train.jsonl", pool)
    include = work / "tasks"
    include.mkdir()
    cfg = yaml.safe_load((Path(lm_tasks.__file__).parent / "gsm8k" / "gsm8k.yaml").read_text())
    cfg.update(task="speed_gsm8k", dataset_path="json", dataset_kwargs={"data_files": {
        "train": str(data / "train.jsonl"), "test": str(data / "test.jsonl")}})
    cfg.pop("dataset_name", None)
    cfg.pop("tag", None)
    (include / "speed_gsm8k.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return data, include


def time_lm_eval(lm, include: Path, limit: int | None = None) -> tuple[float, dict]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include))
    start = time.perf_counter()
    res = lm_eval.simple_evaluate(model=lm, tasks=["speed_gsm8k"], task_manager=manager,
                                  log_samples=True, limit=limit)
    seconds = time.perf_counter() - start
    answers: dict[int, dict] = {}
    for s in res["samples"]["speed_gsm8k"]:
        row = answers.setdefault(s["doc_id"], {"output": s["resps"][0][0],
                                               "context": s["arguments"][0][0]})
        row[s["filter"]] = s["filtered_resps"][0]
    return seconds, answers


def time_llmctl(model, data: Path, db) -> tuple[float, dict]:
    from evalsuite import data as data_mod
    from evalsuite import runner
    from evalsuite.tasks import TaskOptions

    start = time.perf_counter()
    prepared = runner.prepare_task("gsm8k", TaskOptions(), data_mod.DataOptions(data=data))
    result = runner.run_eval(prepared, model, db, model_identity=model.identity(),
                             resume=False)
    seconds = time.perf_counter() - start
    return seconds, {s.index: {"output": s.output, **s.extracted} for s in result.samples}


FILTERS = ("strict-match", "flexible-extract")


def differences(theirs: dict, ours: dict) -> list[str]:
    """Items whose extracted answers (both gsm8k filters) differ."""
    out = []
    for i in sorted(set(theirs) | set(ours)):
        a = {f: theirs.get(i, {}).get(f) for f in FILTERS}
        b = {f: ours.get(i, {}).get(f) for f in FILTERS}
        if a != b:
            out.append(f"item {i}: lm-eval {a} vs llmctl {b}")
    return out


def same_outputs(theirs: dict, ours: dict) -> int:
    return sum(1 for i in ours if theirs.get(i, {}).get("output") == ours[i]["output"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: the stand-in model, "
                        "bench/gsm8k_model.py)")
    parser.add_argument("--untrained", action="store_true",
                        help="the random small test model instead of the stand-in")
    parser.add_argument("--model-cache", default=str(Path.home() / ".cache" / "llmctl-bench"),
                        help="where the stand-in model is kept between runs")
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="llmctl")
    parser.add_argument("--batch-size-lm-eval", type=int, default=8)
    parser.add_argument("--mmlu-items-per-subject", type=int, default=25,
                        help="0 skips the MMLU 5-shot figure")
    parser.add_argument("--min-speedup", type=float, default=0.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM

    from evalsuite.hf_model import HFModel
    from server.db.engine import Database

    transformers.utils.logging.set_verbosity_error()
    work = Path(tempfile.mkdtemp(prefix="llmctl-gsm8k-speed-"))
    items, pool = make_items(args.items)
    model_dir = args.model
    if not model_dir and args.untrained:
        from server.testmodel import create_test_model

        model_dir = str(create_test_model(work / "small", "small"))
    elif not model_dir:
        model_dir = str(gsm8k_model.build(Path(args.model_cache),
                                          log=(lambda line: None) if args.json else print))
    data, include = write_task(work, items, pool)
    lm = HFLM(pretrained=model_dir, batch_size=args.batch_size_lm_eval, device="cpu")
    ours = HFModel(model_dir, batch_size=args.batch_size, device="cpu")
    db = Database(f"sqlite:///{work / 'eval.db'}")
    seconds: dict[str, list[float]] = {"lm_eval": [], "llmctl": []}
    problems: list[str] = []
    lengths: list[int] = []
    prompts: list[int] = []
    generations: list[int] = []  # per round: items whose whole generation is identical
    for r in range(args.rounds):
        order = ("lm_eval", "llmctl") if r % 2 == 0 else ("llmctl", "lm_eval")
        answers = {}
        for side in order:
            if side == "lm_eval":
                s, answers[side] = time_lm_eval(lm, include)
            else:
                s, answers[side] = time_llmctl(ours, data, db)
            seconds[side].append(s)
            if not args.json:
                print(f"round {r + 1} {side}: {s:.1f} s ({len(items) / s:.2f} items/s)",
                      flush=True)
        problems += differences(answers["lm_eval"], answers["llmctl"])
        generations.append(same_outputs(answers["lm_eval"], answers["llmctl"]))
        lengths = [len(ours.tokenizer(a["output"])["input_ids"])
                   for a in answers["llmctl"].values()]
        prompts = [len(ours.tokenizer(a["context"])["input_ids"])
                   for a in answers["lm_eval"].values()]
    ours.close()
    med = {k: statistics.median(v) for k, v in seconds.items()}
    report = {
        "commit": _commit(), "machine": _machine(torch), "model": model_dir,
        "items": len(items), "rounds": args.rounds,
        "batch_size": {"llmctl": args.batch_size, "lm_eval": args.batch_size_lm_eval},
        "torch_threads": torch.get_num_threads(),
        "answer_tokens": _spread(lengths), "prompt_tokens": _spread(prompts),
        "gsm8k": {"seconds": seconds,
                  "items_per_s_median": {k: round(len(items) / v, 3) for k, v in med.items()},
                  "speedup_median": round(med["lm_eval"] / med["llmctl"], 2),
                  "identical_answers": not problems, "differences": problems[:20],
                  "identical_generations_per_round": generations},
    }
    if args.mmlu_items_per_subject:
        report["mmlu_5shot"] = _mmlu(model_dir, args, work, lm, db)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        g = report["gsm8k"]
        print(f"gsm8k: lm-eval {g['items_per_s_median']['lm_eval']} items/s, llmctl "
              f"{g['items_per_s_median']['llmctl']} items/s, {g['speedup_median']}x (median "
              f"of {args.rounds}); identical answers: {g['identical_answers']}; identical "
              f"generations per round: {generations}/{len(items)}")
        print(f"prompt tokens {report['prompt_tokens']}, answer tokens "
              f"{report['answer_tokens']}")
        for p in problems[:10]:
            print("  " + p)
        if "mmlu_5shot" in report:
            m = report["mmlu_5shot"]
            print(f"mmlu 5-shot: lm-eval {m['items_per_s_median']['lm_eval']} items/s, llmctl "
                  f"{m['items_per_s_median']['llmctl']} items/s, {m['speedup_median']}x; "
                  f"acc {m['acc']}")
    if problems:
        return 1
    return 0 if report["gsm8k"]["speedup_median"] >= args.min_speedup else 1


def _mmlu(model_dir: str, args, work: Path, lm, db) -> dict:
    """bench/eval_mmlu_speed.py's items and timing, 5-shot, the same rounds."""
    import eval_mmlu_speed as mm

    from evalsuite.hf_model import HFModel

    (work / "mmlu").mkdir()
    test, dev = mm.make_items(args.mmlu_items_per_subject)
    data, include, names = mm.write_data(work / "mmlu", test, dev)
    ours = HFModel(model_dir, batch_size=args.batch_size_lm_eval, device="cpu")
    seconds: dict[str, list[float]] = {"lm_eval": [], "llmctl": []}
    acc = {}
    for r in range(args.rounds):
        for side in (("lm_eval", "llmctl") if r % 2 == 0 else ("llmctl", "lm_eval")):
            if side == "lm_eval":
                s, acc[side] = mm.time_lm_eval(lm, include, names, 5)
            else:
                s, acc[side] = mm.time_llmctl(ours, data, 5, db)
            seconds[side].append(s)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    return {"items": len(test), "seconds": seconds,
            "items_per_s_median": {k: round(len(test) / v, 3) for k, v in med.items()},
            "speedup_median": round(med["lm_eval"] / med["llmctl"], 2),
            "acc": {k: round(v, 4) for k, v in acc.items()}}


def _spread(values: list[int]) -> dict:
    return {"min": min(values), "mean": round(statistics.mean(values)),
            "median": statistics.median(values), "max": max(values)}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def _machine(torch) -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, torch "
            f"{torch.__version__}")


if __name__ == "__main__":
    sys.exit(main())
