"""What the Redis broker keeps in Redis: the Lua scripts (each atomic) and the message format.

Keys of one channel: ``meta`` (hash: ``o`` offset, ``e`` epoch, expires after ``meta_ttl``),
``hist`` (a stream whose entry ids are ``<offset>-0``, fields ``d`` message and ``x`` expiry in
ms, 0 = never), ``pres`` (hash client -> info) and ``presz`` (sorted set client -> expiry ms).

A message (in pub/sub and in history alike) is ``P<offset> <epoch>\\n<meta json>\\n<data>``;
the script writes the first line, the client the rest, so the data bytes are never touched.
Times come from the Redis ``TIME`` command so nodes with skewed clocks still agree.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson

from .base import ClientInfo, JoinLeave, Publication

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Shared prologue: read the stream's epoch, starting a new life (and dropping any stale history)
# when the meta hash expired. ARGV[1] is a fresh epoch the client proposes; ARGV[2] meta_ttl ms.
_META = (
    """
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[1], 'e', epoch)
  redis.call('DEL', KEYS[2])
end
"""
    + _NOW
)

# KEYS: meta, hist. ARGV: epoch candidate, meta_ttl ms, topic, body, size, ttl ms, publish id.
# The publish id makes a retry safe: the same id again (the reply to the first try was lost)
# answers the position that try got, and publishes nothing.
PUBLISH = (
    _META
    + """
if redis.call('HGET', KEYS[1], 'p') == ARGV[7] then
  return {tonumber(redis.call('HGET', KEYS[1], 'o')), epoch}
end
redis.call('HSET', KEYS[1], 'p', ARGV[7])
local offset = redis.call('HINCRBY', KEYS[1], 'o', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local message = 'P' .. offset .. ' ' .. epoch .. '\\n' .. ARGV[4]
local size = tonumber(ARGV[5])
if size > 0 then
  local ttl = tonumber(ARGV[6])
  local expires = 0
  if ttl > 0 then expires = now + ttl end
  redis.call('XADD', KEYS[2], 'MAXLEN', size, offset .. '-0', 'd', message, 'x', expires)
  if ttl > 0 then
    redis.call('PEXPIRE', KEYS[2], ttl)
  else
    redis.call('PEXPIRE', KEYS[2], ARGV[2])
  end
end
redis.call('PUBLISH', ARGV[3], message)
return {offset, epoch}
"""
)

# KEYS: meta, hist. ARGV: epoch candidate, meta_ttl ms, lowest stream id to read ('-': from
# the start), limit (-1: no limit), reverse (1/0). Returns {offset, epoch, messages}; expired
# entries are deleted first. The stream id and the COUNT go to Redis as the caller's strings:
# Lua numbers are doubles, printed with 14 digits ("1e+15"), which Redis refuses as ids.
HISTORY = (
    _META
    + """
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local offset = tonumber(redis.call('HGET', KEYS[1], 'o') or '0')
local limit = tonumber(ARGV[4])
if limit == 0 then return {offset, epoch, {}} end
while true do
  local head = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
  if #head == 0 then break end
  local expires = tonumber(head[1][2][4])
  if expires == 0 or expires > now then break end
  redis.call('XDEL', KEYS[2], head[1][1])
end
local low = ARGV[3]
local entries
if ARGV[5] == '1' then
  if limit > 0 then
    entries = redis.call('XREVRANGE', KEYS[2], '+', low, 'COUNT', ARGV[4])
  else
    entries = redis.call('XREVRANGE', KEYS[2], '+', low)
  end
elseif limit > 0 then
  entries = redis.call('XRANGE', KEYS[2], low, '+', 'COUNT', ARGV[4])
else
  entries = redis.call('XRANGE', KEYS[2], low, '+')
end
local messages = {}
for i, entry in ipairs(entries) do messages[i] = entry[2][2] end
return {offset, epoch, messages}
"""
)

# KEYS: pres, presz. ARGV: client, info, ttl ms.
ADD_PRESENCE = (
    _NOW
    + """
local ttl = tonumber(ARGV[3])
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
for _, key in ipairs(KEYS) do
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
"""
)

# KEYS: pres, presz. ARGV: client.
REMOVE_PRESENCE = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
"""

# KEYS: pres, presz. Drops expired entries, returns the rest as a flat {client, info, ...}.
PRESENCE = (
    _NOW
    + """
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, client in ipairs(gone) do redis.call('HDEL', KEYS[1], client) end
if #gone > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now) end
return redis.call('HGETALL', KEYS[1])
"""
)


# -- the message format ------------------------------------------------------------------------


def _b64(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode()


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def encode_info(info: ClientInfo) -> dict[str, Any]:
    return {
        "c": info.client,
        "u": info.user,
        "ci": _b64(info.conn_info),
        "hi": _b64(info.chan_info),
    }


def decode_info(d: dict[str, Any]) -> ClientInfo:
    return ClientInfo(d["c"], d.get("u", ""), _unb64(d.get("ci")), _unb64(d.get("hi")))


def decode(channel: str, message: bytes) -> Publication | JoinLeave:
    """A message from pub/sub or history: ``P<offset> <epoch>\\n<meta>\\n<data>`` for a
    publication, ``J\\n<info>`` / ``L\\n<info>`` for a join/leave. ValueError if malformed."""
    kind = message[:1]
    if kind in (b"J", b"L"):
        return JoinLeave(channel, decode_info(orjson.loads(message[2:])), kind == b"J")
    if kind != b"P":
        raise ValueError(f"unknown message kind {kind!r}")
    head, meta_raw, data = message.split(b"\n", 2)
    offset, epoch = head[1:].split(b" ")
    meta = orjson.loads(meta_raw)
    if not isinstance(meta, dict):
        raise ValueError("publication meta is not an object")
    info = decode_info(meta["i"]) if "i" in meta else None
    return Publication(channel, data, int(offset), epoch.decode(), info, meta.get("g"), meta["t"])
