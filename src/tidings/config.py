"""Configuration: environment (``TIDINGS_*``), an optional TOML file, and code.

Precedence, highest first: arguments given in code or on the command line, environment
variables, the TOML file, defaults. Channel behaviour is configured per *namespace*: the part of
a channel name before the first ``:`` (``chat:room1`` is in namespace ``chat``); channels without
a namespace use ``[defaults]``.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

SubscribeRule = Literal["anonymous", "authenticated", "token"]

#: ``TIDINGS_*`` variables that are not settings of a node: read by the client commands
#: (``tidings publish/subscribe --url/--token/--sub-token``); ``TIDINGS_TEST_*`` and
#: ``TIDINGS_BENCH_*`` configure the test suite and the benchmarks. Any other ``TIDINGS_*``
#: variable must name a setting.
NOT_SETTINGS = frozenset({"URL", "TOKEN", "SUB_TOKEN"})
NOT_SETTINGS_PREFIXES = ("TEST_", "BENCH_")


class ConfigError(ValueError):
    """A configuration that cannot be read: the message names the file and line, or the
    environment variable, and what is wrong."""


class ChannelOptions(BaseModel):
    """What a channel (namespace) allows and keeps. Unknown keys are an error naming the key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    history_size: int = Field(100, ge=0, description="Publications kept per channel (0: none).")
    history_ttl: float = Field(300.0, ge=0, description="Seconds a publication stays in history.")
    presence: bool = Field(False, description="Track who is subscribed.")
    presence_ttl: float = Field(
        60.0, gt=0, description="Seconds a presence entry lives unrefreshed."
    )
    join_leave: bool = Field(False, description="Emit join/leave events.")
    force_push_join_leave: bool = Field(False, description="Push join/leave to every subscriber.")
    allow_publish: bool | None = Field(
        None, description="Clients may publish (default: yes in dev mode, no otherwise)."
    )
    allow_subscribe: SubscribeRule | None = Field(
        None, description="Who may subscribe (default: anonymous in dev mode, else authenticated)."
    )
    allow_history: bool = Field(True, description="Clients may read history.")
    allow_presence: bool = Field(True, description="Clients may read presence.")
    force_recovery: bool = Field(False, description="Recover on resubscribe even if not asked.")
    compression: bool | None = Field(
        None,
        description="Send publications permessage-deflate compressed to clients that "
        "negotiated it (`tidings serve`; unset: the global `compression` setting).",
    )


class Settings(BaseSettings):
    """Every setting of a tidings node; each is also an env var ``TIDINGS_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix="TIDINGS_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    host: str = Field("127.0.0.1", description="Address `tidings serve` binds.")
    port: int = Field(8000, ge=0, le=65535, description="Port `tidings serve` binds.")
    insecure: bool = Field(False, description="Allow dev mode on a non-loopback address.")
    workers: int = Field(
        1,
        ge=1,
        description="Processes `tidings serve` runs on its port, each a node joined through "
        "the broker (more than 1 needs a networked broker).",
    )
    broker_url: str = Field("memory://", description="Broker engine, chosen by URL scheme.")
    api_key: SecretStr | None = Field(None, description="Key required by the HTTP API.")
    token_hmac_secret: SecretStr | None = Field(
        None, description="HMAC secret for client JWTs (HS256/384/512)."
    )
    token_rsa_public_key: str | None = Field(None, description="PEM key for RS*/PS* client JWTs.")
    token_ecdsa_public_key: str | None = Field(None, description="PEM key for ES* client JWTs.")
    token_public_key: str | None = Field(
        None, description="PEM key for any asymmetric client JWT (RS*, PS*, ES*, EdDSA)."
    )
    token_jwks_url: str | None = Field(
        None, description="JWKS URL whose keys verify asymmetric client JWTs (by `kid`)."
    )
    token_audience: str | None = Field(None, description="Required `aud` of client JWTs.")
    token_issuer: str | None = Field(None, description="Required `iss` of client JWTs.")
    token_leeway: float = Field(
        0.0,
        ge=0,
        le=300,
        description="Seconds of clock skew allowed when checking a JWT's `exp` and `nbf`.",
    )
    allow_anonymous: bool = Field(
        False, description="Accept Centrifugo-protocol connections without a token."
    )
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="Browser origins (glob patterns, e.g. https://*.example.com; * for any) "
        "allowed to open WebSockets and streams and to post cross-site; unset: same-origin only "
        "(any origin in dev mode). Env: a JSON list.",
    )

    max_connections: int = Field(10_000, ge=1, description="WebSocket connections per process.")
    user_connection_limit: int = Field(
        0,
        ge=0,
        description="Connections one user may have on this node (0: no limit); over it a "
        "connect is closed 3504 (Centrifugo's option of that name).",
    )
    connection_rate_per_ip: float = Field(
        0.0,
        ge=0,
        description="WebSocket connections per second one client address may open, "
        "sustained (0: no limit); over it the handshake is refused with HTTP 403.",
    )
    connection_burst_per_ip: int = Field(
        20, ge=1, description="WebSocket connections one client address may open at once."
    )
    max_message_size: int = Field(65_536, ge=64, description="Largest incoming message, bytes.")
    outbox_limit: int = Field(
        1_048_576, ge=1024, description="Bytes queued for one client before it counts as slow."
    )
    ping_interval: float = Field(25.0, gt=0, description="Seconds between server pings.")
    pong_timeout: float = Field(10.0, gt=0, description="Seconds to wait for a pong.")
    connect_timeout: float = Field(
        10.0, gt=0, description="Seconds a Centrifugo client has to send `connect` (else 3502)."
    )
    expired_close_delay: float = Field(
        25.0, ge=0, description="Seconds after token expiry before an unrefreshed client is closed."
    )
    max_channels_per_connection: int = Field(
        128, ge=1, description="Channels one Centrifugo connection may subscribe (error 106)."
    )
    max_commands_per_second: float = Field(
        100.0, ge=0, description="Sustained commands per connection (0: unlimited; error 111)."
    )
    recovery_max_publications: int = Field(
        300,
        ge=1,
        description="Most publications one recovery returns; more missed: recovered false.",
    )
    command_burst: int = Field(
        200,
        ge=1,
        description="Commands a connection may send at once (a reconnecting SDK resubscribes "
        "every channel in one go).",
    )
    close_timeout: float = Field(2.0, gt=0, description="Seconds to wait for a close handshake.")
    shutdown_period: float = Field(
        5.0,
        ge=0,
        description="Seconds over which a stopping node closes its connections (3001 shutdown), "
        "so clients reconnect elsewhere spread out, not all at once.",
    )
    compression: bool = Field(
        False,
        description="permessage-deflate for every namespace that does not set its own "
        "`compression` (`tidings serve`: one compressed frame per publication).",
    )
    compression_min_size: int = Field(
        512, ge=0, description="Messages shorter than this go uncompressed, bytes."
    )
    compression_level: int = Field(
        1, ge=1, le=9, description="zlib level of permessage-deflate (1 fastest, 9 smallest)."
    )
    max_channel_length: int = Field(255, ge=1, description="Longest channel name.")
    channel_chars: str = Field(
        r"A-Za-z0-9_\-:.@$#,=!+~*",
        description="Characters allowed in channel names (a regex character class body).",
    )
    history_meta_ttl: float = Field(
        7 * 86400.0, gt=0, description="Seconds an idle channel keeps its offset and epoch."
    )
    history_max_streams: int = Field(
        100_000,
        ge=0,
        description="Channel streams (offset, epoch, history) the memory, Redis and Kafka "
        "brokers keep at most; past it the least recently used (Redis: published) one without "
        "subscribers is forgotten and restarts with a new epoch (Kafka: split over the topic's "
        "partitions, at least 1 each; the least recently published or touched stream of the "
        "partition, subscribed or not; the same on every node) (0: no cap).",
    )
    api_max_body_size: int = Field(
        1_048_576, ge=1024, description="Largest server API request body (a batch too), bytes."
    )
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a request's head (request line and headers, a WebSocket "
        "handshake too) may take to arrive; late: 408 and closed (`tidings serve`).",
    )
    body_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds a request body may take to arrive, whole; late: 408 and closed "
        "(`tidings serve`; mounted: on tidings' HTTP API routes).",
    )
    max_header_size: int = Field(
        65_536,
        ge=1024,
        description="Largest request head (request line and headers), bytes; over: 431 "
        "(`tidings serve`; mounted: the headers of tidings' HTTP routes).",
    )
    max_headers: int = Field(
        100,
        ge=8,
        description="Most header fields in a request; over: 431 (`tidings serve`; mounted: "
        "on tidings' HTTP routes).",
    )
    node_info_interval: float = Field(
        3.0, gt=0, description="Seconds between this node's announcements to the others (info)."
    )
    admin_password: SecretStr | None = Field(
        None, description="Password of the admin page at /admin (unset: no admin page)."
    )
    admin_secret: SecretStr | None = Field(
        None,
        description="Key signing admin tokens; the same on every node behind one address "
        "(unset: a random key per process).",
    )
    admin_token_ttl: float = Field(
        900.0, gt=0, le=86400, description="Seconds an admin token (from /admin/login) is valid."
    )
    admin_login_attempts: int = Field(
        5, ge=1, description="Failed admin logins allowed per client address per minute."
    )
    api_batch_parallelism: int = Field(
        64, ge=1, description="Commands of a parallel batch run at once."
    )
    idempotency_ttl: float = Field(
        300.0, ge=0, description="Seconds a publish idempotency_key is remembered (per node)."
    )
    idempotency_max_keys: int = Field(
        10_000, ge=0, description="Idempotency keys remembered per node (oldest dropped first)."
    )
    demo: bool = Field(
        True,
        description="`tidings serve` shows the demo page at / (a mounted Tidings only with "
        "demo=True, or with tidings.demo_router included).",
    )
    log_level: str = Field("info", description="Logging level of `tidings serve`.")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines of `tidings serve`: text, or one JSON object per line."
    )

    defaults: ChannelOptions = Field(default_factory=lambda: ChannelOptions())
    namespaces: dict[str, ChannelOptions] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _known_environment(cls, data: Any) -> Any:
        check_environment(os.environ)
        return data

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.lower() not in ("trace", "debug", "info", "warning", "error", "critical"):
            raise ValueError("must be one of debug, info, warning, error, critical")
        return value

    @field_validator("channel_chars")
    @classmethod
    def _valid_class(cls, value: str) -> str:
        re.compile(f"[{value}]")
        return value

    @field_validator("namespaces")
    @classmethod
    def _valid_names(cls, value: dict[str, ChannelOptions]) -> dict[str, ChannelOptions]:
        for name in value:
            if not name or ":" in name:
                raise ValueError(f"bad namespace name {name!r}")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides: Any) -> Settings:
        """Settings from env and ``config_file`` (TOML), with ``overrides`` on top.

        ``None`` overrides are dropped, so CLI options that were not given fall through.
        """
        check_environment(os.environ)
        given = {k: v for k, v in overrides.items() if v is not None}
        if config_file is None:
            return cls(**given)
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        read_toml(path)  # a syntax error names the file and line
        bound = type(
            "FileSettings", (cls,), {"model_config": {**cls.model_config, "toml_file": path}}
        )
        return cls.model_validate(bound(**given).model_dump())

    # -- derived -----------------------------------------------------------------------------

    @property
    def dev_mode(self) -> bool:
        """No secret is configured: anonymous access and an open publish API."""
        return self.api_key is None and not self.tokens_configured

    @property
    def tokens_configured(self) -> bool:
        """Some key to verify client JWTs is set."""
        return any(
            key is not None
            for key in (
                self.token_hmac_secret,
                self.token_rsa_public_key,
                self.token_ecdsa_public_key,
                self.token_public_key,
                self.token_jwks_url,
            )
        )

    @property
    def admin_enabled(self) -> bool:
        """An admin password is set: /admin and /admin/login are served."""
        return self.admin_password is not None

    @property
    def anonymous_allowed(self) -> bool:
        return self.allow_anonymous or self.dev_mode

    @property
    def loopback_only(self) -> bool:
        host = self.host.strip("[]")
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def channel_options(self, namespace: str) -> ChannelOptions:
        """Options of a namespace ('' for channels without one); KeyError if unknown."""
        if namespace == "":
            return self.defaults
        return self.namespaces[namespace]

    def allows_client_publish(self, options: ChannelOptions) -> bool:
        return self.dev_mode if options.allow_publish is None else options.allow_publish

    def subscribe_rule(self, options: ChannelOptions) -> SubscribeRule:
        if options.allow_subscribe is not None:
            return options.allow_subscribe
        return "anonymous" if self.dev_mode else "authenticated"


def read_toml(path: Path) -> dict[str, Any]:
    """The TOML file at ``path``; ConfigError ``FILE, line N, column M: what`` if it is not
    valid TOML (Python 3.11's tomllib gives the position only inside its message)."""
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        found = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
        if found:
            what = message[: found.start()]
            raise ConfigError(
                f"{path}, line {found[1]}, column {found[2]}: {what} (TOML syntax)"
            ) from None
        raise ConfigError(f"{path}: {message} (TOML syntax)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None


def _closest(name: str, choices: list[str], prefix: str = "") -> str:
    """`` (did you mean PREFIX+X?)`` for the choice X nearest ``name``, or ``""``."""
    found = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean {prefix}{found[0]}?)" if found else ""


def check_environment(environ: Mapping[str, str]) -> None:
    """ConfigError for a ``TIDINGS_*`` variable that is not a setting, naming the closest one.

    A misspelt variable would otherwise be ignored without a word: ``TIDINGS_APIKEY=secret``
    would leave the API open, in dev mode. Nested settings are checked too
    (``TIDINGS_DEFAULTS__HISTORY_SIZE``, ``TIDINGS_NAMESPACES__CHAT__PRESENCE``)."""
    top = [name.upper() for name in Settings.model_fields]
    options = [name.upper() for name in ChannelOptions.model_fields]
    for variable in environ:
        if not variable.upper().startswith("TIDINGS_"):
            continue
        name = variable[len("TIDINGS_") :].upper()
        if name in NOT_SETTINGS or name.startswith(NOT_SETTINGS_PREFIXES):
            continue
        parts = name.split("__")
        known = [f"TIDINGS_{n}" for n in top] + [f"TIDINGS_{n}" for n in NOT_SETTINGS]
        if parts[0] not in top:
            hint = _closest(variable.upper(), known)
            raise ConfigError(f"unknown environment variable {variable}{hint}")
        if parts[0] == "DEFAULTS" and len(parts) > 1:
            nested = parts[1]
        elif parts[0] == "NAMESPACES" and len(parts) > 2:
            nested = parts[2]
        else:
            continue
        if nested not in options:
            prefix = "TIDINGS_" + "__".join(parts[:-1]) + "__"
            hint = _closest(nested, options, prefix)
            raise ConfigError(f"unknown environment variable {variable}{hint}")
