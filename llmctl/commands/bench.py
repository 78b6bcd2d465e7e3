"""`llmctl bench`: device throughput of a local model, and a serving load generator."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from llmctl import context, output
from llmctl.output import JsonOption
from server.errors import ConfigError, InvalidRequest, ModelNotFound

app = typer.Typer(help="Benchmark a local model on its device, or a running server under load.",
                  no_args_is_help=True)

OutputOption = Annotated[Path | None, typer.Option("--output", "-o", help="Also write the "
                                                   "JSON result to this file.")]
PromptLenOption = Annotated[int, typer.Option("--prompt-len", min=1,
                                              help="Prompt length in tokens.")]
GenLenOption = Annotated[int, typer.Option("--gen-len", min=1,
                                           help="New tokens per request.")]


def _write(path: Path | None, data: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=output.err_console, transient=True,
                    disable=not (enabled and output.err_console.is_terminal))


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise InvalidRequest(f"{option}: expected positive integers separated by commas, "
                             f"got {text!r}", param=option.lstrip("-").replace("-", "_"))
    return values


def _tokenizer(source: str | None):
    if source is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"--tokenizer: cannot load {source}: {first}",
                          param="tokenizer") from None


@app.command("serve")
def serve(
    url: Annotated[str, typer.Option("--url", help="Server root, e.g. http://127.0.0.1:8000 "
                                     "(a trailing /v1 is fine).")],
    model: Annotated[str, typer.Option("--model", help="Model name to request.")],
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="LLMCTL_API_KEY",
                                                help="Sent as 'Authorization: Bearer KEY'.")]
    = None,
    concurrency: Annotated[str, typer.Option("--concurrency", help="Comma-separated levels of "
                                             "requests in flight, one run each.")] = "1,8,32",
    num_prompts: Annotated[int | None, typer.Option("--num-prompts", min=1, help="Requests per "
                                                    "level (default: 2x the level, at least "
                                                    "16).")] = None,
    request_rate: Annotated[float, typer.Option("--request-rate", help="Arrivals per second, "
                                                "Poisson; inf sends all at once.")] = math.inf,
    prompt_len: Annotated[int, typer.Option("--prompt-len", min=1, help="Prompt length in "
                                            "words, or tokens with --tokenizer.")] = 128,
    gen_len: GenLenOption = 64,
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", help="Tokenizer directory "
                                                  "or hub id: prompts of exactly --prompt-len "
                                                  "tokens.")]
    = None,
    temperature: Annotated[float | None, typer.Option("--temperature", help="Sent with each "
                                                      "request (default: the server's).")]
    = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for prompts and arrivals.")] = 0,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for a response "
                                           "or its next chunk.")] = 600.0,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG of throughput and "
                                              "latency against concurrency.")] = None,
    out: OutputOption = None,
    as_json: JsonOption = False,
):
    """Load-test an OpenAI-compatible server: throughput, TTFT, TPOT, ITL, latency.

    Streams /v1/completions at each concurrency level, like `vllm bench serve`.
    """
    from llmctl.benchmarking.serve import ServeConfig, run_serve_bench

    config = ServeConfig(url=url, model=model, api_key=api_key, tokenizer=_tokenizer(tokenizer),
                         concurrency=_int_list(concurrency, "--concurrency"),
                         num_prompts=num_prompts, request_rate=request_rate,
                         prompt_len=prompt_len, gen_len=gen_len, temperature=temperature,
                         seed=seed, timeout=timeout)
    with _progress(not as_json) as progress:
        state: dict = {}

        def on_level(level: int, n: int) -> None:
            if "task" in state:
                progress.update(state["task"], visible=False)
            state["task"] = progress.add_task(f"concurrency {level}", total=n)

        def on_request(result) -> None:
            progress.advance(state["task"])

        result = run_serve_bench(config, on_level=on_level, on_request=on_request)
    _write(out, result)
    if plot is not None:
        from llmctl.benchmarking.plot import plot_serve

        plot_serve(result, plot)
    from llmctl.benchmarking.report import serve_table

    output.emit(result, as_json, lambda: serve_table(result))


@app.command("device")
def device(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option("--model", help="Configured model name "
                                              "(default: the default model).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="models.yaml (default: "
                                                "LLMCTL_MODELS_CONFIG or ./models.yaml).")]
    = None,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Comma-separated batch "
                                             "sizes.")] = "1,4,16",
    prompt_len: PromptLenOption = 128,
    gen_len: Annotated[int, typer.Option("--gen-len", min=1, help="Decode steps (new tokens "
                                         "per sequence).")] = 64,
    device_: Annotated[str | None, typer.Option("--device", help="cpu, cuda, mps or auto "
                                                "(default: the model's, else auto).")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    out: OutputOption = None,
    as_json: JsonOption = False,
):
    """Measure prefill and decode tokens/s and peak memory of a local model per batch size.

    Plain forward passes with a KV cache on the model's device: no engine, no server.
    """
    from llmctl.benchmarking.device import DeviceConfig, run_device_bench
    from llmctl.benchmarking.report import device_table
    from server.config import load_models_config

    settings = context.get(ctx).settings
    models = load_models_config(settings, config)
    spec = models.find(model)
    if spec is None:
        known = ", ".join(models.names) or "none configured"
        what = f"model {model!r}" if model else "a default model"
        raise ModelNotFound(f"{what} is not in the models config (models: {known})",
                            param="model")
    bench_config = DeviceConfig(batch_sizes=_int_list(batch_sizes, "--batch-sizes"),
                                prompt_len=prompt_len, gen_len=gen_len, device=device_,
                                seed=seed)
    sizes = bench_config.batch_sizes
    with _progress(not as_json) as progress:
        task = progress.add_task(f"loading {spec.name}", total=len(sizes))

        def on_batch(batch_size: int) -> None:
            done = sizes.index(batch_size)
            progress.update(task, completed=done, description=f"batch {batch_size}")

        result = run_device_bench(spec, settings, bench_config, on_batch=on_batch)
    _write(out, result)
    output.emit(result, as_json, lambda: device_table(result))
