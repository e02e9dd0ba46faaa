"""What every benchmark report records about its run: the machine, the versions, the commit, the date.

``machine(**extra)`` is the ``machine`` object of a benchmark's JSON; each benchmark adds the versions
that matter to it (``numba=...``, ``pyzmq=...``). ``write_report`` writes the JSON.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def git(*args: str) -> str | None:
    """The output of a git command in the repository, or None without git or a repository."""
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def machine(**extra: Any) -> dict[str, Any]:
    """Platform, processor, CPUs, Python, NumPy and OpenCV versions, the git commit (and whether the
    tracked files differ from it), the date; then ``extra``."""
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "date": now(),
    } | extra


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write a benchmark's JSON report to ``path`` (its folder made as needed) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path}")
