"""The `llmctl` command: the root app, sub-apps per noun, and error → exit code.

Exit codes: 0 ok, 1 error, 2 usage or bad input, 3 limit reached, 4 not found,
5 authentication/permission (see server/errors.py).
"""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

from llmctl import output
from llmctl.commands import bench, cache, db, keys, logs, models, quotas, serve, top, usage
from llmctl.commands import eval as eval_cmd
from server.errors import LlmctlError


class _Root(TyperGroup):
    """Turns every LlmctlError into one readable line and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LlmctlError as exc:
            output.fail(exc.message)
            raise typer.Exit(exc.exit_code) from None


app = typer.Typer(
    cls=_Root,
    name="llmctl",
    help="LLM operations toolkit: serve models behind a metered gateway, manage keys, "
    "quotas, usage, logs and cache, benchmark and evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("serve")(serve.serve)
app.command("usage")(usage.usage)
app.command("top")(top.top)
for module, name in [(keys, "keys"), (models, "models"), (db, "db"), (quotas, "quotas"),
                     (logs, "logs"), (cache, "cache"), (bench, "bench"), (eval_cmd, "eval")]:
    app.add_typer(module.app, name=name)


def main() -> None:
    sys.exit(app())
