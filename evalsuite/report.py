"""Results for people (rich tables) and for scripts (JSON), and run comparisons."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Group
from rich.table import Table

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
    metrics = (run.metrics or {}).get("metrics") or {}
    if not metrics:
        return ""
    name, m = next(iter(metrics.items()))
    return f"{name} {fmt(m['value'])}"


def compare(a: tuple[RunRecord, list[Sample]], b: tuple[RunRecord, list[Sample]]) -> dict:
    (ra, sa), (rb, sb) = a, b
    ma = (ra.metrics or {}).get("metrics") or {}
    mb = (rb.metrics or {}).get("metrics") or {}
    metrics = {}
    for name in [*ma, *[n for n in mb if n not in ma]]:
        va = ma.get(name, {}).get("value")
        vb = mb.get(name, {}).get("value")
        metrics[name] = {"a": va, "b": vb,
                         "delta": (vb - va) if va is not None and vb is not None else None}
    by_a = {s.index: s for s in sa}
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


def compare_view(data: dict, show: int = 10) -> Group:
    table = Table(title=plain(f"{data['task']}: {data['a']} ({data['model_a']}) vs {data['b']} "
                              f"({data['model_b']})"), header_style="bold")
    for col in ("metric", "A", "B", "B − A"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for name, m in data["metrics"].items():
        delta = m["delta"]
        table.add_row(plain(name), fmt(m["a"]), fmt(m["b"]),
                      "—" if delta is None else f"{delta:+.4f}")
    items = data["items"]
    lines = [table, f"items in both: {items['common']}, identical: {items['identical']}, "
                    f"different: {items['different']}"]
    if data["differences"]:
        diff = Table(title="differing items", header_style="bold")
        for col in ("index", "doc", "A scores", "B scores"):
            diff.add_column(col)
        for d in data["differences"][:show]:
            diff.add_row(*map(plain, (d["index"], d["doc_id"], json.dumps(d["a"]),
                                      json.dumps(d["b"]))))
        lines.append(diff)
    return Group(*lines)
