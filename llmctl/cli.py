"""The `llmctl` command: the root app, sub-apps per noun, and error → exit code.

Exit codes: 0 ok, 1 error, 2 usage or bad input, 3 limit reached, 4 not found,
5 authentication/permission (see server/errors.py). Under `--json` an error is
one JSON object on stderr (see output.fail), with the same exit code.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Annotated

import typer
from typer.core import TyperGroup

from llmctl import output
from llmctl.commands import bench, cache, db, keys, logs, models, quotas, serve, top, usage
from llmctl.commands import eval as eval_cmd
from server.errors import LlmctlError


class _Root(TyperGroup):
    """Turns every LlmctlError and usage error into one readable line (one JSON
    object under --json) and its exit code."""

    wants_json = False

    def main(self, args=None, *rest, **kwargs):
        args = list(sys.argv[1:] if args is None else args)
        # --json belongs to each subcommand; the root needs it to shape errors.
        options = args[:args.index("--")] if "--" in args else args
        self.wants_json = "--json" in options
        return super().main(args, *rest, **kwargs)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LlmctlError as exc:
            output.fail(exc.message, as_json=self.wants_json, error_type=exc.error_type,
                        code=exc.code, param=exc.param, exit_code=exc.exit_code)
            raise typer.Exit(exc.exit_code) from None
        except typer.TyperException as exc:  # click's usage errors, as Typer vendors click
            if not hasattr(exc, "format_message") or type(exc).__name__ == "NoArgsIsHelpError":
                raise
            # Typer words a failed choice "Value error, 'root' is not one of ...".
            message = exc.format_message().replace("Value error, ", "")
            if (sub := getattr(exc, "ctx", None)) is not None and not self.wants_json:
                message += f" (see '{sub.command_path} --help')"
            param = getattr(getattr(exc, "param", None), "opts", None)
            output.fail(message, as_json=self.wants_json, error_type="usage_error",
                        param=param[0] if param else None, exit_code=exc.exit_code)
            raise typer.Exit(exc.exit_code) from None


def _version() -> str:
    try:
        return package_version("llmctl")
    except PackageNotFoundError:  # running from a checkout that is not installed
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        print(f"llmctl {_version()}")
        raise typer.Exit()


app = typer.Typer(
    cls=_Root,
    name="llmctl",
    help="LLM operations toolkit: serve models behind a metered gateway, manage keys, "
    "quotas, usage, logs and cache, benchmark and evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(version: Annotated[bool, typer.Option(
        "--version", help="Print the version and exit.", callback=_print_version,
        is_eager=True)] = False) -> None:
    """LLM operations toolkit."""


app.command("serve")(serve.serve)
app.command("usage")(usage.usage)
app.command("top")(top.top)
for module, name in [(keys, "keys"), (models, "models"), (db, "db"), (quotas, "quotas"),
                     (logs, "logs"), (cache, "cache"), (bench, "bench"), (eval_cmd, "eval")]:
    app.add_typer(module.app, name=name)


def main() -> None:
    sys.exit(app())
