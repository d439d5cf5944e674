"""Which process ran a piece of work, told well enough to say later that it is gone: a search's
trial left RUNNING in a journal file (which has no heartbeat) by a process that was killed.

A process is named by its host, this boot of it, its PID namespace, its PID and its start time,
so a PID reused after a restart, or the same PID in another container on the host, is not taken
for the process that is gone."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _started(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), or "" where unknown."""
    stat = _read(f"/proc/{pid}/stat")
    return stat.rpartition(")")[2].split()[19] if stat else ""  # field 22: after the name


def _machine() -> str:
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}|{_read('/proc/sys/kernel/random/boot_id')}|{namespace}"


def this_process() -> str:
    """This process's name, to keep beside the work it does."""
    return f"{_machine()}|{os.getpid()}|{_started(os.getpid())}"


def is_gone(name: str) -> bool:
    """True only for a process of this machine (same host, boot and PID namespace) that is no
    longer running: its PID is free or now another process's, or it is this process (which,
    asking, is not running that work). Another machine's, or an unreadable name: False."""
    parts = name.split("|")
    if len(parts) != 5 or "|".join(parts[:3]) != _machine() or not parts[3].isdigit():
        return False
    pid, started = int(parts[3]), parts[4]
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: alive
        return False
    now = _started(pid)  # "" where unreadable (hidepid): then alive, as far as can be told
    return bool(started) and bool(now) and now != started
