"""Results for people (rich tables) and for scripts (JSON), and run comparisons."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Group
from rich.table import Table

from evalsuite import paired
from evalsuite.store import RunRecord
from evalsuite.tasks.base import Sample
from llmctl.output import plain


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def metrics_table(title: str, metrics: dict) -> Table:
    table = Table(title=plain(title), header_style="bold")
    for col in ("metric", "value", "± stderr", "n"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for name, m in metrics.get("metrics", {}).items():
        table.add_row(plain(name), fmt(m["value"]), fmt(m.get("stderr")), str(m.get("n", "")))
    return table


def breakdown_tables(metrics: dict, subjects: bool = True) -> list[Table]:
    tables = []
    for kind, groups in metrics.get("breakdown", {}).items():
        if kind == "subject" and not subjects:
            continue
        table = Table(title=f"by {kind}", header_style="bold")
        for col in (kind, "value", "± stderr", "n"):
            table.add_column(col, justify="left" if col == kind else "right")
        for name, m in groups.items():
            table.add_row(plain(name), fmt(m["value"]), fmt(m.get("stderr")), str(m["n"]))
        tables.append(table)
    return tables


def results_view(result: dict) -> Group:
    model = result["model"].get("name", "?")
    title = f"{result['task']} · {model} · run {result['run_id']} · {result['n_items']} items"
    parts = [metrics_table(title, result), *breakdown_tables(result)]
    return Group(*parts)


def write_json(path: Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str, allow_nan=True) + "\n")


def run_to_results(run: RunRecord, samples: list[Sample] | None) -> dict:
    """A stored run in the same shape as the results JSON of `llmctl eval TASK`."""
    config = dict(run.config or {})
    out = {"run_id": run.id, "task": run.task, "status": run.status,
           "model": config.get("model", {"name": run.model}), "config": config,
           "n_items": run.n_items, "n_samples": run.n_samples,
           "created_at": run.created_at, "finished_at": run.finished_at,
           **(run.metrics or {"metrics": {}})}
    if config.get("notes"):
        out["notes"] = config["notes"]
    if samples is not None:
        out["samples"] = [s.to_dict() for s in samples]
    return out


def main_metric(run: RunRecord) -> str:
    return main_metric_of(run.metrics)


def main_metric_of(metrics: dict | None) -> str:
    found = (metrics or {}).get("metrics") or {}
    if not found:
        return ""
    name, m = next(iter(found.items()))
    return f"{name} {fmt(m['value'])}"


def gates_summary(results: dict | None) -> str:
    gates = (results or {}).get("gates") or []
    failed = sum(not g["passed"] for g in gates)
    return f"{len(gates) - failed} passed, {failed} failed" if gates else ""


def _runs_table(title: str, runs: list[dict]) -> Table:
    table = Table(title=plain(title), header_style="bold")
    for col in ("task", "model", "run", "metric", "value", "± stderr", "n"):
        table.add_column(col, justify="right" if col in ("value", "± stderr", "n") else "left")
    for r in runs:
        for name, m in ((r.get("metrics") or {}).get("metrics") or {}).items():
            table.add_row(*map(plain, (r["task"], r["model"], r.get("run_id", ""), name)),
                          fmt(m["value"]),
                          fmt(m.get("stderr")), str(m.get("n", "")))
    return table


def _gates_table(gates: list[dict]) -> Table:
    table = Table(title="gates", header_style="bold")
    for col in ("gate", "result", "figures"):
        table.add_column(col)
    for g in gates:
        table.add_row(plain(g["name"]),
                      "[green]pass[/green]" if g["passed"] else "[red]FAIL[/red]",
                      plain(g["message"]))
    return table


def suite_view(data: dict) -> Group:
    """`eval suite`'s result: each task run's metrics, then the gates."""
    parts = [_runs_table(f"suite {data['name']} · run {data['suite_run_id']}", data["runs"])]
    if data["gates"]:
        parts.append(_gates_table(data["gates"]))
    return Group(*parts)


def suite_record_view(data: dict) -> Group:
    """A stored suite run (`eval show SUITE_RUN`)."""
    runs = [{"task": r["task"], "model": r["model"], "run_id": r["run_id"],
             "metrics": r["metrics"]} for r in data["runs"]]
    parts = [_runs_table(f"suite {data['name']} · run {data['suite_run_id']} · "
                         f"{data['status']}", runs)]
    gates = (data.get("results") or {}).get("gates") or []
    if gates:
        parts.append(_gates_table(gates))
    return Group(*parts)


def compare(a: tuple[RunRecord, list[Sample]], b: tuple[RunRecord, list[Sample]]) -> dict:
    (ra, sa), (rb, sb) = a, b
    ma = (ra.metrics or {}).get("metrics") or {}
    mb = (rb.metrics or {}).get("metrics") or {}
    by_a = {s.index: s for s in sa}
    pairs = [(by_a[s.index], s) for s in sb if s.index in by_a]
    metrics = {}
    for name in [*ma, *[n for n in mb if n not in ma]]:
        va = ma.get(name, {}).get("value")
        vb = mb.get(name, {}).get("value")
        scored = [(x.scores[name], y.scores[name]) for x, y in pairs
                  if name in x.scores and name in y.scores]
        stats = paired.compare_metric([x for x, _ in scored], [y for _, y in scored])
        metrics[name] = {"a": va, "b": vb,
                         "delta": (vb - va) if va is not None and vb is not None else None,
                         "paired": stats}
    same, differ = 0, []
    for s in sb:
        other = by_a.get(s.index)
        if other is None:
            continue
        if other.scores == s.scores and other.output == s.output:
            same += 1
        else:
            differ.append({"index": s.index, "doc_id": s.doc_id, "a": other.scores,
                           "b": s.scores, "output_a": other.output, "output_b": s.output})
    return {"a": ra.id, "b": rb.id, "task": ra.task, "model_a": ra.model, "model_b": rb.model,
            "metrics": metrics, "items": {"common": same + len(differ), "identical": same,
                                          "different": len(differ)},
            "differences": differ}


def compare_view(data: dict, show: int | None = 10) -> Group:
    """Metrics with the paired difference; `show` differing items (None: all)."""
    table = Table(title=plain(f"{data['task']}: {data['a']} ({data['model_a']}) vs {data['b']} "
                              f"({data['model_b']})"), header_style="bold")
    for col in ("metric", "A", "B", "B − A", "95% CI (paired)", "p", "test"):
        table.add_column(col, justify="left" if col in ("metric", "test") else "right")
    for name, m in data["metrics"].items():
        delta, st = m["delta"], m.get("paired") or {}
        ci = st.get("ci")
        table.add_row(plain(name), fmt(m["a"]), fmt(m["b"]),
                      "—" if delta is None else f"{delta:+.4f}",
                      f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "—",
                      fmt(st.get("p_value")), st.get("test") or "—")
    items = data["items"]
    lines = [table, f"items in both: {items['common']}, identical: {items['identical']}, "
                    f"different: {items['different']}"]
    if data["differences"] and show != 0:
        diff = Table(title="differing items", header_style="bold")
        for col in ("index", "doc", "A scores", "B scores"):
            diff.add_column(col)
        for d in data["differences"][:show]:
            diff.add_row(*map(plain, (d["index"], d["doc_id"], json.dumps(d["a"]),
                                      json.dumps(d["b"]))))
        lines.append(diff)
    return Group(*lines)
