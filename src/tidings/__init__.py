"""tidings: real-time channels for Python.

The names below are imported on first use (PEP 562), so ``import tidings.cli`` or
``tidings.client`` (the client commands) does not import FastAPI and the server side.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import HubDep, Tidings, create_app, get_hub
    from .brokers import Broker, ClientInfo, Publication, StreamPosition, create_broker
    from .config import ChannelOptions, Settings
    from .errors import Disconnect, TidingsError
    from .hub import Hub
    from .session import Session

__version__ = "0.1.0"

#: public name -> the module that defines it
_WHERE = {
    "Broker": ".brokers",
    "ChannelOptions": ".config",
    "ClientInfo": ".brokers",
    "Disconnect": ".errors",
    "Hub": ".hub",
    "HubDep": ".app",
    "Publication": ".brokers",
    "Session": ".session",
    "Settings": ".config",
    "StreamPosition": ".brokers",
    "Tidings": ".app",
    "TidingsError": ".errors",
    "create_app": ".app",
    "create_broker": ".brokers",
    "get_hub": ".app",
}

__all__ = [
    "Broker",
    "ChannelOptions",
    "ClientInfo",
    "Disconnect",
    "Hub",
    "HubDep",
    "Publication",
    "Session",
    "Settings",
    "StreamPosition",
    "Tidings",
    "TidingsError",
    "create_app",
    "create_broker",
    "get_hub",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'tidings' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
