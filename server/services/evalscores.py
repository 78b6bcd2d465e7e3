"""The latest stored eval score per (task, model, metric), for the gateway's /metrics.

`llmctl eval` stores its runs in the same database the gateway uses (eval_runs), so
the dashboard can show a model's quality next to its latency. One grouped query per
scrape, on the task index; nothing is kept in memory between scrapes.
"""

from __future__ import annotations

from datetime import UTC

from sqlalchemy import func, select

from server.db.tables import EvalRun


def latest_scores(db) -> list[dict]:
    """The newest finished run per (task, model): its metric values and finish time."""
    with db.session() as s:
        newest = (select(EvalRun.task, EvalRun.model,
                         func.max(EvalRun.finished_at).label("at"))
                  .where(EvalRun.status == "finished").group_by(EvalRun.task, EvalRun.model)
                  .subquery())
        rows = s.execute(select(EvalRun.task, EvalRun.model, EvalRun.metrics,
                                EvalRun.finished_at)
                         .join(newest, (EvalRun.task == newest.c.task)
                               & (EvalRun.model == newest.c.model)
                               & (EvalRun.finished_at == newest.c.at))).all()
    out = []
    for task, model, metrics, finished_at in rows:
        values = {name: m.get("value") for name, m in
                  ((metrics or {}).get("metrics") or {}).items()
                  if isinstance(m, dict) and isinstance(m.get("value"), int | float)}
        out.append({"task": task, "model": model, "metrics": values,
                    "timestamp": finished_at.replace(tzinfo=UTC).timestamp()})
    return out
