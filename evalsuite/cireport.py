"""Reports CI systems read: `--report junit=PATH`, `markdown=PATH`, `json=PATH`.

JUnit XML has one testcase per gate (a failed gate is a `<failure>` whose message
carries the figures), the format GitHub Actions, GitLab and Jenkins show as test
results; Markdown is a summary table fit for a CI job summary
(`$GITHUB_STEP_SUMMARY`); JSON is the command's `--json` output.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from evalsuite.gates import GateResult
from evalsuite.report import fmt
from server.errors import InvalidRequest

KINDS = ("junit", "markdown", "json")


def parse(specs: list[str] | None) -> list[tuple[str, Path]]:
    out = []
    for spec in specs or []:
        kind, sep, path = spec.partition("=")
        if not sep or kind not in KINDS or not path:
            raise InvalidRequest(f"--report {spec!r}: expected junit=PATH, markdown=PATH or "
                                 "json=PATH", param="report")
        out.append((kind, Path(path)))
    return out


def junit(title: str, gates: list[GateResult]) -> str:
    failures = sum(not g.passed for g in gates)
    suites = ET.Element("testsuites", name=title, tests=str(len(gates)),
                        failures=str(failures))
    suite = ET.SubElement(suites, "testsuite", name=title, tests=str(len(gates)),
                          failures=str(failures), errors="0", skipped="0")
    for g in gates:
        case = ET.SubElement(suite, "testcase", classname=f"{g.task}.{g.model}", name=g.name)
        if not g.passed:
            failure = ET.SubElement(case, "failure", message=g.message, type=g.kind)
            failure.text = json.dumps(g.to_dict(), indent=2, default=str)
        else:
            ET.SubElement(case, "system-out").text = g.message
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"


def markdown(title: str, runs: list[dict], gates: list[GateResult]) -> str:
    """`runs`: {"task", "model", "run_id", "metrics"} per task run."""
    lines = [f"## {title}", "", "| task | model | run | metric | value | ± stderr | n |",
             "|---|---|---|---|---:|---:|---:|"]
    for r in runs:
        for name, m in (r["metrics"].get("metrics") or {}).items():
            lines.append(f"| {r['task']} | {r['model']} | `{r['run_id']}` | {name} | "
                         f"{fmt(m['value'])} | {fmt(m.get('stderr'))} | {m.get('n', '')} |")
    if gates:
        failed = sum(not g.passed for g in gates)
        lines += ["", f"**Gates: {len(gates) - failed} passed, {failed} failed**", "",
                  "| gate | result | figures |", "|---|---|---|"]
        for g in gates:
            lines.append(f"| {g.name} | {'✅ pass' if g.passed else '❌ FAIL'} | "
                         f"{g.message} |")
    return "\n".join(lines) + "\n"


def write(reports: list[tuple[str, Path]], *, title: str, data: dict, runs: list[dict],
          gates: list[GateResult]) -> None:
    for kind, path in reports:
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "junit":
            path.write_text(junit(title, gates))
        elif kind == "markdown":
            path.write_text(markdown(title, runs, gates))
        else:
            path.write_text(json.dumps(data, indent=2, default=str) + "\n")
