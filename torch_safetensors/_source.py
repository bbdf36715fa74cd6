"""What a source holds: one place that opens files for every loader and the CLI.

Every file a loader opens may be a FIFO, a socket or a device planted by whoever made
the directory. Files are opened once, with ``O_NONBLOCK`` (opening a FIFO for reading
would otherwise wait for a writer forever), checked with ``fstat`` to be regular files,
and read with bounded reads: JSON documents (indexes) are checked against a size limit
before a byte is read, so a 4 GiB sparse index or a link to ``/dev/zero`` fails at once.

This module builds only on the C core and ``_core``; the loaders (``_torch``,
``_sharded``, ``distributed``, the CLI) ask it, never each other, what a path holds.
"""
from __future__ import annotations

import errno
import os
import re
import stat
from typing import Optional, Tuple, Union

from . import _C, _core
from ._core import SafetensorError

__all__ = [
    "MAX_JSON_BYTES",
    "INDEX_SUFFIX",
    "LEGACY_INDEX_SUFFIX",
    "open_regular",
    "open_path",
    "read_head",
    "read_json_bytes",
    "open_reader",
    "is_index_head",
    "find_checkpoint",
]

PATH = Union[str, bytes, "os.PathLike[str]"]

MAX_JSON_BYTES = 100_000_000  # the same bound as a safetensors header
SNIFF_BYTES = 4096
DEFAULT_PREFIX = "model"
INDEX_SUFFIX = ".safetensors.index.json"
# Hugging Face's legacy (pickle) sharded layout, as transformers names it
LEGACY_SINGLE = "pytorch_model.bin"
LEGACY_INDEX_SUFFIX = ".bin.index.json"
LEGACY_INDEX = LEGACY_SINGLE + ".index.json"

_ANY_SHARD = re.compile(r".+-\d{5,}-of-\d{5,}\.safetensors")
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


def fspath(path: PATH) -> str:
    """A path as a str (bytes decoded as the file system does)."""
    p = os.fspath(path)
    return os.fsdecode(p) if isinstance(p, bytes) else p


def _what(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a regular file"


def not_regular(path: str, mode: int) -> SafetensorError:
    """The error for a special file where a checkpoint file was expected."""
    return _core.error(
        f"{path}: not a regular file ({_what(mode)}); refusing to read it as a checkpoint",
        "not_regular_file",
    )


def open_regular(path: PATH, *, missing: Optional[str] = None) -> Tuple[int, os.stat_result]:
    """Opens a regular file for reading, never blocking; returns (fd, fstat).

    Args:
        path: the file.
        missing: the message of the FileNotFoundError raised when it does not exist.

    Returns:
        An open descriptor (the caller closes it) and its ``fstat``.

    Raises:
        SafetensorError: it is a FIFO, a socket or a device (code ``not_regular_file``).
        IsADirectoryError: it is a directory.
        FileNotFoundError: it does not exist.
        OSError: it cannot be opened.
    """
    p = fspath(path)
    try:
        fd = os.open(p, _OPEN_FLAGS)
    except FileNotFoundError:
        if missing is None:
            raise
        raise FileNotFoundError(errno.ENOENT, missing, p) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", p)
        if not stat.S_ISREG(st.st_mode):
            raise not_regular(p, st.st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def open_path(path: PATH) -> Tuple[int, os.stat_result]:
    """Opens an explicit path for torch.load, never blocking; returns (fd, fstat).

    Regular files and devices are returned (torch reads devices, so a device path
    torch accepts keeps working); a FIFO or a socket is refused at once: torch would
    wait for a writer and then fail to seek.

    Raises:
        SafetensorError: a FIFO or a socket (code ``not_regular_file``).
        OSError: it cannot be opened.
    """
    p = fspath(path)
    fd = os.open(p, _OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
            raise not_regular(p, st.st_mode)
        if not stat.S_ISREG(st.st_mode):
            # torch reads it by path and blocks as it would; this descriptor only sniffs
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_head(path: PATH, n: int = SNIFF_BYTES) -> bytes:
    """The first n bytes of a regular file (fewer if it is shorter).

    Raises:
        SafetensorError, OSError: as :func:`open_regular`.
    """
    fd, _ = open_regular(path)
    try:
        return os.pread(fd, n, 0)
    finally:
        os.close(fd)


def _read_exactly(fd: int, size: int) -> bytes:
    parts = []
    pos = 0
    while pos < size:
        chunk = os.pread(fd, min(size - pos, 1 << 24), pos)
        if not chunk:
            break
        parts.append(chunk)
        pos += len(chunk)
    return b"".join(parts)


def read_json_bytes(path: PATH, *, what: str, limit: int = MAX_JSON_BYTES,
                    missing: Optional[str] = None) -> bytes:
    """The bytes of a JSON document, checked against a size limit before reading.

    Args:
        path: the file.
        what: what the document is, for messages (``"sharded checkpoint index"``).
        limit: the most bytes accepted.
        missing: the message of the FileNotFoundError raised when it does not exist.

    Returns:
        At most ``limit`` bytes: the whole file.

    Raises:
        SafetensorError: larger than ``limit`` (code ``too_large``), or a special file.
        OSError: it cannot be read.
    """
    p = fspath(path)
    fd, st = open_regular(p, missing=missing)
    try:
        if st.st_size > limit:
            raise _core.error(
                f"{p}: not a valid {what}: {st.st_size} bytes, larger than the limit of {limit} bytes",
                "too_large",
            )
        data = _read_exactly(fd, st.st_size)
        # a file that grew since fstat is read only up to the limit
        if len(data) == st.st_size and os.pread(fd, 1, st.st_size):
            grown = os.fstat(fd).st_size
            if grown > limit:
                raise _core.error(f"{p}: not a valid {what}: it grew past the limit of {limit} bytes "
                                  "while being read", "too_large")
            data = _read_exactly(fd, grown)
        return data
    finally:
        os.close(fd)


def open_reader(path: PATH, mmap: Optional[bool], missing: Optional[str] = None) -> "_C.Reader":
    """A validated safetensors reader over a regular file; errors name the file.

    Raises:
        SafetensorError: malformed, or a special file (named).
        FileNotFoundError: missing (with ``missing`` as the message when given).
        MemoryError: it cannot be mapped (the message names ``vm.max_map_count`` and
            ``mmap=False``).
    """
    p = fspath(path)
    fd, _ = open_regular(p, missing=missing)
    try:
        try:
            return _C.Reader(fd=fd, mmap=mmap is not False)
        except SafetensorError as e:
            raise named(p, e) from None
        except MemoryError as e:
            if "vm.max_map_count" in str(e):
                raise MemoryError(f"{p}: {e}") from None
            raise
    finally:
        os.close(fd)


def named(path: str, err: SafetensorError) -> SafetensorError:
    """The same error with the file's path in front (keeping code, tensor, position)."""
    new = _core.error(f"{path}: {err}", getattr(err, "code", "error"), getattr(err, "tensor", None))
    new.position = getattr(err, "position", None)
    return new


def is_index_head(head: bytes) -> bool:
    """Whether the first bytes of a file that is not safetensors look like a JSON index."""
    return head.lstrip(b" \t\r\n\xef\xbb\xbf")[:1] == b"{"


def sniff_path(path: PATH) -> str:
    """What a regular file holds, by its first bytes and name.

    Returns:
        ``"safetensors"``, ``"index"`` (a JSON document: a sharded checkpoint index),
        or ``"other"`` (a legacy checkpoint, or anything else).

    Raises:
        SafetensorError, OSError: as :func:`open_regular`.
    """
    p = fspath(path)
    fd, st = open_regular(p)
    try:
        head = os.pread(fd, SNIFF_BYTES, 0)
    finally:
        os.close(fd)
    if _C.sniff(head, st.st_size):
        return "safetensors"
    if p.endswith(INDEX_SUFFIX) or p.endswith(LEGACY_INDEX_SUFFIX) or is_index_head(head):
        return "index"
    return "other"


def _present(path: str) -> bool:
    """Whether a candidate name is taken by something other than a directory (a special
    file there is refused when opened, not skipped for another candidate)."""
    return os.path.lexists(path) and not os.path.isdir(path)


def find_checkpoint(path: PATH, *, legacy: bool = False) -> Tuple[str, str]:
    """Resolves a directory or file to ``(kind, path)``.

    Kinds: ``"file"`` (one safetensors file, or a file that is not an index),
    ``"index"`` (a ``*.safetensors.index.json``, or with ``legacy`` any JSON index),
    and with ``legacy`` also ``"legacy_file"`` (``pytorch_model.bin``).

    In a directory, as transformers looks: ``model.safetensors``, then
    ``model.safetensors.index.json``, then the only ``*.safetensors.index.json``, then
    the only ``*.safetensors`` file that is not a shard (``*-00001-of-00002.safetensors``;
    shards without an index are an interrupted save and are never loaded). With
    ``legacy``, when none of these is there: ``pytorch_model.bin``, then
    ``pytorch_model.bin.index.json``, then the only ``*.bin.index.json`` (safetensors is
    preferred, as transformers does).

    Raises:
        FileNotFoundError: nothing to load there.
        ValueError: several candidates and none of them is ``model``'s.
        SafetensorError: the file, or the candidate found, is a special file.
    """
    p = fspath(path)
    if not os.path.isdir(p):
        if not os.path.lexists(p):
            raise FileNotFoundError(errno.ENOENT, "no such file or directory", p)
        kind = sniff_path(p)
        if kind == "index" and (legacy or not p.endswith(LEGACY_INDEX_SUFFIX)):
            return "index", p
        return "file", p
    for kind, name in (("file", DEFAULT_PREFIX + ".safetensors"), ("index", DEFAULT_PREFIX + INDEX_SUFFIX)):
        if _present(os.path.join(p, name)):
            return kind, os.path.join(p, name)
    entries = sorted(e for e in os.listdir(p) if not e.startswith("."))
    indexes = [e for e in entries if e.endswith(INDEX_SUFFIX)]
    singles = [e for e in entries if e.endswith(".safetensors")]
    shards = [e for e in singles if _ANY_SHARD.fullmatch(e)]
    singles = [e for e in singles if not _ANY_SHARD.fullmatch(e)]
    for kind, found in (("index", indexes), ("file", singles)):
        if len(found) == 1:
            return kind, os.path.join(p, found[0])
        if len(found) > 1:
            raise ValueError(
                f"{p}: several checkpoints ({', '.join(found[:4])}{', ...' if len(found) > 4 else ''}); "
                "pass the one to load"
            )
    if legacy:
        for kind, name in (("legacy_file", LEGACY_SINGLE), ("index", LEGACY_INDEX)):
            if _present(os.path.join(p, name)):
                return kind, os.path.join(p, name)
        legacy_indexes = [e for e in entries if e.endswith(LEGACY_INDEX_SUFFIX)]
        if len(legacy_indexes) == 1:
            return "index", os.path.join(p, legacy_indexes[0])
        if len(legacy_indexes) > 1:
            raise ValueError(f"{p}: several checkpoints ({', '.join(legacy_indexes[:4])}); pass the one to load")
    if shards:
        # shards are only complete with their index: an interrupted save, or a lost index
        raise FileNotFoundError(
            errno.ENOENT,
            f"shard files ({shards[0]}, ...) but no *{INDEX_SUFFIX}: an interrupted save, "
            "or the index is missing",
            p,
        )
    raise FileNotFoundError(
        errno.ENOENT,
        f"no safetensors checkpoint in this directory (looked for {DEFAULT_PREFIX}.safetensors, "
        f"*{INDEX_SUFFIX} and *.safetensors"
        + (f", then {LEGACY_SINGLE} and *{LEGACY_INDEX_SUFFIX}" if legacy else "") + ")",
        p,
    )
