"""The tutorial's task board on tidings: logins, persisted tasks, a live page for several users.

    npm ci --prefix examples/taskboard           # the centrifuge SDK the page loads
    python -m examples.taskboard add-user alice --password secret
    python -m examples.taskboard serve [--port 8000]

See app.py for the endpoints and README.md ("The task board") for the walk-through.
"""

from .app import create_app
from .config import BoardSettings

__all__ = ["BoardSettings", "create_app"]
