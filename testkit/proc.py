"""What the kernel says about a process, for the benchmarks' CPU accounting (Linux /proc)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

__all__ = ["cpu_seconds", "write_calls"]

_TICKS: Final = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (0 when it is gone)."""
    try:
        # The command name (field 2) may hold spaces and parentheses: split after the last ")".
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def write_calls(pid: int) -> int:
    """The `write`-family system calls a process has made so far (`syscw` of /proc/PID/io:
    write, writev, not send/sendto; 0 when it is gone or not readable)."""
    try:
        text = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == "syscw":
            return int(value)
    return 0
