"""The task board: a FastAPI app with tidings mounted in it.

REST (all but ``POST /token`` need ``Authorization: Bearer <token>``, else 401):

- ``POST /token``: OAuth2 password form (``username``, ``password``) ->
  ``{access_token, token_type, expires_in}``
- ``POST /token/refresh``: a fresh token for the bearer of a valid one
- ``GET /users``, ``GET /users/me``: the board's users (to pick an assignee), the caller
- ``GET /tasks``, ``GET /tasks/{id}``: tasks, oldest first
- ``POST /tasks``: ``{title, description?, assignee?}`` -> 201 and the task (version 1)
- ``PATCH /tasks/{id}``: ``{version, done?, assignee?, title?, description?}`` -> the task
- ``DELETE /tasks/{id}?version=N``: 204 (``version`` is optional)

Errors: 401 (no, bad or expired token, with ``WWW-Authenticate: Bearer``), 404 (no such task),
409 when ``version`` is stale (``{"detail": {"message", "current": task}}``), 422 (FastAPI's
validation error list, also for an assignee who is not a user).

Real time, through tidings at ``/connection/websocket`` (Centrifugo's protocol, the same JWT):
``tasks`` gets every change as ``{type, id, version, by, task, event}``; ``chat:tasks`` is the
board's chat (clients publish, presence, join/leave); ``notifications:#<user>`` tells a user
what was assigned to them, and only that user may subscribe to it.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, status
from fastapi.responses import FileResponse, PlainTextResponse, Response
from fastapi.security import OAuth2PasswordBearer, OAuth2PasswordRequestForm
from fastapi.staticfiles import StaticFiles

from tidings import ChannelOptions, Tidings

from .config import USER_NAME, BoardSettings
from .outbox import Relay
from .schemas import TaskCreate, TaskOut, TaskPatch, TokenOut, UserOut
from .security import TokenError, Tokens, check_password
from .store import Conflict, NotFound, Store, UnknownUser

log = logging.getLogger("taskboard")
UNPROCESSABLE = 422  # Starlette renamed its constant (RFC 9110 "Unprocessable Content")

HERE = Path(__file__).parent
STATIC = HERE / "static"
#: the SDK's browser bundle, installed by `npm ci` in this directory (package.json pins it)
SDK_DIST = HERE / "node_modules" / "centrifuge" / "dist"

#: What each channel keeps and allows (tidings namespaces; README "Channels and permissions").
CHANNELS: dict[str, Any] = {
    # `tasks` (no namespace): only the server publishes; a day of history, so a browser that
    # was offline gets what it missed on reconnect instead of reloading the board
    "defaults": ChannelOptions(
        history_size=1000,
        history_ttl=86400,
        force_recovery=True,
        allow_publish=False,
        allow_subscribe="authenticated",
    ),
    "namespaces": {
        # the board's chat: browsers publish (tidings adds the author from the token), see
        # who is here and who comes and goes
        "chat": ChannelOptions(
            history_size=50,
            history_ttl=86400,
            force_recovery=True,
            allow_publish=True,
            allow_subscribe="authenticated",
            presence=True,
            join_leave=True,
            force_push_join_leave=True,
        ),
        # notifications:#alice: tidings lets only alice subscribe (the `#user` rule)
        "notifications": ChannelOptions(
            history_size=100,
            history_ttl=7 * 86400,
            force_recovery=True,
            allow_publish=False,
            allow_subscribe="authenticated",
        ),
    },
}


@dataclass
class Board:
    """What the routes share: settings, database, outbox relay, tokens and the tidings node."""

    settings: BoardSettings
    store: Store
    relay: Relay
    tokens: Tokens
    tidings: Tidings


def create_app(settings: BoardSettings | None = None, **tidings_settings: Any) -> FastAPI:
    """The board's app. ``settings``: default ``BoardSettings()`` (``TASKBOARD_*`` env vars);
    ``tidings_settings``: tidings settings on top of the board's (``broker_url=...``)."""
    settings = settings if settings is not None else BoardSettings()
    if settings.secret is not None:
        secret = settings.secret.get_secret_value()
    else:
        secret = secrets.token_urlsafe(32)
        log.warning(
            "TASKBOARD_SECRET is not set: using a random secret, so logins end when this "
            "process stops, and several processes cannot share users' tokens"
        )
    tidings = Tidings(token_hmac_secret=secret, demo=False, **{**CHANNELS, **tidings_settings})
    store = Store(settings.database_url)
    relay = Relay(
        store,
        tidings.hub.publish,
        poll=settings.outbox_poll,
        max_backoff=settings.outbox_max_backoff,
    )
    tokens = Tokens(secret, settings.token_ttl, tidings.tokens)
    board = Board(settings, store, relay, tokens, tidings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # tidings (installed below) starts before this and stops after it, so the relay
        # always has a hub to publish to
        await store.create()
        relay.start()
        try:
            yield
        finally:
            await relay.stop()
            await store.close()

    app = FastAPI(title="task board", lifespan=lifespan)
    app.state.board = board
    tidings.install(app)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


# -- dependencies ----------------------------------------------------------------------------


def get_board(request: Request) -> Board:
    board: Board = request.app.state.board
    return board


BoardDep = Annotated[Board, Depends(get_board)]
bearer = OAuth2PasswordBearer(tokenUrl="token", auto_error=False)


def unauthorized(reason: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, reason, headers={"WWW-Authenticate": "Bearer"}
    )


async def current_user(board: BoardDep, token: Annotated[str | None, Depends(bearer)]) -> str:
    """The user the bearer token was issued to; 401 if there is none, it is bad or expired,
    or the user no longer exists."""
    if not token:
        raise unauthorized("not authenticated")
    try:
        user = board.tokens.user(token)
    except TokenError as exc:
        raise unauthorized(str(exc)) from None
    if not await board.store.user_exists(user):
        raise unauthorized("unknown user")
    return user


UserDep = Annotated[str, Depends(current_user)]
router = APIRouter()


def _token(board: Board, user: str) -> TokenOut:
    return TokenOut(access_token=board.tokens.issue(user), expires_in=board.tokens.ttl)


def _bad_assignee(exc: UnknownUser) -> HTTPException:
    # the shape of FastAPI's own validation errors, so clients handle one format
    detail = [{"loc": ["body", "assignee"], "msg": str(exc), "type": "value_error"}]
    return HTTPException(UNPROCESSABLE, detail)


def _conflict(exc: Conflict) -> HTTPException:
    detail = {
        "message": f"task {exc.current.id} changed since: it is at version {exc.current.version}",
        "current": exc.current.model_dump(mode="json"),
    }
    return HTTPException(status.HTTP_409_CONFLICT, detail)


def _not_found(task_id: int) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"no task {task_id}")


# -- the page --------------------------------------------------------------------------------


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html")


@router.get("/vendor/{name}", include_in_schema=False)
async def sdk(name: str) -> Response:
    """The centrifuge SDK's browser bundle from node_modules (no copy in the repository)."""
    if name not in ("centrifuge.js", "centrifuge.js.map"):
        raise HTTPException(status.HTTP_404_NOT_FOUND)
    path = SDK_DIST / name
    if not path.is_file():
        message = f"{path} is missing: run `npm ci` in {HERE} (README: the task board)"
        log.error(message)
        return PlainTextResponse(f"console.error({message!r});", 503)
    return FileResponse(path, media_type="text/javascript")


# -- login -----------------------------------------------------------------------------------


@router.post("/token")
async def login(board: BoardDep, form: Annotated[OAuth2PasswordRequestForm, Depends()]) -> TokenOut:
    """OAuth2 password flow (RFC 6749 section 4.3): a bearer JWT for a user and password."""
    name = form.username
    stored = await board.store.password_hash(name) if USER_NAME.fullmatch(name) else None
    ok, rehashed = await check_password(form.password, stored)
    if not ok:
        raise unauthorized("incorrect user name or password")
    if rehashed is not None:  # made with weaker parameters than today's: upgrade it
        await board.store.set_password_hash(name, rehashed)
    return _token(board, name)


@router.post("/token/refresh")
async def refresh(board: BoardDep, user: UserDep) -> TokenOut:
    """A new token for the bearer of a valid one (the page renews its token before expiry)."""
    return _token(board, user)


@router.get("/users")
async def users(board: BoardDep, user: UserDep) -> list[UserOut]:
    return [UserOut(name=name) for name in await board.store.users()]


@router.get("/users/me")
async def me(user: UserDep) -> UserOut:
    return UserOut(name=user)


# -- tasks -----------------------------------------------------------------------------------


@router.get("/tasks")
async def list_tasks(board: BoardDep, user: UserDep) -> list[TaskOut]:
    return await board.store.tasks()


@router.get("/tasks/{task_id}")
async def get_task(board: BoardDep, user: UserDep, task_id: int) -> TaskOut:
    try:
        return await board.store.task(task_id)
    except NotFound:
        raise _not_found(task_id) from None


@router.post("/tasks", status_code=status.HTTP_201_CREATED)
async def create_task(board: BoardDep, user: UserDep, body: TaskCreate) -> TaskOut:
    try:
        task = await board.store.create_task(user, body.title, body.description, body.assignee)
    except UnknownUser as exc:
        raise _bad_assignee(exc) from None
    board.relay.kick()  # committed: publish it now
    return task


@router.patch("/tasks/{task_id}")
async def patch_task(board: BoardDep, user: UserDep, task_id: int, body: TaskPatch) -> TaskOut:
    changes = body.model_dump(include=body.model_fields_set - {"version"})
    if not changes:
        detail = [
            {
                "loc": ["body"],
                "msg": "nothing to change: give done, assignee, title or description",
                "type": "value_error",
            }
        ]
        raise HTTPException(UNPROCESSABLE, detail)
    for field in ("done", "title"):  # these may be left out, but not set to null
        if field in changes and changes[field] is None:
            detail = [{"loc": ["body", field], "msg": "may not be null", "type": "value_error"}]
            raise HTTPException(UNPROCESSABLE, detail)
    if changes.get("description", "") is None:
        changes["description"] = ""
    try:
        task = await board.store.update_task(user, task_id, body.version, changes)
    except NotFound:
        raise _not_found(task_id) from None
    except Conflict as exc:
        raise _conflict(exc) from None
    except UnknownUser as exc:
        raise _bad_assignee(exc) from None
    board.relay.kick()
    return task


@router.delete("/tasks/{task_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_task(
    board: BoardDep,
    user: UserDep,
    task_id: int,
    version: Annotated[int | None, Query(ge=1)] = None,
) -> None:
    try:
        await board.store.delete_task(user, task_id, version)
    except NotFound:
        raise _not_found(task_id) from None
    except Conflict as exc:
        raise _conflict(exc) from None
    board.relay.kick()
