"""A stop asked by a signal: the CLI's SIGTERM handler records it here too, since its
``KeyboardInterrupt`` is lost when it lands in a ``__del__`` or a gc callback; the training, sweep
and search loops call ``raise_if_asked()`` at each step."""

_asked: str | None = None  # what asked to stop (the signal's name), until cleared


def ask(reason: str) -> None:
    """Record a stop; safe to call from a signal handler."""
    global _asked
    _asked = reason


def raise_if_asked() -> None:
    if _asked is not None:
        raise KeyboardInterrupt(_asked)


def clear() -> None:
    """Forget a stop once the command that was asked has ended."""
    global _asked
    _asked = None
