"""The task board's settings: ``TASKBOARD_*`` environment variables, or arguments in code.

tidings' own settings (``TIDINGS_BROKER_URL``, ``TIDINGS_API_KEY``, ...) are read by tidings as
usual; the board only sets the token secret and the channel namespaces it needs (see app.py).
"""

from __future__ import annotations

import re

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: User names become part of channel names (``notifications:#alice``), so they keep to
#: characters tidings allows there and never contain ``,`` or ``#``, which separate users.
USER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")


class BoardSettings(BaseSettings):
    """Every setting of the board; each is also an env var ``TASKBOARD_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="TASKBOARD_", extra="forbid")

    database_url: str = Field(
        "sqlite+aiosqlite:///taskboard.db",
        description="SQLAlchemy async URL: SQLite (aiosqlite) or postgresql+asyncpg://...",
    )
    secret: SecretStr | None = Field(
        None,
        description="HS256 secret signing the login JWTs (REST and WebSocket alike). Unset: a "
        "random one per process, so logins end when it restarts.",
    )
    token_ttl: int = Field(
        3600, ge=60, description="Seconds a login token is valid; the page renews it before."
    )
    outbox_poll: float = Field(
        2.0,
        gt=0,
        description="Seconds between outbox checks when nothing wakes the relay (rows written by "
        "another process, or left by a crash).",
    )
    outbox_max_backoff: float = Field(
        5.0, gt=0, description="Longest wait, seconds, between retries of a failing publish."
    )

    @field_validator("secret")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        # RFC 7518 section 3.2: an HS256 key must be at least 256 bits
        if value is not None and len(value.get_secret_value().encode()) < 32:
            raise ValueError("must be at least 32 bytes (RFC 7518 3.2, HS256)")
        return value
