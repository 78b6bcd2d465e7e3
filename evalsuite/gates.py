"""Quality gates: the checks that decide an eval's exit code in CI and cron.

Two kinds:
- `min` (`--fail-under METRIC=VALUE`, a suite task's `gates:`): the run's metric must
  be at least VALUE;
- `max_drop` (`--max-drop METRIC=DELTA`, a suite task's `max_drop:`): against a
  baseline run of the same items, the metric may fall by at most DELTA. With a
  significance level (`--significance 0.05`) a larger drop fails only when the paired
  test (evalsuite/paired.py) says it is not noise (p < level).

Each gate gives a `GateResult` that carries its figures, for the reports.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from server.errors import InvalidRequest


@dataclass(frozen=True)
class Gate:
    kind: str  # min | max_drop
    metric: str
    threshold: float


@dataclass
class GateResult:
    task: str
    model: str
    kind: str
    metric: str
    threshold: float
    passed: bool
    value: float | None = None
    baseline: float | None = None  # max_drop: the baseline's value
    delta: float | None = None  # max_drop: value - baseline
    ci: list[float] | None = None
    p_value: float | None = None
    run_id: str | None = None
    baseline_run_id: str | None = None
    message: str = ""

    @property
    def name(self) -> str:
        op = ">=" if self.kind == "min" else "drop <="
        return f"{self.task} · {self.model} · {self.metric} {op} {self.threshold:g}"

    def to_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}


def parse(specs: list[str] | None, kind: str, option: str) -> list[Gate]:
    """`METRIC=VALUE` strings from the command line (bad ones: exit 2, naming the option)."""
    gates = []
    for spec in specs or []:
        metric, sep, value = spec.rpartition("=")
        try:
            threshold = float(value)
        except ValueError:
            threshold = None
        if not sep or not metric or threshold is None:
            raise InvalidRequest(f"{option} {spec!r}: expected METRIC=NUMBER, for example "
                                 f"{option} acc=0.25", param=option.lstrip("-"))
        gates.append(Gate(kind, metric, threshold))
    return gates


def _metric(metrics: dict, gate: Gate, task: str) -> float:
    found = (metrics.get("metrics") or {}).get(gate.metric)
    if found is None:
        raise InvalidRequest(f"gate on {gate.metric!r}: {task} has no such metric (it has "
                             f"{', '.join(metrics.get('metrics') or {})})", param="gates")
    return found["value"]


def check_min(gate: Gate, *, task: str, model: str, run_id: str, metrics: dict) -> GateResult:
    value = _metric(metrics, gate, task)
    passed = value is not None and value >= gate.threshold
    message = (f"{gate.metric} = {value:.4f}, required >= {gate.threshold:g}"
               if value is not None else f"{gate.metric} has no value")
    return GateResult(task, model, "min", gate.metric, gate.threshold, passed, value=value,
                      run_id=run_id, message=message)


def check_drop(gate: Gate, *, task: str, model: str, comparison: dict,
               significance: float | None) -> GateResult:
    """`comparison` is report.compare(baseline, run)."""
    m = comparison["metrics"].get(gate.metric)
    if m is None:
        raise InvalidRequest(f"gate on {gate.metric!r}: {task} has no such metric",
                             param="max_drop")
    stats = m.get("paired") or {}
    delta = m["delta"]
    drop = -delta if delta is not None else None
    too_far = drop is not None and drop > gate.threshold
    significant = significance is None or (stats.get("p_value") is not None
                                           and stats["p_value"] < significance)
    passed = not (too_far and significant)
    message = (f"{gate.metric}: {m['a']:.4f} -> {m['b']:.4f} ({delta:+.4f}); allowed drop "
               f"{gate.threshold:g}" if delta is not None else f"{gate.metric}: no value")
    if stats.get("ci"):
        message += (f"; 95% CI [{stats['ci'][0]:+.4f}, {stats['ci'][1]:+.4f}], "
                    f"p = {stats['p_value']:.4g} ({stats['test']}, {stats['n']} items)")
    if too_far and not significant:
        message += f"; not significant at {significance:g}, so it passes"
    return GateResult(task, model, "max_drop", gate.metric, gate.threshold, passed,
                      value=m["b"], baseline=m["a"], delta=delta, ci=stats.get("ci"),
                      p_value=stats.get("p_value"), run_id=comparison["b"],
                      baseline_run_id=comparison["a"], message=message)


def no_baseline(gate: Gate, *, task: str, model: str, run_id: str) -> GateResult:
    """A max_drop gate on the first run of an eval: nothing to compare with, it passes."""
    return GateResult(task, model, "max_drop", gate.metric, gate.threshold, True,
                      run_id=run_id, message="no earlier finished run to compare with yet")
