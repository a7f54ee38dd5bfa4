"""Logging of `tidings serve`: one handler on stderr, text or JSON lines, nothing secret.

``configure(level, fmt)`` replaces uvicorn's own logging setup (serve passes
``log_config=None``), so every line, uvicorn's included, goes through :class:`Redact`:

* query strings are cut from request targets (``/ws/news?token=...`` is logged as
  ``/ws/news``): tokens travel there (browsers cannot set WebSocket headers);
* anything shaped like a JWT (``eyJ...``), ``token=``/``api_key=``/``password=`` values and
  credential headers (``Authorization``, ``Cookie``, ``X-API-Key``) are replaced by ``***``;
* websockets' debug lines of data frames keep only the kind and size (``< TEXT [682 bytes]``):
  a connect frame carries a token;
* uvicorn's per-WebSocket ``[accepted]`` line and websockets' ``connection open/closed`` are
  dropped: tidings logs each connection event itself, once, with the reason of a refusal or
  a close (loggers ``tidings.endpoints`` and ``tidings.connection``).

An app that mounts tidings under its own server gets the same redaction (not the dropping):
:func:`install_redaction` puts a filter on tidings' loggers and on uvicorn's and websockets',
whatever handlers the app configures; :class:`~tidings.app.Tidings` calls it.

At level ``info`` uvicorn's start-up chatter ("Started server process", "Waiting for
application startup", ...) is left out too: `tidings serve` says in one line where it
listens, once it does. ``--log-level debug`` shows everything (still redacted).
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any, Literal

import orjson

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: a path followed by a query string: the query goes
_QUERY = re.compile(r"((?:^|[\s\"'(])(?:[a-z]+://[^\s\"'?/]*)?/[^\s\"'?]*)\?[^\s\"']*")
#: JSON Web Tokens: base64url JSON header starting '{"' (eyJ), payload, signature
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_SECRET_PARAM = re.compile(
    r"((?:token|sub_token|api_key|apikey|password|secret)[\"']?\s*[=:]\s*[\"']?)[^\s\"'&,}]+",
    re.IGNORECASE,
)
#: uvicorn's per-WebSocket access line (its protocols and tidings' fast one) and websockets'
#: own connection lines: tidings logs connection events itself
_DROPPED = ('"WebSocket %s" [accepted]', "connection open", "connection closed")


#: credential headers, as websockets logs a handshake at debug (``< authorization: ...``)
_SECRET_HEADER = re.compile(
    r"^((?:[<>] )?(?:authorization|proxy-authorization|cookie|set-cookie|x-api-key):\s*).+$",
    re.IGNORECASE | re.MULTILINE,
)


def redact(text: str) -> str:
    """``text`` without query strings, JWTs, credential headers' values or secret-looking
    ``key=value`` values."""
    text = _SECRET_HEADER.sub(r"\1***", text)
    text = _QUERY.sub(r"\1", text)
    text = _JWT.sub("***", text)
    return _SECRET_PARAM.sub(r"\1***", text)


#: websockets' debug lines of a frame (``< TEXT '...' [n bytes]``): the payload, a connect
#: frame's token included, shortened in the middle where no pattern can recognise it
_FRAME_LINES = ("< %s", "> %s")


def _frame_summary(record: logging.LogRecord) -> str | None:
    """``< TEXT [n bytes]`` for a websockets frame line whose frame carries data, else None."""
    args = record.args
    if record.msg not in _FRAME_LINES or not isinstance(args, tuple) or len(args) != 1:
        return None
    frame = args[0]
    opcode, data = getattr(frame, "opcode", None), getattr(frame, "data", None)
    if opcode is None or not isinstance(data, bytes | bytearray | memoryview):
        return None
    name = getattr(opcode, "name", str(opcode))
    return f"{str(record.msg)[0]} {name} [{len(data)} bytes]"


_FORMATTER = logging.Formatter()


class Redact(logging.Filter):
    """Rewrites every record's message redacted (frames' payloads left out); with ``drop``
    (as `tidings serve` installs it), also drops duplicate connection lines."""

    def __init__(self, drop: bool = True) -> None:
        super().__init__()
        self.drop = drop

    def filter(self, record: logging.LogRecord) -> bool:
        # the message template as logged, also when a logger's filter redacted it already
        template = getattr(record, "_tidings_template", record.msg)
        if self.drop and (
            (isinstance(template, str) and template in _DROPPED)
            or (
                record.name == "uvicorn.error"
                and isinstance(template, str)
                and template.endswith('"WebSocket %s" [accepted]')
            )
        ):
            return False
        if hasattr(record, "_tidings_template"):  # redacted already
            return True
        summary = _frame_summary(record)
        try:
            message = summary if summary is not None else record.getMessage()
        except Exception:  # a malformed record: let logging report it as usual
            return True
        record._tidings_template = record.msg
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:  # formatters use this text as it is
            record.exc_text = _FORMATTER.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


#: loggers whose records may carry a request target or a frame: uvicorn's (its access log
#: logs ``/ws/news?token=...`` at INFO), websockets' (requests and frames at DEBUG)
SERVER_LOGGERS = (
    "uvicorn",
    "uvicorn.error",
    "uvicorn.access",
    "uvicorn.asgi",
    "websockets",
    "websockets.server",
    "websockets.protocol",
)
_INSTALLED = Redact(drop=False)


def install_redaction() -> None:
    """Redact, at every level, whatever tidings' loggers and the servers' loggers
    (:data:`SERVER_LOGGERS`) log, whatever handlers the application configured: a filter on
    each of those loggers, so an app mounting tidings under its own uvicorn logs no token
    either. Idempotent; :class:`~tidings.app.Tidings` calls it when built and when started.

    A logger's filter sees only the records logged through that logger by name, not its
    children's: tidings' loggers each get it (all exist once tidings is imported), and a
    logger of your own that logs requests needs ``logger.addFilter(Redact(drop=False))``."""
    names = [*SERVER_LOGGERS, "tidings"]
    names += [n for n in list(logging.root.manager.loggerDict) if n.startswith("tidings.")]
    for name in names:
        logger = logging.getLogger(name)
        if _INSTALLED not in logger.filters:
            logger.addFilter(_INSTALLED)


#: attributes of LogRecord itself; anything else was passed in ``extra=`` and goes into JSON
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``,
    any ``extra=`` fields (``event``, ``client``, ``channel``, ``code``, ``reason``, ...) and
    ``exception`` (the traceback text) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key != "color_message":
                entry[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(self.formatException(record.exc_info))
        if record.exc_text:
            entry["exception"] = record.exc_text
        return orjson.dumps(entry, default=str).decode()


def configure(level: str = "info", fmt: LogFormat = "text") -> None:
    """Send every log record to stderr, redacted, as text or JSON lines, from ``level`` up
    (``debug``, ``info``, ``warning``, ``error``, ``critical``; ``trace`` is ``debug``)."""
    name = level.upper()
    numeric = logging.DEBUG if name == "TRACE" else logging.getLevelName(name)
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(Redact())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    # uvicorn's info lines are start-up chatter and per-connection duplicates of tidings' own
    chatter = numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING)
    for noisy in ("uvicorn.error", "websockets", "websockets.server"):
        logging.getLogger(noisy).setLevel(chatter)
    for name_ in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        logger = logging.getLogger(name_)
        for old in logger.handlers[:]:
            logger.removeHandler(old)
        logger.propagate = True
