"""`llmctl eval`: evaluate a configured model on gsm8k, mmlu, mbpp, summarization and
toxicity; list tasks; list, show and compare stored runs.

One subcommand per task (`llmctl eval gsm8k --model NAME ...`), all sharing the
options built by `_task_command`; the work happens in evalsuite/.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from typer.core import TyperGroup

from llmctl import context, output
from llmctl.output import JsonOption
from server.errors import InvalidRequest


class _EvalGroup(TyperGroup):
    """An unknown task is one line and exit 2, like every other bad input."""

    def resolve_command(self, ctx, args):
        name = args[0] if args else None
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            from evalsuite.tasks import TASKS

            raise InvalidRequest(f"unknown task {name!r}; choose one of "
                                 f"{', '.join(TASKS)} (or: list, runs, show, compare)",
                                 param="task")
        return super().resolve_command(ctx, args)


app = typer.Typer(cls=_EvalGroup, no_args_is_help=True,
                  help="Evaluate a model on gsm8k, mmlu, mbpp, summarization or toxicity; "
                       "list, show and compare runs.")


def _opt(name: str, annotation, default=None) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=default)


COMMON = [
    _opt("model", Annotated[str | None, typer.Option(
        "--model", "-m", help="Model name from models.yaml (default: its default model); "
        "with --through, the gateway's model name.")]),
    _opt("config", Annotated[Path | None, typer.Option(
        "--config", help="models.yaml (default: LLMCTL_MODELS_CONFIG or ./models.yaml).")]),
    _opt("through", Annotated[str | None, typer.Option(
        "--through", help="Evaluate through a running llmctl gateway at this URL "
        "(its keys, quotas, cache and logs apply).")]),
    _opt("api_key", Annotated[str | None, typer.Option(
        "--api-key", envvar="LLMCTL_API_KEY", help="API key for --through.")]),
    _opt("tokenizer", Annotated[str | None, typer.Option(
        "--tokenizer", help="Remote or --through models: the model's tokenizer (hub id or "
        "directory), to left-truncate prompts longer than its context as lm-eval does.")]),
    _opt("limit", Annotated[int | None, typer.Option(
        "--limit", min=1, help="Evaluate the first N items (mmlu: per subject, as lm-eval).")]),
    _opt("num_fewshot", Annotated[int | None, typer.Option(
        "--num-fewshot", min=0, help="Few-shot examples (default: the task's).")]),
    _opt("batch_size", Annotated[int | None, typer.Option(
        "--batch-size", min=1, help="Requests per forward pass (local) or in flight "
        "(remote). Default 8.")]),
    _opt("data", Annotated[Path | None, typer.Option(
        "--data", help="Local JSON/JSONL/Parquet/CSV file (or a directory of split files) "
        "in the public dataset's schema, instead of the hub.")]),
    _opt("fewshot_data", Annotated[Path | None, typer.Option(
        "--fewshot-data", help="File with the few-shot pool (gsm8k: train, mmlu: dev).")]),
    _opt("dataset", Annotated[str | None, typer.Option(
        "--dataset", help="Hub dataset id overriding the task's source.")]),
    _opt("subset", Annotated[str | None, typer.Option(
        "--subset", help="Hub dataset config overriding the task's source.")]),
    _opt("split", Annotated[str | None, typer.Option(
        "--split", help="Split to evaluate (default: the task's).")]),
    _opt("seed", Annotated[int, typer.Option(
        "--seed", help="Few-shot sampling seed (lm-eval's default 1234).")], 1234),
    _opt("max_gen_tokens", Annotated[int | None, typer.Option(
        "--max-gen-tokens", min=1, help="Cap on generated tokens (default: the task's).")]),
    _opt("output", Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the results JSON here.")]),
    _opt("log_samples", Annotated[bool, typer.Option(
        "--log-samples", help="Include per-item samples in the results JSON.")], False),
    _opt("fresh", Annotated[bool, typer.Option(
        "--fresh", help="Start a new run instead of resuming an interrupted one.")], False),
    _opt("as_json", JsonOption, False),
]

FailUnder = Annotated[list[str] | None, typer.Option(
    "--fail-under", metavar="METRIC=VALUE", help="Gate: exit 1 when METRIC is below VALUE "
    "(repeatable).")]
MaxDrop = Annotated[list[str] | None, typer.Option(
    "--max-drop", metavar="METRIC=DELTA", help="Gate: exit 1 when METRIC fell by more than "
    "DELTA from the baseline (repeatable).")]
Significance = Annotated[float | None, typer.Option(
    "--significance", min=0.0, max=1.0, help="A --max-drop gate fails only when the drop is "
    "significant at this level (McNemar / paired bootstrap), e.g. 0.05.")]
Reports = Annotated[list[str] | None, typer.Option(
    "--report", metavar="KIND=PATH", help="Also write junit=PATH, markdown=PATH or json=PATH "
    "(repeatable).")]
Quiet = Annotated[bool, typer.Option(
    "--quiet", "-q", help="Print only the summary line (for cron).")]

GATES = [
    _opt("fail_under", FailUnder),
    _opt("max_drop", MaxDrop),
    _opt("baseline", Annotated[str | None, typer.Option(
        "--baseline", help="Baseline for --max-drop: `last` (the last finished run of the "
        "same eval) or a run id.")]),
    _opt("significance", Significance),
    _opt("report", Reports),
    _opt("quiet", Quiet, False),
]

EXTRA = {
    "mmlu": [
        _opt("subjects", Annotated[str | None, typer.Option(
            "--subjects", help="Comma-separated subjects (default: all in the data).")]),
        _opt("generative", Annotated[bool, typer.Option(
            "--generative", help="Score by generated answer letter (lm-eval "
            "mmlu_generative) instead of loglikelihoods.")], False),
    ],
    "mbpp": [
        _opt("allow_code_execution", Annotated[bool, typer.Option(
            "--allow-code-execution", help="Required: run the model's programs (in the "
            "sandbox) to score them.")], False),
    ],
    "toxicity": [
        _opt("classifier", Annotated[str | None, typer.Option(
            "--classifier", help="Hub id or directory of the text classifier (default "
            "facebook/roberta-hate-speech-dynabench-r4-target).")]),
        _opt("toxic_label", Annotated[str | None, typer.Option(
            "--toxic-label", help="The classifier label that means toxic (default hate).")]),
    ],
}


def _task_command(name: str):
    from evalsuite.tasks import TASKS

    cls = TASKS[name]

    def command(ctx: typer.Context, **opts):
        _run(ctx, name, opts)

    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                annotation=typer.Context), *COMMON, *EXTRA.get(name, []),
              *GATES]
    command.__signature__ = inspect.Signature(params)
    command.__name__ = name
    src = cls.source
    command.__doc__ = (f"{cls.title}.\n\nData: {src.path}" + (f" ({src.name})" if src.name
                                                                else "")
                       + f", split {src.split}; {cls.default_num_fewshot}-shot by default.")
    return command


def _run(ctx: typer.Context, name: str, o: dict) -> None:
    from evalsuite import data, report, runner
    from evalsuite.models import open_model, resolve_model
    from evalsuite.sandbox import SandboxConfig
    from evalsuite.tasks import TaskOptions

    app_ctx = context.get(ctx)
    extra = {}
    if o.get("subjects"):
        extra["subjects"] = [s.strip() for s in o["subjects"].split(",") if s.strip()]
    for key in ("generative", "classifier", "toxic_label"):
        if o.get(key):
            extra[key] = o[key]
    options = TaskOptions(num_fewshot=o["num_fewshot"], limit=o["limit"], seed=o["seed"],
                          max_gen_toks=o["max_gen_tokens"],
                          allow_code_execution=bool(o.get("allow_code_execution")),
                          sandbox=SandboxConfig.from_settings(app_ctx.settings), extra=extra)
    data_opts = data.DataOptions(data=o["data"], fewshot_data=o["fewshot_data"],
                                 dataset=o["dataset"], subset=o["subset"], split=o["split"])
    choice = resolve_model(app_ctx.settings, name=o["model"], config=o["config"],
                           through=o["through"], api_key=o["api_key"],
                           tokenizer=o["tokenizer"])
    gate_opts = _gate_options(o)
    prepared = runner.prepare_task(name, options, data_opts)
    say = _say(o["quiet"])
    say(f"{name}: {len(prepared.docs)} items from {output.safe(prepared.dataset.origin)}")
    model = open_model(app_ctx.settings, choice, batch_size=o["batch_size"])
    try:
        notes = runner.choose_mmlu_variant(prepared.task, model)
        for note in notes:
            say(f"[yellow]note:[/yellow] {output.safe(note)}")
        result = _with_progress(prepared, model, app_ctx.db, say, quiet=o["quiet"],
                                resume=not o["fresh"], notes=notes)
    finally:
        model.close()
        prepared.task.close()
    data_out = result.to_dict(with_samples=o["log_samples"])
    results = _task_gates(app_ctx.db, result, gate_opts)
    if results:
        data_out["gates"] = [g.to_dict() for g in results]
    if o["output"]:
        report.write_json(o["output"], data_out)
        say(f"results written to {output.safe(o['output'])}")
    runs = [{"task": result.task, "model": result.model["name"], "run_id": result.run_id,
             "metrics": result.metrics}]
    _finish(o, data_out, runs, results, f"llmctl eval {name}",
            lambda: report.results_view(data_out),
            f"{name} run {result.run_id}: {report.main_metric_of(result.metrics)}")


def _say(quiet: bool):
    """Progress lines on stderr, or nothing with --quiet."""
    def say(line: str) -> None:
        if not quiet:
            output.err_console.print(line, highlight=False, soft_wrap=True)
    return say


def _gate_options(o: dict) -> dict:
    """Check gate and report options before anything runs (bad ones: exit 2)."""
    from evalsuite import cireport, gates

    if o.get("baseline") is None and o.get("max_drop"):
        raise InvalidRequest("--max-drop needs a baseline: --baseline last or --baseline RUN",
                             param="baseline")
    return {"min": gates.parse(o.get("fail_under"), "min", "--fail-under"),
            "drop": gates.parse(o.get("max_drop"), "max_drop", "--max-drop"),
            "reports": cireport.parse(o.get("report")),
            "baseline": o.get("baseline"), "significance": o.get("significance")}


def _task_gates(db, result, g: dict) -> list:
    from evalsuite import gates, report, store

    label = result.model["name"]
    out = [gates.check_min(x, task=result.task, model=label, run_id=result.run_id,
                           metrics=result.metrics) for x in g["min"]]
    if g["drop"]:
        base_id = g["baseline"]
        if base_id == "last":
            base = store.last_finished(db, fingerprint=result.fingerprint, before=result.run_id)
            if base is None:  # the first run of this eval (cron's first night)
                return out + [gates.no_baseline(x, task=result.task, model=label,
                                                run_id=result.run_id) for x in g["drop"]]
            base_id = base.id
        comparison = report.compare(store.get_run(db, base_id), store.get_run(db, result.run_id))
        out += [gates.check_drop(x, task=result.task, model=label, comparison=comparison,
                                 significance=g["significance"]) for x in g["drop"]]
    return out


def _finish(o: dict, data: dict, runs: list[dict], results: list, title: str, view,
            summary: str) -> None:
    """Write the reports, print (the summary line alone with --quiet), exit 1 on a failed
    gate."""
    from evalsuite import cireport

    cireport.write(cireport.parse(o.get("report")), title=title, data=data, runs=runs,
                   gates=results)
    failed = [g for g in results if not g.passed]
    if results:
        summary += f"; gates {len(results) - len(failed)} passed, {len(failed)} failed"
    if o.get("quiet"):
        output.console.print(output.safe(summary), highlight=False, soft_wrap=True)
    else:
        output.emit(data, o["as_json"], view)
        for g in failed:
            output.err_console.print(
                f"[red]gate failed:[/red] {output.safe(g.name)}: {output.safe(g.message)}",
                highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)


def _with_progress(prepared, model, db, say, *, quiet: bool, resume: bool, notes: list[str],
                   suite_run_id: str | None = None):
    from evalsuite import runner

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TextColumn("elapsed"), TimeElapsedColumn(),
                        TextColumn("eta"), TimeRemainingColumn(), console=output.err_console,
                        transient=True, disable=quiet)
    state = {}

    def on_start(run_id: str, total: int, done: int) -> None:
        state["run"] = run_id
        if done:
            say(f"resuming run {run_id}: {done}/{total} items already scored")
        state["bar"] = progress.add_task(f"{prepared.task.name} {run_id}", total=total,
                                         completed=done)

    try:
        with progress:
            return runner.run_eval(prepared, model, db, model_identity=model.identity(),
                                   resume=resume, notes=notes, on_start=on_start,
                                   progress=lambda n: progress.advance(state["bar"], n),
                                   suite_run_id=suite_run_id)
    except KeyboardInterrupt:
        if "run" in state:
            output.err_console.print(f"interrupted: run {state['run']} keeps the items scored "
                                     "so far; run the same command again to resume",
                                     highlight=False)
        raise typer.Exit(130) from None


for _name in ("gsm8k", "mmlu", "mbpp", "summarization", "toxicity"):
    app.command(_name)(_task_command(_name))


@app.command("list")
def list_(as_json: JsonOption = False):
    """List the tasks, their data sources, prompts and metrics."""
    from evalsuite.tasks import TASKS

    rows = []
    for name, cls in TASKS.items():
        src = cls.source
        rows.append({"task": name, "title": cls.title, "source": src.path, "subset": src.name,
                     "split": src.split, "fewshot_split": src.fewshot_split,
                     "num_fewshot": cls.default_num_fewshot, "output_type": cls.output_type,
                     "metrics": list(cls.metrics), "columns": list(src.columns),
                     "prompt": cls.prompt_doc})
    output.emit(rows, as_json, lambda: output.table(
        "Eval tasks", ["task", "source", "split", "shots", "type", "metrics", "columns"],
        [[r["task"], r["source"] + (f" ({r['subset']})" if r["subset"] else ""), r["split"],
          r["num_fewshot"], r["output_type"], ", ".join(r["metrics"]), ", ".join(r["columns"])]
         for r in rows]))


@app.command("suite")
def suite(ctx: typer.Context,
          file: Annotated[Path, typer.Argument(help="The suite file (YAML).")],
          resume: Annotated[bool, typer.Option(
              "--resume", help="Continue the newest unfinished run of this suite (finished "
              "tasks are kept, unfinished ones resume from their stored items).")] = False,
          config: Annotated[Path | None, typer.Option(
              "--config", help="models.yaml (default: the suite's config:, "
              "LLMCTL_MODELS_CONFIG or ./models.yaml).")] = None,
          fail_under: FailUnder = None, max_drop: MaxDrop = None,
          baseline: Annotated[str | None, typer.Option(
              "--baseline", help="`last`: compare each task with its run in the last "
              "finished run of this suite (for --max-drop and the suite's max_drop:).")] = None,
          significance: Significance = None, report_: Reports = None, quiet: Quiet = False,
          as_json: JsonOption = False):
    """Run a suite of tasks on one or more models, stored as one suite run, with gates."""
    from evalsuite import gates, report
    from evalsuite import suite as suite_mod
    from evalsuite.models import open_model, resolve_model

    o = {"report": report_, "quiet": quiet, "as_json": as_json}
    if baseline not in (None, "last"):
        raise InvalidRequest("eval suite --baseline: only `last` (the last run of this suite)",
                             param="baseline")
    checked = _gate_options({**o, "fail_under": fail_under, "max_drop": None})
    drops = gates.parse(max_drop, "max_drop", "--max-drop")
    app_ctx = context.get(ctx)
    spec = suite_mod.load(file)
    models_yaml = config or spec.resolve(spec.spec.config)
    say = _say(quiet)

    def choose(name):
        if spec.spec.through:
            return resolve_model(app_ctx.settings, name=name, through=spec.spec.through,
                                 api_key=os.environ.get(spec.spec.api_key_env),
                                 tokenizer=spec.spec.tokenizer)
        return resolve_model(app_ctx.settings, name=name, config=models_yaml,
                             tokenizer=spec.spec.tokenizer)

    choices = {name: choose(name) for name in spec.models}  # bad models: before running

    def run_task(prepared, model, **kw):
        say(f"{prepared.task.name} on {output.safe(model.name)}: {len(prepared.docs)} items")
        return _with_progress(prepared, model, app_ctx.db, say, quiet=quiet, **kw)

    hooks = suite_mod.Hooks(
        open_model=lambda name: open_model(app_ctx.settings, choices[name],
                                           batch_size=spec.spec.batch_size),
        label=lambda name: choices[name].label, run_task=run_task, say=say)
    with suite_mod.SuiteLock(app_ctx.settings.home, spec.name):
        result = suite_mod.run(spec, app_ctx.db, hooks, resume=resume,
                               cli_gates=checked["min"], cli_drops=drops,
                               baseline_last=baseline == "last", significance=significance)
    data = result.to_dict()
    _finish(o, data, result.runs, result.gates, f"llmctl eval suite {spec.name}",
            lambda: report.suite_view(data), result.summary())


@app.command("runs")
def runs(ctx: typer.Context,
         task: Annotated[str | None, typer.Option("--task", help="Only this task.")] = None,
         suite_: Annotated[bool, typer.Option(
             "--suite", help="List suite runs instead of task runs.")] = False,
         limit: Annotated[int, typer.Option("--limit", min=1, help="How many.")] = 20,
         as_json: JsonOption = False):
    """List stored eval runs (or, with --suite, suite runs), newest first."""
    from evalsuite import report, store

    if suite_:
        found = store.list_suite_runs(context.get(ctx).db, limit=limit)
        data = [r.to_dict() for r in found]
        output.emit(data, as_json, lambda: output.table(
            "Eval suite runs", ["suite run", "name", "status", "gates", "created"],
            [[r.id, r.name, r.status, report.gates_summary(r.results),
              r.created_at.strftime("%Y-%m-%d %H:%M")] for r in found]) if found
            else "no suite runs yet")
        return
    found = store.list_runs(context.get(ctx).db, task=task, limit=limit)
    data = [r.to_dict() for r in found]
    output.emit(data, as_json, lambda: output.table(
        "Eval runs", ["run", "task", "model", "status", "items", "result", "created"],
        [[r.id, r.task, r.model, r.status, f"{r.n_samples}/{r.n_items}", report.main_metric(r),
          r.created_at.strftime("%Y-%m-%d %H:%M")] for r in found]) if found
        else "no eval runs yet")


@app.command("show")
def show(ctx: typer.Context,
         run: Annotated[str, typer.Argument(help="Run id (or a unique prefix).")],
         samples: Annotated[int, typer.Option("--samples", min=0,
                                              help="Also show the first N samples.")] = 0,
         as_json: JsonOption = False):
    """Show a stored run or suite run: its configuration, metrics and, with --samples,
    items."""
    from evalsuite import report, store

    db = context.get(ctx).db
    suite_run = store.get_suite_run(db, run)
    if suite_run is not None:
        data = {**suite_run.to_dict(), "runs": [r.to_dict() for r in store.list_runs(
            db, suite_run_id=suite_run.id, limit=10_000)]}
        output.emit(data, as_json, lambda: report.suite_record_view(data))
        return
    record, items = store.get_run(db, run)
    data = report.run_to_results(record, items[:samples] if samples else None)

    def render():
        parts = [report.results_view(data)]
        for s in items[:samples]:
            parts.append(output.table(
                f"item {s.index} ({s.doc_id})", ["field", "value"],
                [["prompt (end)", s.prompt[-300:]], ["output", s.output],
                 ["extracted", s.extracted], ["target", s.target], ["scores", s.scores]]))
        from rich.console import Group

        return Group(*parts)

    output.emit(data, as_json, render)


@app.command("compare")
def compare(ctx: typer.Context,
            run_a: Annotated[str, typer.Argument(help="Baseline run id (or prefix); with "
                                                  "--baseline last, the run to check.")],
            run_b: Annotated[str | None, typer.Argument(
                help="The run compared with it (or prefix).")] = None,
            max_drop: MaxDrop = None,
            baseline: Annotated[str | None, typer.Option(
                "--baseline", help="`last`: compare RUN with the last finished run of the "
                "same eval before it.")] = None,
            significance: Significance = None,
            items: Annotated[bool, typer.Option(
                "--items", help="List every item whose scores or output changed.")] = False,
            report_: Reports = None, quiet: Quiet = False,
            as_json: JsonOption = False):
    """Compare two runs of the same items: paired differences (McNemar's exact test for
    0/1 scores, paired bootstrap otherwise), changed items, and --max-drop gates."""
    from evalsuite import gates, report, store

    o = {"report": report_, "quiet": quiet, "as_json": as_json}
    _gate_options(o)
    drops = gates.parse(max_drop, "max_drop", "--max-drop")
    db = context.get(ctx).db
    if baseline == "last":
        if run_b is not None:
            raise InvalidRequest("--baseline last takes one run: eval compare RUN --baseline "
                                 "last", param="baseline")
        b = store.get_run(db, run_a)
        base = store.last_finished(db, fingerprint=b[0].fingerprint, before=b[0].id)
        if base is None:
            raise InvalidRequest(f"--baseline last: no earlier finished run of the eval of "
                                 f"{b[0].id}", param="baseline")
        a = store.get_run(db, base.id)
    elif baseline is not None or run_b is None:
        raise InvalidRequest("give two runs (eval compare A B) or one with --baseline last",
                             param="baseline")
    else:
        a, b = store.get_run(db, run_a), store.get_run(db, run_b)
    if a[0].task != b[0].task:
        raise InvalidRequest(f"runs {a[0].id} ({a[0].task}) and {b[0].id} ({b[0].task}) are "
                             "different tasks")
    data = report.compare(a, b)
    results = [gates.check_drop(g, task=b[0].task, model=b[0].model, comparison=data,
                                significance=significance) for g in drops]
    if results:
        data["gates"] = [g.to_dict() for g in results]
    runs = [{"task": r.task, "model": r.model, "run_id": r.id, "metrics": r.metrics or {}}
            for r in (a[0], b[0])]
    _finish(o, data, runs, results, f"llmctl eval compare {a[0].id} {b[0].id}",
            lambda: report.compare_view(data, show=None if items else 0),
            f"{data['task']} {a[0].id} -> {b[0].id}: " + ", ".join(
                f"{n} {m['delta']:+.4f}" for n, m in data["metrics"].items()
                if m["delta"] is not None))
