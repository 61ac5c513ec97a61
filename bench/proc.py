"""What the kernel says about a process: RSS, peak RSS and CPU time (Linux /proc)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for {pid}")


def rss(pid: int) -> int:
    """Resident set size now, in bytes."""
    return _status(pid, "VmRSS")


def hwm(pid: int) -> int:
    """Peak resident set size (VmHWM), in bytes, since start or the last reset_hwm."""
    return _status(pid, "VmHWM")


def reset_hwm(pid: int) -> bool:
    """Reset VmHWM to the current RSS (clear_refs "5"; needs the right to write it)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return hwm(pid) <= rss(pid) + 4 * 1024 * 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    # After the comm field: state is fields[0], utime and stime are fields 14 and 15 of stat(5).
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class RssSampler:
    """Samples VmRSS every `interval` seconds in a thread (a check on VmHWM, and a curve)."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.perf_counter()
        while not self._stop.is_set():
            try:
                self.samples.append((time.perf_counter() - start, rss(self.pid)))
            except (OSError, RuntimeError):
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def peak(self) -> int:
        return max((s for _, s in self.samples), default=0)
