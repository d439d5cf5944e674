import hashlib
import os
import tempfile
from pathlib import Path

from medlm.errors import MedLMError

try:
    import fcntl
except ImportError:  # Windows: no locks, as before MedLM took any
    fcntl = None

_FILE_SUFFIXES = (".csv", ".tsv", ".parquet", ".json", ".jsonl", ".gguf")


def looks_like_local_path(value: str) -> bool:
    """True when ``value`` is plainly meant as a local path rather than a Hub id.

    Hub ids are ``name`` or ``owner/name``; anything starting with ``/ . ~``, with more than one
    separator, or ending in a data/model file suffix is a path, so a typo fails at once with
    "not found" instead of after the Hub client's retries.
    """
    return (
        value.startswith(("/", ".", "~"))
        or value.count("/") > 1
        or os.sep != "/" and os.sep in value
        or value.lower().endswith(_FILE_SUFFIXES)
    )


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_writable(path: str | os.PathLike, what: str) -> None:
    """``path`` is a directory MedLM can write in, or one it can create: its nearest existing
    ancestor is a writable directory, tried with a directory made and removed there (a run that
    fails on its data later leaves no empty directories). ``what`` names the flag or variable,
    for the error."""
    path = os.path.abspath(path)  # as the writer will open it (no ~ expansion)
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if os.path.islink(existing) and not os.path.exists(existing):
        problem = f"{existing!r} is a link to nothing"
    elif not os.path.isdir(existing):
        problem = f"{existing!r} is a file"
    elif not os.access(existing, os.W_OK | os.X_OK) or not _can_create_in(existing):
        problem = f"{existing!r} is not writable (permissions or a read-only filesystem)"
    else:
        return
    raise MedLMError(f"{what} {path!r} cannot be written: {problem}: expected a directory "
                     "MedLM can create and write in")


def _can_create_in(directory: str) -> bool:
    """A directory made (and removed) in ``directory``: what ``os.access`` cannot tell for root,
    or for a filesystem that refuses it (``/proc``, a read-only mount)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".medlm-write-check-", dir=directory))
    except OSError:
        return False
    return True


def lock_file(path: str | os.PathLike, wait: bool = True) -> int | None:
    """An exclusive lock on the file ``path`` (made, with its directory, if missing), held
    until the returned descriptor is closed or the process ends, a SIGKILL included. None where
    no lock can be taken (Windows, a filesystem without locks, a directory this process may not
    write): the caller goes on without, as MedLM did before it locked anything. ``wait=False``:
    ``BlockingIOError`` at once while another process holds it."""
    if fcntl is None:
        return None
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError as error:  # BlockingIOError: held; ENOLCK, ENOSYS: no locks here
        os.close(descriptor)
        if isinstance(error, BlockingIOError):
            raise
        return None
    return descriptor


def is_sweep_directory(directory: Path) -> bool:
    """A sweep's own directory beside its children's checkpoints: the data they train on
    (``data.json``) and no settings (a run's ``config.json``): its parent run has those."""
    return (directory / "data.json").is_file() and not (directory / "config.json").is_file()
