"""What the Redis broker keeps in Redis: the Lua scripts (each atomic) and the message format.

Keys of one channel: ``meta`` (hash: ``o`` offset, ``e`` epoch, ``t`` Redis time in ms of the
last publication or of the stream's creation, ``p`` the last publish id; expires after
``meta_ttl``), ``hist`` (a stream whose entry ids are ``<offset>-0``, fields ``d`` message and
``x`` expiry in ms, 0 = never), ``pres`` (hash client -> info) and ``presz`` (sorted set client
-> expiry ms). A channel that keeps no history has no ``meta`` or ``hist``: its publications are
a plain PUBLISH with offset 0 and no epoch.

One key is not a channel's: ``streams``, the index of streams (sorted set channel -> ``t``)
that bounds their count (``history_max_streams``). Outside a cluster the PUBLISH and HISTORY
scripts update it themselves (KEYS[3]); in a cluster it lives in its own slot, so the engine
calls INDEX after them. Either way the excess, least recently published first, is popped and
handed back to the engine, which deletes each popped stream with EVICT unless it has
subscribers.

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
    _NOW
    + """
local epoch = redis.call('HGET', KEYS[1], 'e')
local created = false
if not epoch then
  epoch = ARGV[1]
  created = true
  redis.call('HSET', KEYS[1], 'e', epoch, 't', now)
  redis.call('DEL', KEYS[2])
end
"""
)

# Index the stream (score: now) in the sorted set ``index`` and pop what exceeds ``cap``, at
# most ``batch`` of the least recently published: {channel, score, ...} for the engine to
# evict. The index expires with the streams (``ttl``: meta_ttl ms), so every key has a TTL. A
# channel whose stream outlived its entry (or came from an older version) is indexed again by
# its next publication.
_INDEX = """
local function index(key, channel, cap, batch, ttl)
  redis.call('ZADD', key, now, channel)
  redis.call('PEXPIRE', key, ttl)
  local excess = redis.call('ZCARD', key) - cap
  if cap <= 0 or excess <= 0 then return {} end
  return redis.call('ZPOPMIN', key, math.min(excess, batch))
end
"""

# KEYS: index. ARGV: channel, now (ms, from the script that touched the stream), cap, batch,
# meta_ttl ms. The cluster's separate step (the index has its own slot). Returns the popped, as
# _INDEX.
INDEX = (
    """
local now = tonumber(ARGV[2])
"""
    + _INDEX
    + """
return index(KEYS[1], ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5])
"""
)

# KEYS: meta, hist. ARGV: the score the stream was popped from the index with. Deletes the
# stream unless it was used since (its ``t`` is newer: it is indexed again). Returns 1 if a
# stream was deleted (an eviction), 0 if it had expired already or was kept.
EVICT = """
local t = redis.call('HGET', KEYS[1], 't')
if t and tonumber(t) > tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
if t then return 1 end
return 0
"""

# KEYS: meta, hist[, index]. ARGV: epoch candidate, meta_ttl ms, topic, body, size, ttl ms,
# publish id, channel, cap, batch. The publish id makes a retry safe: the same id again (the
# reply to the first try was lost) answers the position that try got, and publishes nothing.
# Returns {offset, epoch, now ms, popped from the index (with KEYS[3])}.
PUBLISH = (
    _META
    + _INDEX
    + """
if redis.call('HGET', KEYS[1], 'p') == ARGV[7] then
  return {tonumber(redis.call('HGET', KEYS[1], 'o')), epoch, now, {}}
end
redis.call('HSET', KEYS[1], 'p', ARGV[7], 't', now)
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
local popped = {}
if KEYS[3] then
  popped = index(KEYS[3], ARGV[8], tonumber(ARGV[9]), tonumber(ARGV[10]), ARGV[2])
end
return {offset, epoch, now, popped}
"""
)

# KEYS: meta, hist[, index]. ARGV: epoch candidate, meta_ttl ms, lowest stream id to read ('-':
# from the start), limit (-1: no limit), reverse (1/0), channel, cap, batch. Returns {offset,
# epoch, messages, now ms if the read created the stream (else 0), popped from the index}; a
# stream created here is indexed (KEYS[3]) like a published one: reads are bounded too.
# Expired entries are deleted first. The stream id and the COUNT go to Redis as the caller's
# strings: Lua numbers are doubles, printed with 14 digits ("1e+15"), which Redis refuses as
# ids.
HISTORY = (
    _META
    + _INDEX
    + """
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local popped = {}
local made = 0
if created then
  made = now
  if KEYS[3] then
    popped = index(KEYS[3], ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[2])
  end
end
local offset = tonumber(redis.call('HGET', KEYS[1], 'o') or '0')
local limit = tonumber(ARGV[4])
if limit == 0 then return {offset, epoch, {}, made, popped} end
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
return {offset, epoch, messages, made, popped}
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
