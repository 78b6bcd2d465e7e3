"""`llmctl eval suite FILE.yaml`: several tasks on one or more models, stored as one
suite run, with gates.

```yaml
name: nightly                  # default: the file's name
models: [tiny]                 # models.yaml names (or through a gateway: see below)
config: models.yaml            # optional; relative paths are from this file
# through: http://gateway:8000 # optional, with api_key_env: LLMCTL_API_KEY
batch_size: 8
tasks:
  - task: gsm8k
    data: data/gsm8k           # the task command's options, without dashes
    limit: 100
    num_fewshot: 5
    max_gen_tokens: 256
    gates: {"exact_match,strict-match": 0.30}   # fail under
    max_drop: {"exact_match,strict-match": 0.02} # vs the baseline (--baseline last)
```

Tasks on the same model share one loaded model. A suite run is identified by the
file's content and models (its fingerprint); `--resume` continues the newest
unfinished run with that fingerprint: finished task runs are kept, unfinished ones
resume from their stored items. One process at a time runs a given suite: a lock
file under LLMCTL_HOME makes a second one stop at once with a clear message.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from evalsuite import data as data_mod
from evalsuite import gates as gates_mod
from evalsuite import report, runner, store
from evalsuite.tasks import TASKS, TaskOptions
from server.errors import Conflict, InvalidRequest


class SuiteBusy(Conflict):
    """Another process is running this suite (cron overlap): exit 6."""

    code = "suite_running"
    exit_code = 6


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str
    data: str | None = None
    fewshot_data: str | None = None
    dataset: str | None = None
    subset: str | None = None
    split: str | None = None
    limit: int | None = Field(default=None, ge=1)
    num_fewshot: int | None = Field(default=None, ge=0)
    max_gen_tokens: int | None = Field(default=None, ge=1)
    seed: int = 1234
    subjects: list[str] | None = None
    generative: bool = False
    allow_code_execution: bool = False
    classifier: str | None = None
    toxic_label: str | None = None
    gates: dict[str, float] = Field(default_factory=dict)
    max_drop: dict[str, float] = Field(default_factory=dict)


class SuiteSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    models: list[str] = Field(default_factory=list)
    model: str | None = None
    config: str | None = None
    through: str | None = None
    api_key_env: str = "LLMCTL_API_KEY"
    tokenizer: str | None = None
    batch_size: int | None = Field(default=None, ge=1)
    tasks: list[TaskSpec] = Field(min_length=1)


@dataclass
class Suite:
    path: Path
    spec: SuiteSpec
    name: str
    models: list[str | None]
    fingerprint: str

    def resolve(self, value: str | None) -> Path | None:
        """A path in the file, relative to the file's directory."""
        if value is None:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.path.parent / p


def load(path: Path) -> Suite:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise InvalidRequest(f"suite {path}: {exc.strerror or exc}", param="suite") from None
    except yaml.YAMLError as exc:
        raise InvalidRequest(f"suite {path}: not valid YAML ({str(exc).splitlines()[0]})",
                             param="suite") from None
    try:
        spec = SuiteSpec.model_validate(raw or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise InvalidRequest(f"suite {path}: {where}: {err['msg']}", param="suite") from None
    for i, t in enumerate(spec.tasks):
        if t.task not in TASKS:
            raise InvalidRequest(f"suite {path}: tasks.{i}.task: unknown task {t.task!r} "
                                 f"(choose one of {', '.join(TASKS)})", param="suite")
        # mmlu on a chat-only model switches to its generative variant (exact_match)
        known = {*TASKS[t.task].metrics, *(("exact_match",) if t.task == "mmlu" else ())}
        for key in ("gates", "max_drop"):
            for metric in getattr(t, key):
                if metric not in known:
                    raise InvalidRequest(f"suite {path}: tasks.{i}.{key}: {t.task} has no "
                                         f"metric {metric!r} (it has "
                                         f"{', '.join(sorted(known))})", param="suite")
    models: list[str | None] = list(spec.models) or [spec.model]
    blob = json.dumps({"spec": spec.model_dump(), "models": models}, sort_keys=True)
    return Suite(path, spec, spec.name or path.stem, models,
                 hashlib.sha256(blob.encode()).hexdigest())


# --- the lock ------------------------------------------------------------------------

class SuiteLock:
    """An exclusive, non-blocking flock on LLMCTL_HOME/locks/suite-NAME.lock: released
    by the kernel when the process ends, however it ends, so a killed run never
    leaves a stale lock behind."""

    def __init__(self, home: Path, name: str):
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        self.path = Path(home) / "locks" / f"suite-{safe}.lock"
        self.name = name
        self._fd: int | None = None

    def __enter__(self) -> SuiteLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_note(fd)
            os.close(fd)
            raise SuiteBusy(f"suite {self.name!r} is already running ({holder}); not "
                            "starting a second run (lock: " f"{self.path})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, since {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC"
                 .encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _holder_note(fd: int) -> str:
    """What the lock's holder wrote of itself. It writes that just after it takes the
    lock, so an empty file means it is in between: look again for a moment."""
    for _ in range(20):
        note = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if note:
            return note
        time.sleep(0.05)
    return "another process"


# --- running -------------------------------------------------------------------------

@dataclass
class SuiteResult:
    suite_run_id: str
    name: str
    runs: list[dict] = field(default_factory=list)  # per (model, task): run summary
    gates: list[gates_mod.GateResult] = field(default_factory=list)
    resumed: bool = False

    @property
    def failed(self) -> list[gates_mod.GateResult]:
        return [g for g in self.gates if not g.passed]

    def to_dict(self) -> dict:
        return {"suite_run_id": self.suite_run_id, "name": self.name, "resumed": self.resumed,
                "runs": self.runs, "gates": [g.to_dict() for g in self.gates],
                "passed": not self.failed}

    def summary(self) -> str:
        """The summary line's start; the CLI adds the gates' count to it."""
        return f"suite {self.name} run {self.suite_run_id}: {len(self.runs)} task run(s)"


@dataclass
class Hooks:
    """How the caller opens models and shows progress (the CLI passes its own)."""

    open_model: Callable[[str | None], Any]  # model name -> EvalModel
    label: Callable[[str | None], str]  # model name -> the EvalModel's name, unloaded
    run_task: Callable[..., runner.RunResult]  # (prepared, model, **run_eval kwargs)
    say: Callable[[str], None] = lambda _line: None


def _prepare(suite: Suite, t: TaskSpec) -> runner.Prepared:
    extra: dict[str, Any] = {}
    if t.subjects:
        extra["subjects"] = t.subjects
    for key in ("generative", "classifier", "toxic_label"):
        if getattr(t, key):
            extra[key] = getattr(t, key)
    options = TaskOptions(num_fewshot=t.num_fewshot, limit=t.limit, seed=t.seed,
                          max_gen_toks=t.max_gen_tokens,
                          allow_code_execution=t.allow_code_execution, extra=extra)
    data_opts = data_mod.DataOptions(data=suite.resolve(t.data),
                                     fewshot_data=suite.resolve(t.fewshot_data),
                                     dataset=t.dataset, subset=t.subset, split=t.split)
    return runner.prepare_task(t.task, options, data_opts)


def run(suite: Suite, db, hooks: Hooks, *, resume: bool = False,
        cli_gates: list[gates_mod.Gate] = (), cli_drops: list[gates_mod.Gate] = (),
        baseline_last: bool = False, significance: float | None = None) -> SuiteResult:
    """Run every task on every model (one loaded model at a time) and check the gates."""
    prepared = [(t, _prepare(suite, t)) for t in suite.spec.tasks]  # bad input: before loading
    config = {"file": str(suite.path), "models": suite.models,
              "tasks": [t.model_dump(exclude_defaults=True) for t in suite.spec.tasks]}
    record, resumed = store.open_suite_run(db, name=suite.name, fingerprint=suite.fingerprint,
                                           config=config, resume=resume)
    result = SuiteResult(record.id, suite.name, resumed=resumed)
    baseline = (store.last_suite_run(db, name=suite.name, before=record.id)
                if baseline_last else None)
    kept = ({(r.task, r.model): r for r in store.list_runs(db, suite_run_id=record.id,
                                                            limit=10_000)
             if r.status == "finished"} if resumed else {})
    try:
        for model_name in suite.models:
            model = None
            try:
                for t, prep in prepared:
                    done = kept.get((t.task, hooks.label(model_name)))
                    if done is not None:
                        hooks.say(f"{t.task} on {model_name}: kept finished run {done.id}")
                        run_id, metrics, label = done.id, done.metrics or {}, done.model
                    else:
                        if model is None:
                            model = hooks.open_model(model_name)
                        notes = runner.choose_mmlu_variant(prep.task, model)
                        res = hooks.run_task(prep, model, resume=resume, notes=notes,
                                             suite_run_id=record.id)
                        run_id, metrics, label = res.run_id, res.metrics, model.name
                    result.runs.append({"task": t.task, "model": label, "run_id": run_id,
                                        "metrics": metrics})
                    _gate(result, db, t, label, run_id, metrics, baseline,
                          [*cli_gates], [*cli_drops], significance)
            finally:
                if model is not None:
                    model.close()
    except BaseException:
        store.finish_suite_run(db, record.id, "interrupted", None)
        raise
    store.finish_suite_run(db, record.id, "finished", result.to_dict())
    return result


def _gate(result: SuiteResult, db, t: TaskSpec, model: str, run_id: str, metrics: dict,
          baseline: store.SuiteRecord | None, cli_gates: list, cli_drops: list,
          significance: float | None) -> None:
    # Command-line gates apply to the tasks that have their metric.
    have = metrics.get("metrics") or {}
    mins = [gates_mod.Gate("min", m, v) for m, v in t.gates.items()]
    mins += [g for g in cli_gates if g.metric in have]
    cli_drops = [g for g in cli_drops if g.metric in have]
    for gate in mins:
        result.gates.append(gates_mod.check_min(gate, task=t.task, model=model, run_id=run_id,
                                                metrics=metrics))
    drops = [gates_mod.Gate("max_drop", m, v) for m, v in t.max_drop.items()] + cli_drops
    if not drops:
        return
    base_run = None
    if baseline is not None:
        base_run = next((r for r in store.list_runs(db, suite_run_id=baseline.id, limit=10_000)
                         if r.task == t.task and r.model == model and r.status == "finished"),
                        None)
    if base_run is None:
        result.gates.extend(gates_mod.no_baseline(g, task=t.task, model=model, run_id=run_id)
                            for g in drops)
        return
    comparison = report.compare(store.get_run(db, base_run.id), store.get_run(db, run_id))
    for gate in drops:
        result.gates.append(gates_mod.check_drop(gate, task=t.task, model=model,
                                                 comparison=comparison,
                                                 significance=significance))
