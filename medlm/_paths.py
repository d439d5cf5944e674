import hashlib
import os

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
