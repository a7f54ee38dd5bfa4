"""Is this process one of several worker processes serving the same listening socket?

A process-local broker (``memory://``) behind a pre-fork server (``uvicorn --workers N``,
``gunicorn -w N -k uvicorn.workers.UvicornWorker``, ...) is N separate hubs behind one port: a
publication made over HTTP reaches only the subscribers of the worker that took the request,
and nothing says so. Pre-fork servers bind the listening socket once, in the supervisor, and
hand it to every worker; the workers are then *sibling* processes (children of one parent)
holding the *same* socket. That is what :func:`sharing_siblings` looks for.

The supervisor itself (uvicorn's parent process, gunicorn's arbiter, ``uvicorn --reload``'s
file watcher) holds the socket too, but it is this process's parent, not a sibling: a single
worker and ``--reload`` are not mistaken for several workers. Workers that each bind their own
socket with ``SO_REUSEPORT`` (``tidings serve --workers``) share no socket and are not seen:
``tidings serve`` refuses ``--workers`` > 1 with a process-local broker before starting any.

Linux only (it reads ``/proc``); elsewhere nothing is detected. Reading another process's
``/proc/PID/fd`` needs the same user (or privileges), which sibling workers have.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

PROC = Path("/proc")


def _socket_inode(link: str) -> int | None:
    # /proc/PID/fd/N -> "socket:[12345]" for a socket
    if link.startswith("socket:[") and link.endswith("]"):
        return int(link[8:-1])
    return None


def _fd_links(pid: int | str) -> dict[int, str]:
    """fd -> link target of every descriptor of ``pid`` that can be read (others skipped)."""
    base = PROC / str(pid) / "fd"
    links: dict[int, str] = {}
    try:
        names = os.listdir(base)
    except OSError:
        return links
    for name in names:
        with contextlib.suppress(OSError, ValueError):
            links[int(name)] = os.readlink(base / name)
    return links


def _listening(fd: int) -> bool:
    try:
        dup = os.dup(fd)
    except OSError:
        return False
    try:
        sock = socket.socket(fileno=dup)  # takes ownership of dup: closed below
    except OSError:
        os.close(dup)
        return False
    with sock:
        try:
            return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        except OSError:
            return False


def listening_sockets() -> set[int]:
    """Inodes of the listening sockets this process holds (empty off Linux)."""
    inodes: set[int] = set()
    for fd, link in _fd_links("self").items():
        inode = _socket_inode(link)
        if inode is not None and inode not in inodes and _listening(fd):
            inodes.add(inode)
    return inodes


def siblings() -> list[int]:
    """Pids of the other children of this process's parent (empty if unknown)."""
    me, parent = os.getpid(), os.getppid()
    if parent <= 1:  # a container's init, or orphaned: no pre-fork supervisor above us
        return []
    pids: set[int] = set()
    tasks = PROC / str(parent) / "task"
    read = False
    with contextlib.suppress(OSError):
        # every thread's children: a supervisor may start workers from any thread
        for task in os.listdir(tasks):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(p) for p in (tasks / task / "children").read_text().split())
                read = True
    if not read:  # a kernel without CONFIG_PROC_CHILDREN
        pids = set(_children_by_scan(parent))
    pids.discard(me)
    return sorted(pids)


def _children_by_scan(parent: int) -> list[int]:
    """Children of ``parent`` from every ``/proc/PID/stat`` (kernels without ``children``)."""
    found = []
    for name in os.listdir(PROC) if PROC.is_dir() else ():
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (PROC / name / "stat").read_text()
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            if ppid == parent:
                found.append(int(name))
    return found


def sharing_siblings(inodes: set[int] | None = None) -> list[int]:
    """Pids of sibling processes that hold one of ``inodes`` (default: this process's
    listening sockets): the other workers of a pre-fork server. Empty when there are none,
    when this process listens on nothing yet, or off Linux."""
    if inodes is None:
        inodes = listening_sockets()
    if not inodes:
        return []
    sharing = []
    for pid in siblings():
        if any(_socket_inode(link) in inodes for link in _fd_links(pid).values()):
            sharing.append(pid)
    return sharing
