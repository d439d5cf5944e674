class MedLMError(Exception):
    """A mistake the user can fix (bad path, column, flag or model).

    The message is one line that names the bad value and what was expected; the CLIs print it as
    ``error: <message>`` and exit with status 2, without a traceback. Bugs raise anything else.
    """


def first_line(error: BaseException) -> str:
    """A library error's first line, for a one-line message (its type when it says nothing)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class DiskFull(MedLMError):
    """A write that ran out of space: ``failed`` says where and what, ``kept`` what of the run
    survives; the caller that knows how the run goes on (``recipe.resumable_failures``, the
    search) adds that."""

    def __init__(self, failed: str, kept: str = ""):
        super().__init__(f"{failed}: {kept}{': ' * bool(kept)}expected free space there")
        self.failed = failed


def shorten(text: str, width: int = 60) -> str:
    """``text`` cut to ``width`` characters (with "...") for a one-line message."""
    return text if len(text) <= width else text[:width - 3] + "..."
