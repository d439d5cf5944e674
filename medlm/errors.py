class MedLMError(Exception):
    """A mistake the user can fix (bad path, column, flag or model).

    The message is one line that names the bad value and what was expected; the CLIs print it as
    ``error: <message>`` and exit with status 2, without a traceback. Bugs raise anything else.
    """


def first_line(error: BaseException) -> str:
    """A library error's first line, for a one-line message (its type when it says nothing)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
