"""CPU seconds of a process tree from /proc (Linux): what the benchmarks' CPU samplers read."""

from __future__ import annotations

import os

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_tree(root: int) -> dict[int, tuple[str, float]]:
    """pid -> (start time, user + system CPU seconds) of `root` and all its descendants now.

    The start time tells a reused pid apart from the process that had it before."""
    stats: dict[int, tuple[int, str, float]] = {}  # pid -> (parent pid, start time, CPU s)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                text = fh.read().decode(errors="replace")
        except OSError:
            continue
        rest = text[text.rfind(")") + 2 :].split()  # the fields after the command name
        stats[int(entry)] = (int(rest[1]), rest[19], (int(rest[11]) + int(rest[12])) / TICK)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        if pid in stats:
            out[pid] = stats[pid][1:]
        frontier.extend(children.get(pid, []))
    return out
