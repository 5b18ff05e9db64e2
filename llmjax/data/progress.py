"""A one-line progress report on stderr, for tools that read a whole corpus."""

import sys
import time


class Progress:
  """Counts items (and bytes) and redraws `desc: 1,234/5,000 docs 12.3 MB 45.6k docs/s` in place
  at most every `interval` seconds (a non-terminal stream: a plain line, 20 times less often)."""

  def __init__(self, desc: str, total: int | None = None, unit: str = "docs",
               interval: float = 0.25, stream=None):
    self.desc, self.total, self.unit, self.stream = desc, total, unit, stream or sys.stderr
    self.count, self.bytes, self.start = 0, 0, time.perf_counter()
    self.tty = getattr(self.stream, "isatty", lambda: False)()
    self.interval = interval if self.tty else interval * 20
    self._last = 0.0

  def update(self, n: int = 1, nbytes: int = 0) -> None:
    self.count, self.bytes = self.count + n, self.bytes + nbytes
    if time.perf_counter() - self._last >= self.interval:
      self._draw()

  def _line(self) -> str:
    elapsed = max(time.perf_counter() - self.start, 1e-9)
    bar, done = "", f"{self.count:,}"
    if self.total:
      filled = int(20 * min(self.count / self.total, 1.0))
      bar, done = "[" + "#" * filled + "." * (20 - filled) + "] ", f"{done}/{self.total:,}"
    size = f" {self.bytes / 1e6:.1f} MB" if self.bytes else ""
    return (f"{self.desc}: {bar}{done} {self.unit}{size} "
            f"{self.count / elapsed / 1e3:.1f}k {self.unit}/s {elapsed:.0f} s")

  def _draw(self, end: str = "") -> None:
    self._last = time.perf_counter()
    self.stream.write("\r" + self._line() + end if self.tty else self._line() + "\n")
    self.stream.flush()

  def close(self) -> None:
    self._draw(end="\n")
