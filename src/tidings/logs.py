"""Logging of `tidings serve`: one handler on stderr, text or JSON lines, nothing secret.

``configure(level, fmt)`` replaces uvicorn's own logging setup (serve passes
``log_config=None``), so every line, uvicorn's included, goes through :class:`Redact`:

* query strings are cut from request targets (``/ws/news?token=...`` is logged as
  ``/ws/news``): tokens travel there (browsers cannot set WebSocket headers);
* anything shaped like a JWT (``eyJ...``) and ``token=``/``api_key=``/``password=`` values are
  replaced by ``***``;
* uvicorn's per-WebSocket ``[accepted]`` line and websockets' ``connection open/closed`` are
  dropped: tidings logs each connection event itself, once, with the reason of a refusal or
  a close (loggers ``tidings.endpoints`` and ``tidings.connection``).

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


def redact(text: str) -> str:
    """``text`` without query strings, JWTs or secret-looking ``key=value`` values."""
    text = _QUERY.sub(r"\1", text)
    text = _JWT.sub("***", text)
    return _SECRET_PARAM.sub(r"\1***", text)


class Redact(logging.Filter):
    """Drops duplicate connection lines; rewrites every other record's message redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (isinstance(record.msg, str) and record.msg in _DROPPED) or (
            record.name == "uvicorn.error"
            and isinstance(record.msg, str)
            and record.msg.endswith('"WebSocket %s" [accepted]')
        ):
            return False
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: let logging report it as usual
            return True
        record.msg, record.args = redact(message), None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


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
