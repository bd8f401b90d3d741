"""One status line for long jobs: done/total, rate, elapsed, ETA; redrawn on a terminal, else every 5%."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, unit: str = "items", label: str = "", stream=None):
        self.total, self.unit, self.label = total, unit, label
        self.stream = stream or sys.stderr
        self.started = time.perf_counter()
        self.tty = self.stream.isatty()
        self.every = max(1, total // 20)
        self._last = -1

    def update(self, done: int, rate_count: int | None = None, extra: str = "") -> None:
        """`rate_count` is what the rate counts (default: done); `extra` is appended (e.g. the loss)."""
        step_mark = done // self.every
        if not self.tty and step_mark == self._last and done != self.total:
            return
        self._last = step_mark
        elapsed = time.perf_counter() - self.started
        rate = (done if rate_count is None else rate_count) / max(elapsed, 1e-9)
        eta = elapsed / done * (self.total - done) if done else 0.0
        line = (
            f"{self.label}{done}/{self.total} {extra}{rate:.0f} {self.unit}/s "
            f"elapsed {elapsed / 60:.1f}m eta {eta / 60:.1f}m"
        )
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and done == self.total:
            self.stream.write("\n")
        self.stream.flush()
