"""Channel names: validation and the namespace they belong to."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import ChannelOptions, Settings
from .errors import BadRequest, UnknownChannel

NAMESPACE_SEPARATOR = ":"
PRIVATE_PREFIX = "$"
USER_SEPARATOR = "#"  # chat:dm#alice,bob: a channel only the listed users may use


@dataclass(frozen=True, slots=True)
class Channel:
    name: str
    namespace: str
    options: ChannelOptions


class ChannelRules:
    """Checks channel names against the configured length, characters and namespaces."""

    __slots__ = ("_cache", "_max_len", "_pattern", "_settings")

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._max_len = settings.max_channel_length
        self._pattern = re.compile(f"[{settings.channel_chars}]+")
        self._cache: dict[str, Channel] = {}

    def resolve(self, name: str) -> Channel:
        """The channel with its options; BadRequest or UnknownChannel with a clear message."""
        found = self._cache.get(name)
        if found is not None:
            return found
        if not name:
            raise BadRequest("channel name is empty")
        if len(name) > self._max_len:
            raise BadRequest(f"channel name longer than {self._max_len} characters")
        if not self._pattern.fullmatch(name):
            raise BadRequest(
                f"channel name has characters outside [{self._settings.channel_chars}]"
            )
        namespace, sep, _ = name.removeprefix(PRIVATE_PREFIX).partition(NAMESPACE_SEPARATOR)
        if not sep:
            namespace = ""
        try:
            options = self._settings.channel_options(namespace)
        except KeyError:
            raise UnknownChannel(f"unknown channel namespace {namespace!r}") from None
        channel = Channel(name, namespace, options)
        if len(self._cache) < 100_000:
            self._cache[name] = channel
        return channel
