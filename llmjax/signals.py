"""SIGINT and SIGTERM: an exit at once before training starts, a stop at a step boundary in it.

`python -m llmjax.main` calls `install()` before anything heavy is imported. Until the loop
calls `deferred()`, a signal exits at once (status 130 for SIGINT, 143 for SIGTERM) without
unwinding: nothing needs saving, and an exception raised into JAX's initialization or a compile
can crash the interpreter or be swallowed. In training it is only recorded; the loop saves the
step in flight and stops, and the program exits with the same status; a second signal exits at
once. Without `install()` (a library user) KeyboardInterrupt stays, except while the loop
steps: then signals are recorded."""

import os
import signal
import sys

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {"installed": False, "deferred": False, "received": None}


def exit_status(name: str) -> int:
  """The shell's status for a process stopped by signal `name`: 130 (SIGINT), 143 (SIGTERM)."""
  return 128 + signal.Signals[name].value


def _handle(signum, frame):
  name = signal.Signals(signum).name
  if _state["deferred"] and _state["received"] is None:
    _state["received"] = name
    return
  why = ("again: exiting now, without saving" if _state["received"] else
         "before training started: exiting, nothing to save" if not _state["deferred"] else "")
  sys.stderr.write(f"\n{name} {why}\n")
  sys.stderr.flush()
  os._exit(exit_status(name))


def install() -> None:
  """Signals exit at once from now on, until `deferred()`."""
  for s in SIGNALS:
    signal.signal(s, _handle)
  _state.update(installed=True, deferred=False)


def deferred(on: bool = True) -> None:
  """From now on (while `on`) a signal is recorded for the loop instead of exiting."""
  if on == _state["deferred"]:
    return
  _state["deferred"] = on
  if on and not _state["installed"]:  # a library user's process: only while the loop steps
    _state["old"] = {s: signal.signal(s, _handle) for s in SIGNALS}
  elif not on and "old" in _state:
    for s, handler in _state.pop("old").items():
      signal.signal(s, handler)


def received() -> str | None:
  """The name of the signal recorded while deferred (SIGINT / SIGTERM), if any."""
  return _state["received"]


def clear() -> None:
  _state["received"] = None
