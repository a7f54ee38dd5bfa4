"""Benchmarks of tidings against the shared peers: ``python -m bench --help``."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    """The shared harness (fanout.py, run_matrix.py, peers/): ``$TIDINGS_BENCH_SHARED``, else
    ``../shared/bench`` next to the repository root, else two levels up (a git worktree kept
    in a subdirectory of the checkout's parent, as ``wt/NAME``)."""
    given = os.environ.get("TIDINGS_BENCH_SHARED")
    if given:
        return Path(given).resolve()
    for candidate in (ROOT / ".." / "shared" / "bench", ROOT / ".." / ".." / "shared" / "bench"):
        if (candidate / "fanout.py").is_file():
            return candidate.resolve()
    return (ROOT / ".." / "shared" / "bench").resolve()
