"""tidings: real-time channels for Python."""

from .app import HubDep, Tidings, create_app, get_hub
from .brokers import Broker, ClientInfo, Publication, StreamPosition, create_broker
from .config import ChannelOptions, Settings
from .errors import Disconnect, TidingsError
from .hub import Hub
from .session import Session

__version__ = "0.1.0"

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
