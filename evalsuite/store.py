"""Eval runs and their per-item samples in the database (tables EvalRun, EvalSample).

A run is identified for resuming by its fingerprint (task, model, data, options):
starting an eval whose fingerprint matches an unfinished run continues that run,
skipping the items it already scored. Samples are written as batches finish, so
an interrupted run loses at most the batch in flight.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from sqlalchemy import delete, func, select

from evalsuite.tasks.base import Sample
from server.db.tables import EvalRun, EvalSample, EvalSuiteRun, utcnow
from server.errors import InvalidRequest, NotFound

UNFINISHED = ("running", "interrupted", "failed")


@dataclass
class RunRecord:
    id: str
    task: str
    model: str
    fingerprint: str
    config: dict
    status: str
    n_items: int
    metrics: dict | None
    created_at: object
    finished_at: object
    n_samples: int = 0
    suite_run_id: str | None = None

    def to_dict(self) -> dict:
        return {"run_id": self.id, "task": self.task, "model": self.model,
                "status": self.status, "n_items": self.n_items, "n_samples": self.n_samples,
                "created_at": self.created_at, "finished_at": self.finished_at,
                "suite_run_id": self.suite_run_id, "config": self.config,
                "metrics": self.metrics}


def _record(run: EvalRun, n_samples: int = 0) -> RunRecord:
    return RunRecord(run.id, run.task, run.model, run.fingerprint, run.config or {},
                     run.status, run.n_items, run.metrics, run.created_at, run.finished_at,
                     n_samples, run.suite_run_id)


def _to_row(run_id: str, s: Sample) -> EvalSample:
    extracted = json.dumps(s.extracted) if isinstance(s.extracted, dict) else s.extracted
    return EvalSample(run_id=run_id, item_index=s.index, doc_id=s.doc_id, prompt=s.prompt,
                      output=s.output, extracted=extracted, target=s.target,
                      scores=s.scores, extra=s.extra or None)


def _from_row(row: EvalSample) -> Sample:
    extracted = row.extracted
    if isinstance(extracted, str) and extracted.startswith("{"):
        try:
            extracted = json.loads(extracted)
        except ValueError:
            pass
    return Sample(row.item_index, row.doc_id, row.prompt, row.output, extracted, row.target,
                  dict(row.scores or {}), dict(row.extra or {}))


def open_run(db, *, task: str, model: str, fingerprint: str, config: dict, n_items: int,
             resume: bool = True, suite_run_id: str | None = None
             ) -> tuple[RunRecord, dict[int, Sample]]:
    """The unfinished run with this fingerprint (and its samples), or a new run."""
    with db.session() as s:
        if resume:
            run = s.scalars(select(EvalRun).where(EvalRun.fingerprint == fingerprint,
                                                  EvalRun.status.in_(UNFINISHED))
                            .order_by(EvalRun.created_at.desc()).limit(1)).first()
            if run is not None:
                rows = s.scalars(select(EvalSample).where(EvalSample.run_id == run.id)).all()
                run.status = "running"
                run.n_items = n_items
                run.suite_run_id = suite_run_id or run.suite_run_id
                return _record(run, len(rows)), {r.item_index: _from_row(r) for r in rows}
        run = EvalRun(id=uuid.uuid4().hex[:12], task=task, model=model,
                      fingerprint=fingerprint, config=config, status="running",
                      n_items=n_items, suite_run_id=suite_run_id)
        s.add(run)
        s.flush()
        return _record(run), {}


def save_samples(db, run_id: str, samples: list[Sample]) -> None:
    if not samples:
        return
    with db.session() as s:
        existing = set(s.scalars(select(EvalSample.item_index).where(
            EvalSample.run_id == run_id,
            EvalSample.item_index.in_([x.index for x in samples]))).all())
        s.add_all(_to_row(run_id, x) for x in samples if x.index not in existing)


def finish_run(db, run_id: str, metrics: dict, config: dict) -> None:
    with db.session() as s:
        run = s.get(EvalRun, run_id)
        run.metrics = metrics
        run.config = config
        run.status = "finished"
        run.finished_at = utcnow()


def set_status(db, run_id: str, status: str) -> None:
    with db.session() as s:
        run = s.get(EvalRun, run_id)
        if run is not None:
            run.status = status


def list_runs(db, *, task: str | None = None, limit: int = 20,
              suite_run_id: str | None = None) -> list[RunRecord]:
    with db.session() as s:
        counts = (select(EvalSample.run_id, func.count().label("n"))
                  .group_by(EvalSample.run_id).subquery())
        q = (select(EvalRun, func.coalesce(counts.c.n, 0))
             .outerjoin(counts, counts.c.run_id == EvalRun.id)
             .order_by(EvalRun.created_at.desc()).limit(limit))
        if task:
            q = q.where(EvalRun.task == task)
        if suite_run_id:
            q = q.where(EvalRun.suite_run_id == suite_run_id)
        return [_record(run, n) for run, n in s.execute(q).all()]


def get_run(db, ref: str) -> tuple[RunRecord, list[Sample]]:
    """A run by id or unique id prefix, with its samples in item order."""
    with db.session() as s:
        runs = s.scalars(select(EvalRun).where(EvalRun.id.startswith(ref, autoescape=True))
                         .limit(2)).all()
        if not runs:
            raise NotFound(f"no eval run {ref!r} (see `llmctl eval runs`)", param="run")
        if len(runs) > 1 and runs[0].id != ref:
            raise InvalidRequest(f"run prefix {ref!r} is ambiguous; give more characters",
                                 param="run")
        run = runs[0]
        rows = s.scalars(select(EvalSample).where(EvalSample.run_id == run.id)
                         .order_by(EvalSample.item_index)).all()
        return _record(run, len(rows)), [_from_row(r) for r in rows]


def delete_run(db, run_id: str) -> None:
    with db.session() as s:
        s.execute(delete(EvalSample).where(EvalSample.run_id == run_id))
        s.execute(delete(EvalRun).where(EvalRun.id == run_id))


def last_finished(db, *, fingerprint: str, before: str | None = None) -> RunRecord | None:
    """The newest finished run with this fingerprint (a baseline), other than `before`."""
    with db.session() as s:
        q = (select(EvalRun).where(EvalRun.fingerprint == fingerprint,
                                   EvalRun.status == "finished")
             .order_by(EvalRun.finished_at.desc()))
        if before:
            q = q.where(EvalRun.id != before)
        run = s.scalars(q.limit(1)).first()
        return _record(run) if run is not None else None


# --- suite runs ----------------------------------------------------------------------

@dataclass
class SuiteRecord:
    id: str
    name: str
    fingerprint: str
    config: dict
    status: str
    results: dict | None
    created_at: object
    finished_at: object

    def to_dict(self) -> dict:
        return {"suite_run_id": self.id, "name": self.name, "status": self.status,
                "created_at": self.created_at, "finished_at": self.finished_at,
                "config": self.config, "results": self.results}


def _suite(row: EvalSuiteRun) -> SuiteRecord:
    return SuiteRecord(row.id, row.name, row.fingerprint, row.config or {}, row.status,
                       row.results, row.created_at, row.finished_at)


def open_suite_run(db, *, name: str, fingerprint: str, config: dict,
                   resume: bool) -> tuple[SuiteRecord, bool]:
    """(the suite run, whether it is an interrupted one resumed)."""
    with db.session() as s:
        if resume:
            row = s.scalars(select(EvalSuiteRun).where(
                EvalSuiteRun.fingerprint == fingerprint, EvalSuiteRun.status.in_(UNFINISHED))
                .order_by(EvalSuiteRun.created_at.desc()).limit(1)).first()
            if row is not None:
                row.status = "running"
                return _suite(row), True
        row = EvalSuiteRun(id=uuid.uuid4().hex[:12], name=name, fingerprint=fingerprint,
                           config=config, status="running")
        s.add(row)
        s.flush()
        return _suite(row), False


def finish_suite_run(db, suite_id: str, status: str, results: dict | None) -> None:
    with db.session() as s:
        row = s.get(EvalSuiteRun, suite_id)
        row.status = status
        row.results = results
        if status == "finished":
            row.finished_at = utcnow()


def last_suite_run(db, *, name: str, before: str) -> SuiteRecord | None:
    """The newest finished run of the suite called `name`, other than `before`."""
    with db.session() as s:
        row = s.scalars(select(EvalSuiteRun).where(
            EvalSuiteRun.name == name, EvalSuiteRun.status == "finished",
            EvalSuiteRun.id != before).order_by(EvalSuiteRun.finished_at.desc())
            .limit(1)).first()
        return _suite(row) if row is not None else None


def list_suite_runs(db, *, name: str | None = None, limit: int = 20) -> list[SuiteRecord]:
    with db.session() as s:
        q = select(EvalSuiteRun).order_by(EvalSuiteRun.created_at.desc()).limit(limit)
        if name:
            q = q.where(EvalSuiteRun.name == name)
        return [_suite(r) for r in s.scalars(q).all()]


def get_suite_run(db, ref: str) -> SuiteRecord | None:
    """A suite run by id or unique prefix; None when there is none."""
    with db.session() as s:
        rows = s.scalars(select(EvalSuiteRun).where(
            EvalSuiteRun.id.startswith(ref, autoescape=True)).limit(2)).all()
        if len(rows) > 1 and rows[0].id != ref:
            raise InvalidRequest(f"suite run prefix {ref!r} is ambiguous; give more "
                                 "characters", param="run")
        return _suite(rows[0]) if rows else None
