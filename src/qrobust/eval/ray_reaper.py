"""Watchdog for a local Ray instance: when its driver dies, kill what Ray left behind.

Run as a script (standard library only, so it starts in milliseconds):
``python ray_reaper.py DRIVER_PID [EXCLUDED_PID ...]``, with a pipe from the driver on stdin.
Ray's own reaper stops the GCS and the raylet when a driver is killed with SIGKILL, but the
raylet's dashboard and runtime-env agents then retry the dead GCS for minutes. This process
follows every Ray process (its command line names ray) that appears under the driver, not
entering the children it already had (``EXCLUDED_PID``), and when the pipe closes, which the
kernel does however the driver ends, sends them SIGTERM and, after a grace period, SIGKILL.
Processes are known by (pid, start time), so a recycled pid is never signalled. Linux only
(it reads /proc).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time

POLL_S = 0.2
GRACE_S = 3.0


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == b"Z":  # a zombie has exited; only its parent's wait is left
        return None
    return int(fields[1]), int(fields[19])


def processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time) of every live process."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            table[int(name)] = st
    return table


def descendants(roots: set[int], table: dict[int, tuple[int, int]],
                excluded: set[int]) -> set[int]:
    """Every process below ``roots`` in ``table``, not entering ``excluded`` subtrees."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found and child not in excluded:
                found.add(child)
                todo.append(child)
    return found


def is_ray(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"ray" in f.read()
    except OSError:
        return False


def reap(tracked: dict[int, int]) -> None:
    """SIGTERM, then after ``GRACE_S`` SIGKILL, every tracked process still alive."""
    def alive() -> list[int]:
        return [p for p, start in tracked.items() if (st := _stat(p)) and st[1] == start]

    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 0.0)):
        for pid in alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)


def watch(driver: int, excluded: set[int]) -> None:
    excluded = {*excluded, os.getpid()}  # this process is the driver's child too
    tracked: dict[int, int] = {}  # pid -> start time
    while True:
        table = processes()
        for pid in descendants({driver, *tracked}, table, excluded) - tracked.keys():
            if is_ray(pid):
                tracked[pid] = table[pid][1]
        ready, _, _ = select.select([sys.stdin.buffer], [], [], POLL_S)
        if ready and not os.read(sys.stdin.fileno(), 4096):  # EOF: the driver is done or dead
            reap(tracked)
            return


if __name__ == "__main__":
    watch(int(sys.argv[1]), {int(p) for p in sys.argv[2:]})
