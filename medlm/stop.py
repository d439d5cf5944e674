"""A stop asked by a signal, kept where the loops look for it.

The CLI's SIGTERM handler raises ``KeyboardInterrupt``; when the signal lands while Python runs
a ``__del__`` or a garbage-collector callback, that raise is printed as "Exception ignored ..."
and lost, the work goes on, and a scheduler's SIGKILL after its grace period would leave the
MLflow run RUNNING. So the handler records the stop here too, and the training loop (after each
optimizer step, before each epoch), the sweep (before each run) and the search (after each
trial) call ``raise_if_asked()``: a lost raise still stops the work at the next of them.
"""

from __future__ import annotations

_asked: str | None = None  # what asked to stop (the signal's name), until cleared


def ask(reason: str) -> None:
    """Record a stop; safe to call from a signal handler."""
    global _asked
    _asked = reason


def raise_if_asked() -> None:
    """``KeyboardInterrupt(reason)`` once a stop was asked, as the signal's own raise would."""
    if _asked is not None:
        raise KeyboardInterrupt(_asked)


def clear() -> None:
    """Forget a stop once the command that was asked has ended."""
    global _asked
    _asked = None
