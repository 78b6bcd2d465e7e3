"""`llmctl eval`: evaluate a configured model on gsm8k, mmlu, mbpp, summarization and
toxicity; list tasks; list, show and compare stored runs.

One subcommand per task (`llmctl eval gsm8k --model NAME ...`), all sharing the
options built by `_task_command`; the work happens in evalsuite/.
"""

from __future__ import annotations

import inspect
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
                                annotation=typer.Context), *COMMON, *EXTRA.get(name, [])]
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
                          allow_code_execution=bool(o.get("allow_code_execution")), extra=extra)
    data_opts = data.DataOptions(data=o["data"], fewshot_data=o["fewshot_data"],
                                 dataset=o["dataset"], subset=o["subset"], split=o["split"])
    choice = resolve_model(app_ctx.settings, name=o["model"], config=o["config"],
                           through=o["through"], api_key=o["api_key"],
                           tokenizer=o["tokenizer"])
    prepared = runner.prepare_task(name, options, data_opts)
    say = output.err_console
    say.print(f"{name}: {len(prepared.docs)} items from {prepared.dataset.origin}",
              highlight=False, soft_wrap=True)
    model = open_model(app_ctx.settings, choice, batch_size=o["batch_size"])
    try:
        notes = runner.choose_mmlu_variant(prepared.task, model)
        for note in notes:
            say.print(f"[yellow]note:[/yellow] {note}", highlight=False, soft_wrap=True)
        result = _with_progress(prepared, model, app_ctx.db, o["fresh"], notes, say)
    finally:
        model.close()
        prepared.task.close()
    data_out = result.to_dict(with_samples=o["log_samples"])
    if o["output"]:
        report.write_json(o["output"], data_out)
        say.print(f"results written to {o['output']}", highlight=False)
    output.emit(data_out, o["as_json"], lambda: report.results_view(data_out))


def _with_progress(prepared, model, db, fresh: bool, notes: list[str], say):
    from evalsuite import runner

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TextColumn("elapsed"), TimeElapsedColumn(),
                        TextColumn("eta"), TimeRemainingColumn(), console=say, transient=True)
    state = {}

    def on_start(run_id: str, total: int, done: int) -> None:
        state["run"] = run_id
        if done:
            say.print(f"resuming run {run_id}: {done}/{total} items already scored",
                      highlight=False)
        state["bar"] = progress.add_task(f"{prepared.task.name} {run_id}", total=total,
                                         completed=done)

    try:
        with progress:
            return runner.run_eval(prepared, model, db, model_identity=model.identity(),
                                   resume=not fresh, notes=notes, on_start=on_start,
                                   progress=lambda n: progress.advance(state["bar"], n))
    except KeyboardInterrupt:
        if "run" in state:
            say.print(f"interrupted: run {state['run']} keeps the items scored so far; run "
                      "the same command again to resume", highlight=False)
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


@app.command("runs")
def runs(ctx: typer.Context,
         task: Annotated[str | None, typer.Option("--task", help="Only this task.")] = None,
         limit: Annotated[int, typer.Option("--limit", min=1, help="How many.")] = 20,
         as_json: JsonOption = False):
    """List stored eval runs, newest first."""
    from evalsuite import report, store

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
    """Show a stored run: its configuration, metrics and, with --samples, items."""
    from evalsuite import report, store

    record, items = store.get_run(context.get(ctx).db, run)
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
            run_a: Annotated[str, typer.Argument(help="First run id (or prefix).")],
            run_b: Annotated[str, typer.Argument(help="Second run id (or prefix).")],
            as_json: JsonOption = False):
    """Compare two runs of the same task: metrics side by side and differing items."""
    from evalsuite import report, store

    db = context.get(ctx).db
    a, b = store.get_run(db, run_a), store.get_run(db, run_b)
    if a[0].task != b[0].task:
        raise InvalidRequest(f"runs {a[0].id} ({a[0].task}) and {b[0].id} ({b[0].task}) are "
                             "different tasks")
    data = report.compare(a, b)
    output.emit(data, as_json, lambda: report.compare_view(data))
