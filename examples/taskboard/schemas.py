"""What the REST API accepts and returns, and what it publishes (pydantic models).

Every request model forbids unknown fields, so a typo is a 422 naming the field rather than a
change silently ignored.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Title = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Description = Annotated[str, StringConstraints(strip_whitespace=True, max_length=2000)]
UserName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,32}$")]


class TaskCreate(BaseModel):
    """``POST /tasks``: ``title`` 1-200 characters (trimmed), ``description`` up to 2000,
    ``assignee`` an existing user name or null."""

    model_config = ConfigDict(extra="forbid")

    title: Title
    description: Description = ""
    assignee: UserName | None = None


class TaskPatch(BaseModel):
    """``PATCH /tasks/{id}``: the ``version`` the client last saw (409 if the task has moved
    on since), and the fields to change; absent fields stay as they are, ``assignee: null``
    unassigns."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1)
    done: bool | None = None
    assignee: UserName | None = None
    title: Title | None = None
    description: Description | None = None


class TaskOut(BaseModel):
    id: int
    title: str
    description: str
    done: bool
    assignee: str | None
    created_by: str
    created_at: datetime
    updated_at: datetime
    version: int = Field(description="1 when created, +1 on every change and on deletion.")


class TaskEvent(BaseModel):
    """A publication in the ``tasks`` channel. Delivery is at least once (see outbox.py), so a
    client applies an event only when ``version`` is newer than what it has for ``id``."""

    type: Literal["task.created", "task.updated", "task.deleted"]
    id: int
    version: int
    by: str
    task: TaskOut | None = Field(None, description="The task after the change (null: deleted).")


class Notification(BaseModel):
    """A publication in ``notifications:#<user>``: only that user can subscribe to it."""

    type: Literal["task.assigned"]
    by: str
    task: TaskOut


class TokenOut(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int = Field(description="Seconds until the token expires.")


class UserOut(BaseModel):
    name: str
