"""``python -m examples.taskboard serve | add-user``, from the repository root."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console

from .config import USER_NAME, BoardSettings

cli = typer.Typer(
    help="The tidings task board: a FastAPI app with logins, persisted tasks and a live page.",
    no_args_is_help=True,
    add_completion=False,
)
err = Console(stderr=True)

DatabaseOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="SQLAlchemy async URL (env TASKBOARD_DATABASE_URL; default "
        "sqlite+aiosqlite:///taskboard.db).",
        show_default=False,
    ),
]


def _settings(database_url: str | None) -> BoardSettings:
    try:
        given: dict[str, Any] = {"database_url": database_url} if database_url else {}
        return BoardSettings(**given)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        err.print(f"[bold red]error:[/] bad TASKBOARD_* setting: {problems}")
        raise typer.Exit(2) from None


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    database_url: DatabaseOption = None,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level.")] = "info",
) -> None:
    """Serve the board (and tidings in it) on http://HOST:PORT."""
    import uvicorn

    from .app import SDK_DIST, create_app

    settings = _settings(database_url)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if not (SDK_DIST / "centrifuge.js").is_file():
        err.print(
            "[bold yellow]warning:[/] the page needs the centrifuge SDK: run "
            f"`npm ci` in {SDK_DIST.parents[2]}"
        )
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level)


@cli.command("add-user")
def add_user(
    name: Annotated[str, typer.Argument(help="User name: 1-32 of A-Z a-z 0-9 _ . -")],
    password: Annotated[
        str,
        typer.Option(
            prompt=True, hide_input=True, confirmation_prompt=True, help="Asked if absent."
        ),
    ],
    database_url: DatabaseOption = None,
) -> None:
    """Create a user who can log in to the board."""
    if not USER_NAME.fullmatch(name):
        err.print(f"[bold red]error:[/] bad user name {name!r}: 1-32 of A-Z a-z 0-9 _ . -")
        raise typer.Exit(2)
    if not password:
        err.print("[bold red]error:[/] the password is empty")
        raise typer.Exit(2)
    settings = _settings(database_url)
    from .security import hash_password
    from .store import Store, UserExists

    async def add() -> None:
        store = Store(settings.database_url)
        try:
            await store.create()
            await store.add_user(name, await hash_password(password))
        finally:
            await store.close()

    try:
        asyncio.run(add())
    except UserExists:
        err.print(f"[bold red]error:[/] user {name!r} exists already")
        raise typer.Exit(1) from None
    typer.echo(f"added user {name!r}")


if __name__ == "__main__":
    cli()
