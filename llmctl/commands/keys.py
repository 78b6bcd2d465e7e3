"""`llmctl keys`: create, list, show, update, revoke and rotate API keys."""

from __future__ import annotations

from typing import Annotated

import typer

from llmctl import context, output
from llmctl.output import JsonOption
from llmctl.params import Role
from server.services import keys as svc

app = typer.Typer(help="Create and manage API keys.", no_args_is_help=True)

KeyRef = Annotated[str, typer.Argument(help="Key id, name or prefix.")]
Rpm = Annotated[int | None, typer.Option("--rpm", help="Requests per minute (0 = unlimited).")]
Tpm = Annotated[int | None, typer.Option("--tpm", help="Tokens per minute (0 = unlimited).")]
Conc = Annotated[int | None, typer.Option("--max-concurrency", help="Requests in flight.")]
Monthly = Annotated[int | None, typer.Option("--monthly-tokens", help="Monthly token quota.")]
Models = Annotated[str | None, typer.Option("--models", help="Comma-separated allowed models.")]
Expires = Annotated[str | None, typer.Option("--expires", help="Lifetime, e.g. 30d, 12h.")]

COLUMNS = ["id", "name", "prefix", "role", "state", "models", "rpm", "tpm", "conc",
           "monthly", "expires", "last used"]


def _row(k: svc.KeyInfo) -> list:
    return [k.id, k.name, k.prefix + "…", k.role, k.state, ",".join(k.allowed_models or []) or "*",
            k.rpm, k.tpm, k.max_concurrency, k.monthly_token_quota,
            k.expires_at.strftime("%Y-%m-%d %H:%M") if k.expires_at else "",
            k.last_used_at.strftime("%Y-%m-%d %H:%M") if k.last_used_at else ""]


def _models(value: str | None) -> list[str] | None:
    return None if value is None else [m.strip() for m in value.split(",") if m.strip()]


def _print_created(created: svc.CreatedKey, as_json: bool, verb: str) -> None:
    data = {"secret": created.secret, **created.key.to_dict()}
    output.emit(data, as_json, lambda: (
        f"{verb} key [bold]{output.safe(created.key.name)}[/bold] (id {created.key.id}).\n"
        f"Secret, shown once — store it now:\n\n  {created.secret}\n"))


@app.command()
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Option("--name", help="A unique name for the key.")],
    role: Annotated[Role, typer.Option("--role")] = Role.user,
    rpm: Rpm = None, tpm: Tpm = None, max_concurrency: Conc = None, monthly_tokens: Monthly = None,
    models: Models = None, expires: Expires = None,
    value: Annotated[str | None, typer.Option("--value", help="Import this secret.")] = None,
    as_json: JsonOption = False,
):
    """Create a key and print its secret once."""
    created = svc.create_key(
        context.get(ctx).db, name=name, role=role.value, models=_models(models), expires_in=expires,
        value=value, rpm=rpm, tpm=tpm, max_concurrency=max_concurrency,
        monthly_token_quota=monthly_tokens,
    )
    _print_created(created, as_json, "Created")


@app.command("list")
def list_(ctx: typer.Context, as_json: JsonOption = False):
    """List keys (never their secrets)."""
    keys = svc.list_keys(context.get(ctx).db)
    output.emit([k.to_dict() for k in keys], as_json,
                lambda: output.table("API keys", COLUMNS, [_row(k) for k in keys]))


@app.command()
def show(ctx: typer.Context, key: KeyRef, as_json: JsonOption = False):
    """Show one key."""
    info = svc.get_key(context.get(ctx).db, key)
    output.emit(info.to_dict(), as_json, lambda: output.table(None, COLUMNS, [_row(info)]))


@app.command()
def update(
    ctx: typer.Context, key: KeyRef,
    role: Annotated[Role | None, typer.Option("--role")] = None,
    rpm: Rpm = None, tpm: Tpm = None, max_concurrency: Conc = None, monthly_tokens: Monthly = None,
    models: Models = None, expires: Expires = None, as_json: JsonOption = False,
):
    """Change a key's role, limits, allowed models or expiry."""
    info = svc.update_key(
        context.get(ctx).db, key, role=role.value if role else None, models=_models(models),
        expires_in=expires, rpm=rpm, tpm=tpm, max_concurrency=max_concurrency,
        monthly_token_quota=monthly_tokens,
    )
    output.emit(info.to_dict(), as_json, lambda: output.table(None, COLUMNS, [_row(info)]))


@app.command()
def revoke(ctx: typer.Context, key: KeyRef, as_json: JsonOption = False):
    """Revoke a key: it stops working at once."""
    info = svc.revoke_key(context.get(ctx).db, key)
    output.emit(info.to_dict(), as_json,
                lambda: f"Revoked key {output.safe(info.name)} ({info.prefix}…).")


@app.command()
def rotate(ctx: typer.Context, key: KeyRef, as_json: JsonOption = False):
    """Give a key a new secret (printed once); the old secret stops working."""
    _print_created(svc.rotate_key(context.get(ctx).db, key), as_json, "Rotated")
