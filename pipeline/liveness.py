"""Is the process that opened a run or a trial still alive? (host, pid, start time)

A SIGKILLed or OOM-killed process cannot close what it opened: its MLflow run stays
RUNNING, its Optuna trial too. Whoever starts next on the same host checks the recorded
process and closes what a dead one left. The start time tells a reused pid apart.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any


def this_process() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": start_time(os.getpid())}


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def is_alive(process: dict[str, Any]) -> bool:
    """Whether the recorded process (this_process() of some earlier moment) still runs.
    Only meaningful on its own host; other hosts' processes count as alive (unknowable)."""
    if process.get("host") != socket.gethostname():
        return True
    try:
        pid = int(process.get("pid", -1))
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError, TypeError):
        return True  # exists but not ours, or unreadable: do not guess
    started = process.get("started")
    return started is None or start_time(pid) in (None, str(started))
