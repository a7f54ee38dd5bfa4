"""Persistence with SQLAlchemy 2 async: users, tasks, and the outbox of publications.

SQLite (``sqlite+aiosqlite:///file.db``, the default, no setup) or PostgreSQL
(``postgresql+asyncpg://user@host/db``). Tables are created at start if missing.

Every change to a task writes, in the same transaction, the publications it causes into the
outbox table; they leave for tidings only after the commit (see outbox.py). So a client never
hears of a change that was rolled back, and a change that committed is announced even if the
broker was down at that moment.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Integer,
    String,
    Text,
    delete,
    event,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from .schemas import Notification, TaskEvent, TaskOut

TASKS_CHANNEL = "tasks"
LOCK_KEY = 0x7461736B626F6172  # "taskboar": the advisory lock held while creating tables


def notifications_channel(user: str) -> str:
    """The user's personal channel: tidings lets only the users after ``#`` subscribe."""
    return f"notifications:#{user}"


def chat_channel(board: str = TASKS_CHANNEL) -> str:
    return f"chat:{board}"


class NotFound(Exception):
    """No such task."""


class Conflict(Exception):
    """The client's ``version`` is stale; ``current`` is the task as it is now."""

    def __init__(self, current: TaskOut) -> None:
        super().__init__(f"task {current.id} is at version {current.version}")
        self.current = current


class UnknownUser(Exception):
    """An assignee that is not a user of the board."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no user named {name!r}")
        self.name = name


class UserExists(Exception):
    pass


def now() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every database (SQLite hands back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "taskboard_users"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)


class Task(Base):
    __tablename__ = "taskboard_tasks"
    # AUTOINCREMENT: SQLite would otherwise reuse the id of a deleted last row, and a client
    # that remembers the deleted task's version would ignore the new one.
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    title: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    done: Mapped[bool] = mapped_column(Boolean, default=False)
    assignee: Mapped[str | None] = mapped_column(ForeignKey(User.name), nullable=True)
    created_by: Mapped[str] = mapped_column(ForeignKey(User.name))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)
    version: Mapped[int] = mapped_column(Integer, default=1)

    def out(self) -> TaskOut:
        return TaskOut(
            id=self.id,
            title=self.title,
            description=self.description,
            done=self.done,
            assignee=self.assignee,
            created_by=self.created_by,
            created_at=self.created_at,
            updated_at=self.updated_at,
            version=self.version,
        )


class OutboxEntry(Base):
    """A publication waiting to be published: written with the change, deleted once out."""

    __tablename__ = "taskboard_outbox"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    channel: Mapped[str] = mapped_column(String(255))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: while set and in the future, one relay is publishing the row (see Store.claim)
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Store:
    """The board's database. ``url``: a SQLAlchemy async URL; call :meth:`create` once."""

    def __init__(self, url: str) -> None:
        self.url = url
        sqlite = url.startswith("sqlite")
        # SQLite: wait for a busy database instead of failing at once
        options: dict[str, Any] = {"connect_args": {"timeout": 30}} if sqlite else {}
        self.engine = create_async_engine(url, **options)
        if sqlite:
            _serialize_sqlite_writers(self.engine.sync_engine)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    async def create(self) -> None:
        """Create the tables that do not exist yet."""
        async with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # nodes starting together: one creates the tables, the others wait for it and
                # then find them (CREATE TABLE IF NOT EXISTS alone races on PostgreSQL)
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
            await conn.run_sync(Base.metadata.create_all)

    async def close(self) -> None:
        await self.engine.dispose()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        async with self.sessions() as session, session.begin():
            yield session

    # -- users -------------------------------------------------------------------------------

    async def add_user(self, name: str, password_hash: str) -> None:
        """Raises UserExists if ``name`` is taken."""
        try:
            async with self.transaction() as db:
                db.add(User(name=name, password_hash=password_hash))
        except IntegrityError:
            raise UserExists(name) from None

    async def password_hash(self, name: str) -> str | None:
        async with self.sessions() as db:
            return await db.scalar(select(User.password_hash).where(User.name == name))

    async def set_password_hash(self, name: str, password_hash: str) -> None:
        async with self.transaction() as db:
            await db.execute(
                update(User).where(User.name == name).values(password_hash=password_hash)
            )

    async def user_exists(self, name: str) -> bool:
        async with self.sessions() as db:
            return await db.scalar(select(User.name).where(User.name == name)) is not None

    async def users(self) -> list[str]:
        async with self.sessions() as db:
            return list(await db.scalars(select(User.name).order_by(User.name)))

    # -- tasks -------------------------------------------------------------------------------

    async def tasks(self) -> list[TaskOut]:
        async with self.sessions() as db:
            return [t.out() for t in await db.scalars(select(Task).order_by(Task.id))]

    async def task(self, task_id: int) -> TaskOut:
        async with self.sessions() as db:
            found = await db.get(Task, task_id)
            if found is None:
                raise NotFound(task_id)
            return found.out()

    async def create_task(
        self, by: str, title: str, description: str, assignee: str | None
    ) -> TaskOut:
        """Insert a task and its publications; UnknownUser if ``assignee`` is not a user."""
        async with self.transaction() as db:
            if assignee is not None:
                await _known(db, assignee)
            stamp = now()
            row = Task(
                title=title,
                description=description,
                assignee=assignee,
                created_by=by,
                done=False,
                version=1,
                created_at=stamp,
                updated_at=stamp,
            )
            db.add(row)
            await db.flush()
            task = row.out()
            _announce(db, "task.created", task.id, task.version, by, task)
            if assignee is not None and assignee != by:
                _notify(db, assignee, by, task)
        return task

    async def update_task(
        self, by: str, task_id: int, version: int, changes: dict[str, Any]
    ) -> TaskOut:
        """Apply ``changes`` (column -> value) if the task is still at ``version``.

        NotFound, Conflict (stale version) or UnknownUser (assignee)."""
        async with self.transaction() as db:
            before = await db.get(Task, task_id)
            if before is None:
                raise NotFound(task_id)
            old_assignee = before.assignee
            new_assignee = changes.get("assignee")
            if new_assignee is not None:
                await _known(db, new_assignee)
            # The version check is in the UPDATE itself: two writers that read the same
            # version cannot both succeed, whatever the isolation level.
            row = await db.scalar(
                update(Task)
                .where(Task.id == task_id, Task.version == version)
                .values(**changes, version=Task.version + 1, updated_at=now())
                .returning(Task)
                .execution_options(populate_existing=True)
            )
            if row is None:
                await db.refresh(before)
                raise Conflict(before.out())
            task = row.out()
            _announce(db, "task.updated", task.id, task.version, by, task)
            if new_assignee is not None and new_assignee not in (old_assignee, by):
                _notify(db, new_assignee, by, task)
        return task

    async def delete_task(self, by: str, task_id: int, version: int | None) -> int:
        """Delete the task (only if at ``version``, when given); the deletion's version.

        NotFound or Conflict."""
        async with self.transaction() as db:
            current = await db.get(Task, task_id)
            if current is None:
                raise NotFound(task_id)
            condition = Task.id == task_id
            if version is not None:
                condition &= Task.version == version
            gone: int | None = await db.scalar(
                delete(Task).where(condition).returning(Task.version)
            )
            if gone is None:
                await db.refresh(current)
                raise Conflict(current.out())
            # a deletion is a change too: later than every version the task had
            _announce(db, "task.deleted", task_id, gone + 1, by, None)
        return gone + 1

    # -- outbox ------------------------------------------------------------------------------

    async def claim(self, lease: float, limit: int = 100) -> list[tuple[int, str, dict[str, Any]]]:
        """Claim the oldest unclaimed publications for ``lease`` seconds: (id, channel, data).

        Several processes sharing the database each claim different rows, so a row is
        published once unless its claimant dies (then the lease runs out and another takes
        it). On PostgreSQL the read skips rows another claim has locked (SKIP LOCKED); SQLite
        serializes claims anyway (see _serialize_sqlite_writers)."""
        async with self.transaction() as db:
            stamp = now()
            rows = (
                await db.execute(
                    select(OutboxEntry.id, OutboxEntry.channel, OutboxEntry.data)
                    .where(
                        (OutboxEntry.claimed_until.is_(None)) | (OutboxEntry.claimed_until < stamp)
                    )
                    .order_by(OutboxEntry.id)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            if rows:
                await db.execute(
                    update(OutboxEntry)
                    .where(OutboxEntry.id.in_([r.id for r in rows]))
                    .values(claimed_until=stamp + timedelta(seconds=lease))
                )
            return [(r.id, r.channel, r.data) for r in rows]

    async def published(self, ids: list[int]) -> None:
        """Forget publications that went out."""
        if ids:
            async with self.transaction() as db:
                await db.execute(delete(OutboxEntry).where(OutboxEntry.id.in_(ids)))

    async def unclaim(self, ids: list[int], failed: int | None = None, error: str = "") -> None:
        """Give rows back before their lease ends; ``failed``: the row whose publish raised
        ``error`` (its attempt is counted)."""
        async with self.transaction() as db:
            if failed is not None:
                await db.execute(
                    update(OutboxEntry)
                    .where(OutboxEntry.id == failed)
                    .values(attempts=OutboxEntry.attempts + 1, last_error=error[:1000])
                )
            if ids:
                await db.execute(
                    update(OutboxEntry).where(OutboxEntry.id.in_(ids)).values(claimed_until=None)
                )

    async def outbox(self) -> list[OutboxEntry]:
        """Every row still in the outbox (for tests and operators)."""
        async with self.sessions() as db:
            return list(await db.scalars(select(OutboxEntry).order_by(OutboxEntry.id)))


async def _known(db: AsyncSession, user: str) -> None:
    if await db.scalar(select(User.name).where(User.name == user)) is None:
        raise UnknownUser(user)


def _announce(
    db: AsyncSession, kind: str, task_id: int, version: int, by: str, task: TaskOut | None
) -> None:
    event = TaskEvent.model_validate(
        {"type": kind, "id": task_id, "version": version, "by": by, "task": task}
    )
    db.add(OutboxEntry(channel=TASKS_CHANNEL, data=event.model_dump(mode="json")))


def _notify(db: AsyncSession, user: str, by: str, task: TaskOut) -> None:
    note = Notification(type="task.assigned", by=by, task=task)
    db.add(OutboxEntry(channel=notifications_channel(user), data=note.model_dump(mode="json")))


def _serialize_sqlite_writers(engine: Any) -> None:
    """Begin SQLite transactions with BEGIN IMMEDIATE.

    pysqlite defers the lock to the first write, so two transactions that read and then write
    fail with "database is locked" instead of waiting for each other. Taking the write lock at
    BEGIN makes them queue (up to the connect timeout). This is the recipe in SQLAlchemy's
    SQLite dialect documentation ("Serializable isolation / Savepoints / Transactional DDL")."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
