"""Run one task on one model: data → items → batched model calls → scores → metrics.

`prepare_task` checks the options and loads the data before any model is loaded,
so bad input fails fast. `run_eval` resumes the unfinished run with the same
fingerprint from the database, sends the remaining items' requests to the model
in batches, scores and saves each batch as it finishes (progress is reported per
item), and aggregates all samples into the metrics stored with the run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from evalsuite import data as data_mod
from evalsuite import store
from evalsuite.models import EvalModel, ItemError
from evalsuite.tasks import Task, TaskOptions, get_task
from evalsuite.tasks.base import Item, Sample
from evalsuite.tasks.mmlu import MMLU

Progress = Callable[[int], None]  # called with the number of items just finished


@dataclass
class Prepared:
    task: Task
    dataset: data_mod.DataSet
    docs: list[dict]


@dataclass
class RunResult:
    run_id: str
    task: str
    model: dict
    config: dict
    metrics: dict  # {"metrics": {...}, "breakdown": {...}?}
    n_items: int
    samples: list[Sample]
    resumed: int = 0  # items taken from the interrupted run
    notes: list[str] = field(default_factory=list)
    status: str = "finished"
    fingerprint: str = ""  # what identifies "the same eval" (resuming, baselines)

    def to_dict(self, with_samples: bool = False) -> dict:
        out = {"run_id": self.run_id, "task": self.task, "status": self.status,
               "model": self.model, "config": self.config, "n_items": self.n_items,
               **self.metrics}
        if self.notes:
            out["notes"] = self.notes
        if with_samples:
            out["samples"] = [s.to_dict() for s in self.samples]
        return out


def prepare_task(name: str, options: TaskOptions, data_opts: data_mod.DataOptions) -> Prepared:
    task = get_task(name, options)
    task.check()
    dataset = data_mod.load(task, data_opts)
    if isinstance(task, MMLU):
        docs = task.select(dataset.docs)
    else:
        docs = dataset.docs[: options.limit] if options.limit is not None else dataset.docs
    task.prepare()  # e.g. the toxicity classifier: fail before the model loads
    return Prepared(task, dataset, docs)


def choose_mmlu_variant(task: Task, model: EvalModel) -> list[str]:
    """MMLU on a chat-only model: the generative variant, said out loud."""
    notes = []
    if isinstance(task, MMLU) and not task.generative:
        if model.chat_only:
            task.set_generative(True)
            notes.append(f"{model.name} only offers chat completions: using the generative "
                         "MMLU variant (lm-eval mmlu_generative: answer letter by greedy "
                         "generation, exact match) instead of loglikelihoods")
        else:
            model.check_loglikelihood()
    return notes


def fingerprint(task: Task, model_identity: dict, dataset: data_mod.DataSet) -> str:
    blob = json.dumps({"task": task.name, "model": model_identity, "data": dataset.fingerprint,
                       "options": task.options.fingerprint_fields(), "config": task.config()},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_config(task: Task, dataset: data_mod.DataSet, model: EvalModel,
               notes: list[str] | None) -> dict:
    """What a stored run records: the values in effect (num_fewshot, max_gen_toks),
    not the options as given (None for "the task's default"), and both data files."""
    given = {k: v for k, v in task.options.fingerprint_fields().items()
             if k not in ("num_fewshot", "max_gen_toks")}
    return {**given, **task.config(), "data": dataset.origin,
            "fewshot_data": dataset.fewshot_origin, "model": model.describe(),
            "notes": notes or []}


def run_eval(prepared: Prepared, model: EvalModel, db, *, model_identity: dict,
             resume: bool = True, notes: list[str] | None = None,
             progress: Progress | None = None,
             on_start: Callable[[str, int, int], None] | None = None,
             suite_run_id: str | None = None) -> RunResult:
    task, dataset = prepared.task, prepared.dataset
    task.prepare()
    items = task.build_items(prepared.docs, dataset.fewshot)
    config = run_config(task, dataset, model, notes)
    fp = fingerprint(task, model_identity, dataset)
    run, done = store.open_run(db, task=task.name, model=model.name, fingerprint=fp,
                               config=config, n_items=len(items), resume=resume,
                               suite_run_id=suite_run_id)
    if on_start:
        on_start(run.id, len(items), len(done))
    try:
        new = _evaluate(task, model, [it for it in items if it.index not in done],
                        lambda batch: store.save_samples(db, run.id, batch), progress)
    except BaseException:
        store.set_status(db, run.id, "interrupted")
        raise
    samples = sorted([*done.values(), *new], key=lambda s: s.index)
    failed = sum(1 for s in samples if s.extra.get("error"))
    if failed:
        config["notes"] = [*config["notes"], f"{failed} item(s) refused by the server: "
                           "scored as empty answers, the message is in each sample's extra"]
    metrics = task.aggregate(samples)
    store.finish_run(db, run.id, metrics, config)
    return RunResult(run.id, task.name, model.describe(), config, metrics, len(items),
                     samples, resumed=len(done), notes=config["notes"], fingerprint=fp)


def _evaluate(task: Task, model: EvalModel, items: list[Item],
              save: Callable[[list[Sample]], None], progress: Progress | None) -> list[Sample]:
    """Send every request of `items`, score each item once all its answers are in."""
    if not items:
        return []
    flat = [(n, r) for n, item in enumerate(items) for r in range(len(item.requests))]
    requests = [items[n].requests[r] for n, r in flat]
    answers: list[list] = [[None] * len(item.requests) for item in items]
    missing = [len(item.requests) for item in items]
    call = model.loglikelihood if requests[0].kind == "loglikelihood" else model.generate
    samples: list[Sample] = []
    for batch in call(requests):
        complete = []
        for k, result in batch:
            n, r = flat[k]
            answers[n][r] = result
            missing[n] -= 1
            if missing[n] == 0:
                complete.append(n)
        if complete:
            scored = task.score([items[n] for n in complete], [answers[n] for n in complete])
            _note_errors(scored, [answers[n] for n in complete])
            save(scored)
            samples += scored
            if progress:
                progress(len(scored))
    return samples


def _note_errors(samples: list[Sample], answers: list[list]) -> None:
    """Keep the server's message with an item whose request was refused (scored empty)."""
    for sample, results in zip(samples, answers, strict=True):
        errors = [r.message for r in results if isinstance(r, ItemError)]
        if errors:
            sample.extra["error"] = errors[0]
