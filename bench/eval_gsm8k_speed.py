"""GSM8K items per second: `llmctl eval gsm8k` vs `lm_eval --model hf`, same model,
same items, same run; with the MMLU 5-shot figure beside it.

Both evaluate one model (by default the ~35M-parameter `small` test model, built
here) on the same GSM8K-format items (generated deterministically from the
project's fixtures: the fixtures' questions with varied preambles, the fixtures'
train split as the 5-shot pool), in one process, with the same torch threads:

- lm-eval 0.4.x: `simple_evaluate` with an `HFLM` instance on a task file that is
  lm-eval's own gsm8k.yaml pointed at the items (`--batch-size-lm-eval`, default 8;
  lm-eval's own default is 1);
- llmctl: `prepare_task` + `run_eval` as `llmctl eval gsm8k` runs them (database
  writes included), generation through the continuous-batching scheduler
  (`--batch-size`, default 8, rows decoded together).

A random test model rarely emits a stop string, so every answer would run to the
256-token cap and no batching could skip work. Real models answer at varied lengths;
`--eos-rate` (default 0.02) gives the test model that property: the EOS token's row
of the output layer is scaled so that greedy decoding picks EOS at about that share
of steps (answer lengths then spread from a few tokens to the cap). Both harnesses
run this same model. Rounds alternate (lm-eval, llmctl, llmctl, lm-eval, ...), the
figures are medians. Both extracted answers of every item must be identical; the
exit status is 0 only then (and 1 if --min-speedup is not reached). Whole
generations are compared too and counted: static and continuous batches pad
differently, so float noise can flip a near-tie late in a 256-token gibberish
answer of the random model.

Usage: python bench/eval_gsm8k_speed.py [--items 64] [--rounds 3] [--batch-size 8]
       [--mmlu-items-per-subject 25] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
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
FIXTURES = ROOT / "evalsuite" / "fixtures" / "gsm8k"

PREAMBLES = ("", "A short one. ", "Read carefully, then solve the problem step by step. ",
             "This question comes from a grade-school worksheet about arithmetic. ",
             "Show your work. The answer is a whole number. ")


def make_items(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    base = [json.loads(x) for x in (FIXTURES / "test.jsonl").read_text().splitlines()]
    return [{"question": rng.choice(PREAMBLES) + base[i % len(base)]["question"],
             "answer": base[i % len(base)]["answer"]} for i in range(n)]


def write_task(work: Path, items: list[dict]) -> tuple[Path, Path]:
    import yaml
    from lm_eval import tasks as lm_tasks

    data = work / "gsm8k"
    data.mkdir()
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    (data / "train.jsonl").write_text((FIXTURES / "train.jsonl").read_text())
    include = work / "tasks"
    include.mkdir()
    cfg = yaml.safe_load((Path(lm_tasks.__file__).parent / "gsm8k" / "gsm8k.yaml").read_text())
    cfg.update(task="speed_gsm8k", dataset_path="json", dataset_kwargs={"data_files": {
        "train": str(data / "train.jsonl"), "test": str(data / "test.jsonl")}})
    cfg.pop("dataset_name", None)
    cfg.pop("tag", None)
    (include / "speed_gsm8k.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return data, include


def tune_eos(model_dir: str, rate: float, items: list[dict]) -> float:
    """Scale the EOS row of the output layer until greedy decoding picks EOS at about
    `rate` of the steps on these prompts; save the model. Returns the scale."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    eos = tok.eos_token_id
    prompts = [tok(f"Question: {d['question']}\nAnswer:", return_tensors="pt")["input_ids"]
               for d in items[:8]]
    with torch.inference_mode():
        # hidden states along greedy continuations (no EOS), once
        states = []
        for ids in prompts:
            out = model.generate(ids, max_new_tokens=64, do_sample=False,
                                 output_hidden_states=True, return_dict_in_generate=True,
                                 suppress_tokens=[eos])
            states += [h[-1][0, -1] for h in out.hidden_states[1:]]
        hidden = torch.stack(states)
        weight = model.lm_head.weight
        logits = hidden @ weight.T
        others = logits.clone()
        others[:, eos] = float("-inf")
        best = others.max(-1).values
        eos_logit = logits[:, eos]
        lo, hi = 0.0, 1000.0
        for _ in range(60):  # bisect the scale on the share of steps EOS would win
            mid = (lo + hi) / 2
            share = float((eos_logit * mid > best).float().mean())
            lo, hi = (lo, mid) if share > rate else (mid, hi)
        weight[eos] *= hi
    model.save_pretrained(model_dir)
    return hi


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
        row = answers.setdefault(s["doc_id"], {"output": s["resps"][0][0]})
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
    parser.add_argument("--model", help="model directory (default: build the small test "
                        "model; --eos-rate then modifies it)")
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="llmctl")
    parser.add_argument("--batch-size-lm-eval", type=int, default=8)
    parser.add_argument("--eos-rate", type=float, default=0.02)
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
    items = make_items(args.items)
    model_dir, scale = args.model, None
    if not model_dir:
        from server.testmodel import create_test_model

        model_dir = str(create_test_model(work / "small", "small"))
        if args.eos_rate:
            scale = tune_eos(model_dir, args.eos_rate, items)
    data, include = write_task(work, items)
    lm = HFLM(pretrained=model_dir, batch_size=args.batch_size_lm_eval, device="cpu")
    ours = HFModel(model_dir, batch_size=args.batch_size, device="cpu")
    db = Database(f"sqlite:///{work / 'eval.db'}")
    seconds: dict[str, list[float]] = {"lm_eval": [], "llmctl": []}
    problems: list[str] = []
    lengths: list[int] = []
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
    ours.close()
    med = {k: statistics.median(v) for k, v in seconds.items()}
    report = {
        "commit": _commit(), "machine": _machine(torch), "model": model_dir,
        "eos_scale": scale, "items": len(items), "rounds": args.rounds,
        "batch_size": {"llmctl": args.batch_size, "lm_eval": args.batch_size_lm_eval},
        "torch_threads": torch.get_num_threads(),
        "answer_tokens": {"min": min(lengths), "median": statistics.median(lengths),
                          "max": max(lengths)},
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
