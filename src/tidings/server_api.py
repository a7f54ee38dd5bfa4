r"""Centrifugo's server API methods (publish, broadcast, history, presence, ...) over the hub.

Requests and results have the shapes of Centrifugo's HTTP API (``internal/apiproto/api.proto``)
so its client libraries (``cent``, gocent, ...) work unchanged. This module knows nothing of
HTTP: :meth:`ServerApi.call` takes a method name and its decoded JSON params and returns the
``{"result": ...}`` or ``{"error": {"code", "message"}}`` body; ``api.py`` is the HTTP glue.

Differences from Centrifugo, on purpose or for now:

- data is JSON: ``b64data`` must decode to a JSON document (tidings carries JSON only);
- ``subscribe`` forwards only ``user``, ``client`` and ``channel``; ``info``, ``data``,
  ``override`` and ``recover_since`` are ignored;
- ``channels`` describes this node only; ``info`` lists every node that announced itself
  through the broker within the last three ``node_info_interval`` seconds (:mod:`tidings.nodes`);
- ``channels`` adds ``num_pubs`` to each channel, ``info`` adds ``metrics.items`` (the node's
  ``/metrics`` counters, totals since it started) to each node;
- ``session``, ``whitelist``, ``all_users``, ``label_filter`` and ``delta`` are ignored;
- ``idempotency_key`` is remembered per node (``idempotency_ttl``, ``idempotency_max_keys``).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from fnmatch import fnmatchcase
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .brokers.base import ClientInfo, Publication, StreamPosition
from .channels import Channel
from .config import Settings
from .errors import BadRequest, MethodNotFound, NotAvailable, TidingsError, UnrecoverablePosition
from .hub import Hub
from .nodes import as_results
from .protocol.centrifuge import MAX_INTEGER
from .protocol.depth import MAX_DEPTH, too_deep

log = logging.getLogger("tidings.api")

Json = dict[str, Any]
_R = TypeVar("_R", bound="_Request")


class Malformed(BadRequest):
    """The params do not have the documented types: HTTP 400, as Centrifugo answers."""


# -- request shapes (unknown fields are ignored, as Centrifugo's decoder does) -------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _Position(_Request):
    offset: int = Field(0, ge=0, le=MAX_INTEGER)
    epoch: str = ""


class _Publish(_Request):
    data: Any = None
    b64data: str = ""
    skip_history: bool = False
    tags: dict[str, str] | None = None
    idempotency_key: str = ""


class _PublishOne(_Publish):
    channel: str = ""


class _Broadcast(_Publish):
    channels: list[str] = Field(default_factory=list)


class _ChannelOnly(_Request):
    channel: str = ""


class _History(_Request):
    channel: str = ""
    limit: int = Field(0, ge=-MAX_INTEGER, le=MAX_INTEGER)
    since: _Position | None = None
    reverse: bool = False


class _UserChannel(_Request):
    user: str = ""
    channel: str = ""
    client: str = ""


class _DisconnectWith(_Request):
    code: int = Field(3503, ge=3000, le=4999)
    reason: str = Field("force disconnect", max_length=123)


class _Disconnect(_Request):
    user: str = ""
    client: str = ""
    disconnect: _DisconnectWith | None = None


class _Refresh(_Request):
    user: str = ""
    client: str = ""
    expired: bool = False
    expire_at: int = Field(0, ge=0, le=MAX_INTEGER)


class _Channels(_Request):
    pattern: str = ""


class _Batch(_Request):
    commands: list[Any] = Field(default_factory=list)
    parallel: bool = False


def parse(model: type[_R], params: Any) -> _R:
    """``params`` as ``model``; Malformed naming the first bad field."""
    if params is None:
        params = {}
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "params"
        raise Malformed(f"{where}: {first['msg']}") from None


# -- results ---------------------------------------------------------------------------------


def client_info(info: ClientInfo) -> Json:
    out: Json = {"user": info.user, "client": info.client}
    if info.conn_info:
        out["conn_info"] = orjson.Fragment(info.conn_info)
    if info.chan_info:
        out["chan_info"] = orjson.Fragment(info.chan_info)
    return out


def publication(pub: Publication) -> Json:
    out: Json = {"data": orjson.Fragment(pub.data), "offset": pub.offset}
    if pub.tags:
        out["tags"] = pub.tags
    if pub.info is not None:
        out["info"] = client_info(pub.info)
    return out


def position(pos: StreamPosition) -> Json:
    return {"offset": pos.offset, "epoch": pos.epoch}


# -- idempotent publishing -------------------------------------------------------------------


class IdempotencyCache:
    """Recent publish results by (channel, key): a retried publish answers the first result.

    Bounded in time and size. A publish still in flight is awaited, not repeated."""

    def __init__(self, ttl: float, max_keys: int) -> None:
        self.ttl = ttl
        self.max_keys = max_keys
        self._entries: OrderedDict[tuple[str, str], tuple[float, asyncio.Future[StreamPosition]]]
        self._entries = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def run(
        self, key: tuple[str, str], publish: Callable[[], Awaitable[StreamPosition]]
    ) -> StreamPosition:
        if self.ttl <= 0 or self.max_keys <= 0:
            return await publish()
        now = time.monotonic()
        entries = self._entries
        while entries and next(iter(entries.values()))[0] <= now:
            entries.popitem(last=False)
        found = entries.get(key)
        if found is not None:
            try:
                return await asyncio.shield(found[1])
            except asyncio.CancelledError:
                if not found[1].cancelled():
                    raise  # this caller was cancelled
                return await self.run(key, publish)  # the first try was: publish ourselves
        done: asyncio.Future[StreamPosition] = asyncio.get_running_loop().create_future()
        entries[key] = (now + self.ttl, done)
        while len(entries) > self.max_keys:
            entries.popitem(last=False)
        try:
            result = await publish()
        except BaseException as exc:
            if entries.get(key, (0.0, None))[1] is done:
                del entries[key]  # a failed publish may be retried
            if isinstance(exc, asyncio.CancelledError):
                done.cancel()
            else:
                done.set_exception(exc)
                done.exception()  # retrieved: waiters, if any, re-raise it
            raise
        done.set_result(result)
        return result


# -- the methods -----------------------------------------------------------------------------


Method = Callable[[Any], Awaitable[Json]]


class ServerApi:
    """Centrifugo's server API methods for one node."""

    def __init__(self, hub: Hub, settings: Settings) -> None:
        self.hub = hub
        self.settings = settings
        self.started = time.monotonic()
        self.idempotency = IdempotencyCache(settings.idempotency_ttl, settings.idempotency_max_keys)
        self.methods: dict[str, Method] = {
            "publish": self.publish,
            "broadcast": self.broadcast,
            "history": self.history,
            "history_remove": self.history_remove,
            "presence": self.presence,
            "presence_stats": self.presence_stats,
            "subscribe": self.subscribe,
            "unsubscribe": self.unsubscribe,
            "disconnect": self.disconnect,
            "refresh": self.refresh,
            "channels": self.channels,
            "info": self.info,
        }

    async def call(self, method: str, params: Any) -> Json:
        """``{"result": ...}`` or ``{"error": ...}``; Malformed and MethodNotFound propagate."""
        if method == "batch":
            return await self.batch(params)
        run = self.methods.get(method)
        if run is None:
            raise MethodNotFound(f"method not found: {method}")
        return await self._answer(run, params)

    async def _answer(self, run: Method, params: Any) -> Json:
        try:
            return {"result": await run(params)}
        except Malformed:
            raise
        except TidingsError as exc:
            return {"error": exc.as_dict()}
        except Exception:
            log.exception("server API %s failed", getattr(run, "__name__", run))
            return {"error": TidingsError().as_dict()}

    async def batch(self, params: Any) -> Json:
        """``{"replies": [{method: result} | {"error": ...}, ...]}`` in the commands' order."""
        req = parse(_Batch, params)

        async def one(command: Any) -> Json:
            if not isinstance(command, dict) or len(command) != 1:
                return {"error": BadRequest("a command is an object with one method").as_dict()}
            ((name, args),) = command.items()
            run = self.methods.get(name)
            if run is None:
                return {"error": MethodNotFound(f"method not found: {name}").as_dict()}
            try:
                answer = await self._answer(run, args)
            except Malformed as exc:
                return {"error": exc.as_dict()}
            return {name: answer["result"]} if "result" in answer else answer

        if not req.parallel:
            return {"replies": [await one(c) for c in req.commands]}
        return {"replies": await self._gather([one(c) for c in req.commands])}

    async def _gather(self, work: list[Awaitable[Json]]) -> list[Json]:
        """Run ``work`` concurrently, at most ``api_batch_parallelism`` at a time, in order."""
        limit = asyncio.Semaphore(self.settings.api_batch_parallelism)

        async def bounded(item: Awaitable[Json]) -> Json:
            async with limit:
                return await item

        return list(await asyncio.gather(*(bounded(w) for w in work)))

    # -- publishing ------------------------------------------------------------------------------

    def _channel(self, name: str) -> Channel:
        if not name:
            raise BadRequest("channel is required")
        return self.hub.channel(name)

    @staticmethod
    def _data(req: _Publish) -> bytes:
        if req.b64data:
            try:
                raw = base64.b64decode(req.b64data, validate=True)
                if too_deep(raw):
                    raise BadRequest(f"b64data is nested more than {MAX_DEPTH} levels deep")
                return orjson.dumps(orjson.loads(raw))
            except ValueError:  # not base64 (binascii.Error), not ASCII, not JSON
                raise BadRequest("b64data must be base64 of a JSON document") from None
        if "data" not in req.model_fields_set:
            raise Malformed("data is required")
        return orjson.dumps(req.data)

    async def _publish(self, channel: Channel, data: bytes, req: _Publish) -> Json:
        def publish() -> Awaitable[StreamPosition]:
            return self.hub.publish_json(
                channel.name, data, tags=req.tags or None, skip_history=req.skip_history
            )

        if req.idempotency_key:
            pos = await self.idempotency.run((channel.name, req.idempotency_key), publish)
        else:
            pos = await publish()
        return position(pos)

    async def publish(self, params: Any) -> Json:
        req = parse(_PublishOne, params)
        channel = self._channel(req.channel)
        return await self._publish(channel, self._data(req), req)

    async def broadcast(self, params: Any) -> Json:
        """One publish per channel, concurrently; each answers its own result or error."""
        req = parse(_Broadcast, params)
        if not req.channels:
            raise BadRequest("channels is required")
        data = self._data(req)

        async def one(name: str) -> Json:
            async def run(_: Any) -> Json:
                return await self._publish(self._channel(name), data, req)

            return await self._answer(run, None)

        return {"responses": await self._gather([one(n) for n in req.channels])}

    # -- history and presence --------------------------------------------------------------------

    def _with_history(self, name: str) -> Channel:
        channel = self._channel(name)
        if channel.options.history_size <= 0:
            raise NotAvailable(f"history is off in {channel.name!r} (history_size is 0)")
        return channel

    def _with_presence(self, name: str) -> Channel:
        channel = self._channel(name)
        if not channel.options.presence:
            raise NotAvailable(f"presence is off in {channel.name!r}")
        return channel

    async def history(self, params: Any) -> Json:
        """As Centrifugo: no ``limit`` (or 0) gives only the position, a negative one all;
        ``since`` with ``reverse`` walks back from just before ``since``; 112 on an epoch
        that is not the stream's."""
        req = parse(_History, params)
        channel = self._with_history(req.channel)
        since = StreamPosition(req.since.offset, req.since.epoch) if req.since else None
        limit = None if req.limit < 0 else req.limit
        if since is not None and req.reverse:
            if since.offset == 0:
                raise BadRequest("since.offset must be > 0 with reverse")
            found = await self.hub.history(channel.name, reverse=True)
            pubs = [p for p in found.publications if p.offset < since.offset]
            pubs = pubs if limit is None else pubs[:limit]
        else:
            found = await self.hub.history(
                channel.name, since=since, limit=limit, reverse=req.reverse
            )
            pubs = found.publications
        pos = found.position
        if since is not None and since.epoch and since.epoch != pos.epoch:
            raise UnrecoverablePosition(f"epoch {since.epoch!r} is not the stream's {pos.epoch!r}")
        return {"publications": [publication(p) for p in pubs], **position(pos)}

    async def history_remove(self, params: Any) -> Json:
        channel = self._with_history(parse(_ChannelOnly, params).channel)
        await self.hub.broker.remove_history(channel.name)
        return {}

    async def presence(self, params: Any) -> Json:
        channel = self._with_presence(parse(_ChannelOnly, params).channel)
        found = await self.hub.presence(channel.name)
        return {"presence": {cid: client_info(info) for cid, info in found.items()}}

    async def presence_stats(self, params: Any) -> Json:
        channel = self._with_presence(parse(_ChannelOnly, params).channel)
        stats = await self.hub.presence_stats(channel.name)
        return {"num_clients": stats.num_clients, "num_users": stats.num_users}

    # -- users' connections, on every node -------------------------------------------------------

    @staticmethod
    def _user(user: str) -> str:
        if not user:
            raise BadRequest("user is required")
        return user

    async def subscribe(self, params: Any) -> Json:
        req = parse(_UserChannel, params)
        channel = self._channel(req.channel)
        await self.hub.subscribe_user(self._user(req.user), channel.name, client=req.client)
        return {}

    async def unsubscribe(self, params: Any) -> Json:
        req = parse(_UserChannel, params)
        channel = self._channel(req.channel)
        await self.hub.unsubscribe_user(self._user(req.user), channel.name, client=req.client)
        return {}

    async def disconnect(self, params: Any) -> Json:
        req = parse(_Disconnect, params)
        how = req.disconnect or _DisconnectWith()
        await self.hub.disconnect(self._user(req.user), how.code, how.reason, client=req.client)
        return {}

    async def refresh(self, params: Any) -> Json:
        req = parse(_Refresh, params)
        await self.hub.refresh_user(
            self._user(req.user),
            client=req.client,
            expire_at=req.expire_at or None,
            expired=req.expired,
        )
        return {}

    # -- this node -------------------------------------------------------------------------------

    async def channels(self, params: Any) -> Json:
        """Channels with subscribers on THIS node, filtered by a shell-style ``pattern``.

        Besides Centrifugo's ``num_clients`` each channel has ``num_pubs`` (a tidings
        extension): publications this node received for it since its first local subscriber,
        from which ``tidings top`` derives publications per second."""
        pattern = parse(_Channels, params).pattern
        hub = self.hub
        return {
            "channels": {
                name: {
                    "num_clients": hub.subscribers(name),
                    "num_pubs": hub.channel_publications(name),
                }
                for name in list(hub.channels)
                if not pattern or fnmatchcase(name, pattern)
            }
        }

    async def info(self, params: Any) -> Json:
        """Every node: this one's figures now, the others' as they last announced them through
        the broker (every ``node_info_interval`` seconds; see :mod:`tidings.nodes`)."""
        return {"nodes": as_results(self.hub.directory.nodes())}
