class MedLMError(Exception):
    """A mistake the user can fix: a one-line message naming the bad value and what was
    expected; the CLIs print it as ``error: <message>`` and exit 2, without a traceback."""


def first_line(error: BaseException) -> str:
    """A library error's first line (its type when it says nothing)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class DiskFull(MedLMError):
    """A write that ran out of space: ``failed`` says where and what, ``kept`` what survives."""

    def __init__(self, failed: str, kept: str = ""):
        super().__init__(f"{failed}: {kept}{': ' * bool(kept)}expected free space there")
        self.failed = failed


def shorten(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."
