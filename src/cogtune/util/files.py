"""Files written so that readers see all or nothing, and content hashes: the generic file I/O
every stage and tool shares.

A full disk (or quota, or file size limit) becomes a CogtuneError that says how to continue:
everything written before stays valid.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path

from cogtune.errors import CogtuneError, first_line


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


_UMASK = os.umask(0)
os.umask(_UMASK)


TEMP_SUFFIX = ".tmp"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # disk full, quota exceeded, file size limit


def atomic_write(path: Path, write: callable) -> None:
    """Call write(temp_path), fsync, then rename over path, so readers see all or nothing.

    A full disk (or quota) leaves no temp file behind and becomes a CogtuneError that says how to
    continue: everything written before stays valid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        write(temp)
        publish(Path(temp), path)  # (mkstemp creates 0600: publish gives the usual permissions)
    except BaseException as e:
        Path(temp).unlink(missing_ok=True)
        raise_if_no_space(e, path)
        raise


def canonical_safetensors(path: Path) -> None:
    """Rewrite a safetensors file's header in one order (its metadata sorted by key, its tensors by
    where their bytes lie), so that the same tensors and metadata are the same file: the safetensors
    library writes the metadata from a hash map, in an order that changes from process to process.
    The tensor bytes are not touched (their offsets are relative to the end of the header)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        data = f.read()
    metadata = header.pop("__metadata__", None)
    ordered = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    ordered.update(sorted(header.items(), key=lambda item: (item[1]["data_offsets"], item[0])))
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the header is padded to 8 bytes, as safetensors pads it
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + data)


def publish(temp: Path, path: Path) -> None:
    """Move a finished file written by a library (temp) into place as atomic_write would: fsynced,
    with the usual permissions (a library's temp files may be 0600), then renamed."""
    with open(temp, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(temp, 0o666 & ~_UMASK)
    os.replace(temp, path)


def raise_if_no_space(error: BaseException, path: Path) -> None:
    """A full disk (or quota), also wrapped in a library's error type, as a CogtuneError that says
    how to continue; anything else is left to the caller."""
    if _is_no_space(error):
        raise CogtuneError(
            f"No space left writing {path} ({_strerror(error)}). Everything written before it is intact: free some "
            "space (or choose another folder) and run the same command again to continue where it stopped."
        ) from None


def _is_no_space(error: BaseException) -> bool:
    """An OSError for a full disk, also when a library wrapped it in its own error type."""
    if isinstance(error, OSError) and error.errno in NO_SPACE:
        return True
    text = str(error).lower()
    return any(words in text for words in ("no space left", "disk quota", "file too large"))


def _strerror(error: BaseException) -> str:
    return error.strerror if isinstance(error, OSError) and error.strerror else first_line(error)


def ensure_writable_dir(folder: Path, flag: str) -> None:
    """Create folder if needed and prove it writable, before any expensive work starts."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # A probe of a new name, created exclusively and never through a symlink: a file another
        # user planted in a shared folder (a link to one of theirs) is never opened, let alone truncated.
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CogtuneError(f"Cannot write to {flag} {folder}: {e.strerror}. Pick a writable folder.") from None


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda temp: Path(temp).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))




def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda temp: Path(temp).write_text(text))
