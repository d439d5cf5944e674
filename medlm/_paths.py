import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from medlm.errors import MedLMError

try:
    import fcntl
except ImportError:  # Windows: no locks
    fcntl = None


def looks_like_local_path(value: str) -> bool:
    """Plainly a local path, not a Hub id (``name``, ``owner/name``): a typo fails at once."""
    return (value.startswith(("/", ".", "~")) or value.count("/") > 1
            or os.sep != "/" and os.sep in value
            or value.lower().endswith((".csv", ".tsv", ".parquet", ".json", ".jsonl", ".gguf")))


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def check_writable(path: str | os.PathLike, what: str) -> None:
    """``path`` is a directory MedLM can write in or create (tried in its nearest existing
    ancestor: ``os.access`` cannot tell for root or a read-only mount); ``what`` names it."""
    path = os.path.abspath(path)  # as the writer will open it (no ~ expansion)
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if os.path.islink(existing) and not os.path.exists(existing):
        problem = f"{existing!r} is a link to nothing"
    elif not os.path.isdir(existing):
        problem = f"{existing!r} is a file"
    else:
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".medlm-write-check-", dir=existing))
            return
        except OSError:
            problem = f"{existing!r} is not writable (permissions or a read-only filesystem)"
    raise MedLMError(f"{what} {path!r} cannot be written: {problem}: expected a directory "
                     "MedLM can create and write in")


def scratch_directory(parent: Path, prefix: str) -> tempfile.TemporaryDirectory:
    """A temporary directory in ``parent``, those a killed process left (over an hour ago) gone."""
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f"{prefix}*"):
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    return tempfile.TemporaryDirectory(dir=parent, prefix=prefix, ignore_cleanup_errors=True)


def lock_file(path: str | os.PathLike, wait: bool = True) -> int | None:
    """An exclusive lock on ``path`` (made if missing) until its descriptor closes; None where
    none can be taken (go on without); ``wait=False``: ``BlockingIOError`` at once if held."""
    if fcntl is None:
        return None
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return descriptor
    except OSError as error:  # BlockingIOError: held; ENOLCK, ENOSYS: no locks here
        os.close(descriptor)
        if isinstance(error, BlockingIOError):
            raise
        return None


def is_sweep_directory(directory: Path) -> bool:
    """A sweep's own directory: its children's data (``data.json``), no run's ``config.json``."""
    return (directory / "data.json").is_file() and not (directory / "config.json").is_file()
