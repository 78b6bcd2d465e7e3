"""Item-by-item agreement of `llmctl eval` with lm-evaluation-harness.

Runs lm-eval's `hf` model (lm-eval installed as a dev dependency) and llmctl's
eval runner on the same local model and the same local data, through lm-eval task
files that are its own gsm8k / mmlu / mbpp task configurations with `dataset_path:
json` pointing at the project's fixtures, then compares every item:

- gsm8k: prompt, generation, the strict-match and flexible-extract answers and scores;
- mmlu: prompt, the four loglikelihoods (within --atol) and accuracy, zero-shot
  (lm-eval's default) and 5-shot (the first five dev items of the subject);
- mbpp: prompt and generation (lm-eval's own scorer loads a hub module, so pass@1
  is checked against hand-verified programs in tests/evalsuite/test_sandbox.py).

Usage: python bench/eval_agreement.py [--model DIR] [--batch-size 4] [--json]
(builds the tiny test model when --model is not given). Exit status 0 when every
item agrees. Offline: it sets HF_HUB_OFFLINE / HF_DATASETS_OFFLINE itself.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT / "evalsuite" / "fixtures"


def lm_eval_task_dir(out: Path) -> list[str]:
    """lm-eval's own task configs, re-pointed at the fixtures. Returns task names."""
    import yaml
    from lm_eval import tasks as lm_tasks

    tasks_dir = Path(lm_tasks.__file__).parent
    names = []
    # gsm8k: lm-eval's file verbatim, except where the data comes from.
    cfg = yaml.safe_load((tasks_dir / "gsm8k" / "gsm8k.yaml").read_text())
    cfg.update(task="llmctl_gsm8k", dataset_path="json", dataset_kwargs={"data_files": {
        "train": str(FIXTURES / "gsm8k" / "train.jsonl"),
        "test": str(FIXTURES / "gsm8k" / "test.jsonl")}})
    cfg.pop("dataset_name", None)
    cfg.pop("tag", None)
    (out / "llmctl_gsm8k.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    names.append("llmctl_gsm8k")
    # mmlu: the default template, one task per subject with its description.
    template = yaml.safe_load((tasks_dir / "mmlu" / "default" / "_default_template_yaml")
                              .read_text())
    rows = {"test": _jsonl(FIXTURES / "mmlu" / "test.jsonl"),
            "dev": _jsonl(FIXTURES / "mmlu" / "dev.jsonl")}
    for subject in sorted({r["subject"] for r in rows["test"]}):
        files = {}
        for split, docs in rows.items():
            path = out / f"mmlu_{subject}_{split}.jsonl"
            path.write_text("".join(json.dumps(d) + "\n" for d in docs
                                    if d["subject"] == subject))
            files[split] = str(path)
        subject_cfg = yaml.safe_load((tasks_dir / "mmlu" / "default" / f"mmlu_{subject}.yaml")
                                     .read_text())
        task = {**template, "task": f"llmctl_mmlu_{subject}", "dataset_path": "json",
                "dataset_kwargs": {"data_files": files},
                "description": subject_cfg["description"]}
        (out / f"llmctl_mmlu_{subject}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
        names.append(f"llmctl_mmlu_{subject}")
    # mbpp: its prompt, target and few-shot exemplars (taken from lm-eval's utils.py
    # source, which cannot be imported offline: it loads a hub metric at import).
    text = (tasks_dir / "mbpp" / "mbpp.yaml").read_text()
    text = text.replace("!function utils.pass_at_1", "bypass")
    text = text.replace("!function utils.list_fewshot_samples",
                        "!function llmctl_mbpp_utils.list_fewshot_samples")
    cfg = yaml.safe_load(text.replace("!function llmctl_mbpp_utils.list_fewshot_samples",
                                      "PLACEHOLDER"))
    cfg.update(task="llmctl_mbpp", dataset_path="json",
               dataset_kwargs={"data_files": {"test": str(FIXTURES / "mbpp" / "test.jsonl")}})
    cfg.pop("dataset_name", None)
    cfg.pop("unsafe_code", None)
    cfg["metric_list"] = [{"metric": "bypass", "aggregation": "bypass",
                           "higher_is_better": True}]
    dumped = yaml.safe_dump(cfg, sort_keys=False).replace(
        "PLACEHOLDER", "!function llmctl_mbpp_utils.list_fewshot_samples")
    (out / "llmctl_mbpp.yaml").write_text(dumped)
    source = (tasks_dir / "mbpp" / "utils.py").read_text()
    tree = ast.parse(source)
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef)
              and n.name == "list_fewshot_samples")
    (out / "llmctl_mbpp_utils.py").write_text(ast.get_source_segment(source, fn) + "\n")
    names.append("llmctl_mbpp")
    return names


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_lm_eval(model_dir: str, include: Path, names: list[str], batch_size: int,
                limit: int | None) -> dict:
    """lm-eval's samples per task; `5shot:` + name for mmlu with 5 dev examples."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model_dir, batch_size=batch_size, device="cpu")
    manager = TaskManager(include_path=str(include))
    samples = lm_eval.simple_evaluate(model=lm, tasks=names, log_samples=True, limit=limit,
                                      task_manager=manager)["samples"]
    mmlu = [n for n in names if n.startswith("llmctl_mmlu_")]
    five = lm_eval.simple_evaluate(model=lm, tasks=mmlu, num_fewshot=5, log_samples=True,
                                   limit=limit, task_manager=manager)["samples"]
    samples.update({f"5shot:{k}": v for k, v in five.items()})
    return samples


def run_llmctl(model_dir: str, batch_size: int, limit: int | None) -> dict:
    from evalsuite import data, runner
    from evalsuite.hf_model import HFModel
    from evalsuite.tasks import TaskOptions
    from server.db.engine import Database

    tmp = Path(tempfile.mkdtemp(prefix="llmctl-agree-"))
    db = Database(f"sqlite:///{tmp / 'eval.db'}")
    model = HFModel(model_dir, batch_size=batch_size, device="cpu")
    out = {}
    for key, name, shots in (("gsm8k", "gsm8k", None), ("mmlu", "mmlu", None),
                             ("mbpp", "mbpp", None), ("mmlu_5shot", "mmlu", 5)):
        prepared = runner.prepare_task(
            name, TaskOptions(allow_code_execution=True, limit=limit, num_fewshot=shots),
            data.DataOptions(data=FIXTURES / name))
        result = runner.run_eval(prepared, model, db, model_identity={"dir": model_dir},
                                 resume=False)
        out[key] = result.samples
    return out


def compare(lm: dict, ours: dict, atol: float) -> dict:
    report = {}
    # gsm8k: lm-eval logs one sample per (document, filter).
    rows = {}
    for s in lm["llmctl_gsm8k"]:
        rows.setdefault(s["doc_id"], {})[s["filter"]] = s
    problems, n = [], 0
    for sample in ours["gsm8k"]:
        n += 1
        theirs = rows[sample.index]
        first = next(iter(theirs.values()))
        if first["arguments"][0][0] != sample.prompt:
            problems.append(f"gsm8k {sample.index}: prompt differs")
        if first["resps"][0][0] != sample.output:
            problems.append(f"gsm8k {sample.index}: generation differs: "
                            f"{first['resps'][0][0]!r} vs {sample.output!r}")
        for flt in ("strict-match", "flexible-extract"):
            t = theirs[flt]
            if t["filtered_resps"][0] != sample.extracted[flt]:
                problems.append(f"gsm8k {sample.index} {flt}: answer {t['filtered_resps'][0]!r}"
                                f" vs {sample.extracted[flt]!r}")
            if float(t["exact_match"]) != sample.scores[f"exact_match,{flt}"]:
                problems.append(f"gsm8k {sample.index} {flt}: score differs")
    report["gsm8k"] = {"items": n, "problems": problems}
    for key, prefix in (("mmlu", ""), ("mmlu_5shot", "5shot:")):
        report[key] = _compare_mmlu(lm, ours[key], prefix, atol)
    # mbpp: prompts and generations.
    problems, n = [], 0
    rows = {s["doc_id"]: s for s in lm["llmctl_mbpp"]}
    for sample in ours["mbpp"]:
        n += 1
        theirs = rows[sample.index]
        if theirs["arguments"][0][0] != sample.prompt:
            problems.append(f"mbpp {sample.index}: prompt differs")
        if theirs["resps"][0][0] != sample.output:
            problems.append(f"mbpp {sample.index}: generation differs")
    report["mbpp"] = {"items": n, "problems": problems}
    return report


def _compare_mmlu(lm: dict, ours: list, prefix: str, atol: float) -> dict:
    """mmlu: one lm-eval task per subject; doc ids count within the subject."""
    problems, n, max_diff = [], 0, 0.0
    position: dict[str, int] = {}
    for sample in ours:
        subject = sample.extra["subject"]
        k = position.get(subject, 0)
        position[subject] = k + 1
        theirs = next(s for s in lm[f"{prefix}llmctl_mmlu_{subject}"] if s["doc_id"] == k)
        n += 1
        args = theirs["arguments"]
        if args[0][0] != sample.prompt:
            problems.append(f"{prefix}mmlu {subject}/{k}: prompt differs")
        conts = [a[1] for a in args]
        if conts != [" A", " B", " C", " D"]:
            problems.append(f"{prefix}mmlu {subject}/{k}: continuations {conts}")
        lls = [float(r[0][0]) for r in theirs["resps"]]
        diff = max(abs(a - b) for a, b in zip(lls, sample.extra["loglikelihoods"], strict=True))
        max_diff = max(max_diff, diff)
        if diff > atol:
            problems.append(f"{prefix}mmlu {subject}/{k}: loglikelihoods differ by {diff:.2e}")
        if float(theirs["acc"]) != sample.scores["acc"]:
            problems.append(f"{prefix}mmlu {subject}/{k}: acc {theirs['acc']} vs "
                            f"{sample.scores['acc']}")
    return {"items": n, "problems": problems, "max_abs_ll_diff": max_diff}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: build the tiny test model)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--limit", type=int, help="first N items per task (mmlu: per "
                        "subject), for both harnesses")
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--lm-cache", help="reuse lm-eval's samples from this pickle "
                        "(written when missing); for iterating on llmctl only")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="llmctl-agreement-"))
    model_dir = args.model
    if not model_dir:
        from server.testmodel import create_test_model

        model_dir = str(create_test_model(work / "tiny", "tiny"))
    include = work / "tasks"
    include.mkdir()
    names = lm_eval_task_dir(include)
    t0 = time.monotonic()
    if args.lm_cache and Path(args.lm_cache).exists():
        lm = pickle.loads(Path(args.lm_cache).read_bytes())
    else:
        lm = run_lm_eval(model_dir, include, names, args.batch_size, args.limit)
        if args.lm_cache:
            Path(args.lm_cache).write_bytes(pickle.dumps(lm))
    t1 = time.monotonic()
    ours = run_llmctl(model_dir, args.batch_size, args.limit)
    t2 = time.monotonic()
    report = compare(lm, ours, args.atol)
    report["seconds"] = {"lm_eval": round(t1 - t0, 1), "llmctl": round(t2 - t1, 1)}
    report["batch_size"] = args.batch_size
    report["limit"] = args.limit
    ok = all(not v["problems"] for k, v in report.items() if isinstance(v, dict)
             and "problems" in v)
    report["agree"] = ok
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for task in ("gsm8k", "mmlu", "mmlu_5shot", "mbpp"):
            r = report[task]
            extra = (f", max |Δ loglikelihood| {r['max_abs_ll_diff']:.2e}"
                     if "max_abs_ll_diff" in r else "")
            print(f"{task}: {r['items']} items, {len(r['problems'])} disagreements{extra}")
            for p in r["problems"][:10]:
                print("  " + p)
        print(f"lm-eval {report['seconds']['lm_eval']} s, llmctl {report['seconds']['llmctl']} s;"
              f" agree: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
