"""What a source holds: one place that opens files for every loader and the CLI.

Every file a loader opens may be a FIFO, a socket or a device planted by whoever made
the directory. Files are opened once, with ``O_NONBLOCK`` (opening a FIFO for reading
would otherwise wait for a writer forever), checked with ``fstat`` to be regular files,
and read with bounded reads: JSON documents (indexes) are checked against a size limit
before a byte is read, so a 4 GiB sparse index or a link to ``/dev/zero`` fails at once.

It also decides, once, what ``torch.load`` was given (:func:`resolve`): a safetensors
file, a Hugging Face index, a directory, one of torch's own formats, a seekable file
object or a stream that cannot seek. Each kind has one loader (``_torch.LOADERS``).

This module builds only on the C core and ``_core``; the loaders (``_torch``,
``_sharded``, ``distributed``, the CLI) ask it, never each other, what a path holds.
"""
from __future__ import annotations

import errno
import os
import re
import stat
import io
from typing import Any, Optional, Tuple, Union

from . import _C, _core
from ._core import SafetensorError

__all__ = [
    "Source",
    "resolve",
    "describe_head",
    "not_safetensors",
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

    Regular files, directories and devices are returned (torch reads devices, so a
    device path torch accepts keeps working); a FIFO or a socket is refused at once:
    torch would wait for a writer and then fail to seek.

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
        if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
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


# ---- what torch.load was given: decided once ----

#: a path or descriptor whose bytes are (or claim to be) safetensors: our reader decides
SAFETENSORS = "safetensors"
#: a Hugging Face index (``*.safetensors.index.json``, ``*.bin.index.json``, or JSON bytes)
INDEX = "index"
#: a directory holding a checkpoint
DIRECTORY = "directory"
#: a path that is not ours: torch's zip or pre-1.6 format, a device, or bytes torch explains
LEGACY = "legacy"
#: a file object torch can seek, holding safetensors at its position
FILEOBJ_SAFETENSORS = "fileobj_safetensors"
#: a file object torch can seek (or that torch itself must refuse), holding anything else
FILEOBJ = "fileobj"
#: a file object torch cannot seek (no seek/tell, or they fail): safetensors only
STREAM = "stream"

KINDS = (SAFETENSORS, INDEX, DIRECTORY, LEGACY, FILEOBJ_SAFETENSORS, FILEOBJ, STREAM)

# torch.serialization.MAGIC_NUMBER, pickled (protocol 2) and as protocol 0/1 write it
_PRE16_NUMBER = 0x1950A86A20F9469CFC6C
_PRE16_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."


class Source:
    """What ``f`` is, decided once: ``kind`` (one of :data:`KINDS`) and what its loader needs.

    Attributes:
        kind: one of :data:`KINDS`.
        f: what the caller passed.
        name: the file's name for messages (the path, or the file object's ``name``).
        fd: a descriptor this value owns (paths that are files); closed by :meth:`close`.
        head: the first bytes (up to 4 KiB) when they were read.
        pos: a file object's position when the load began.
        size: the bytes from ``pos`` to the end, when known.
        map_fd: a file object's descriptor that holds exactly its bytes (it can be mapped).
    """

    __slots__ = ("kind", "f", "_name", "fd", "head", "pos", "size", "map_fd")

    def __init__(self, kind: str, f: Any, name: Optional[str] = None, *, fd: Optional[int] = None,
                 head: bytes = b"", pos: int = 0, size: Optional[int] = None,
                 map_fd: Optional[int] = None) -> None:
        self.kind = kind
        self.f = f
        self._name = name
        self.fd = fd
        self.head = head
        self.pos = pos
        self.size = size
        self.map_fd = map_fd

    @property
    def name(self) -> str:
        """The file's name for messages: its path, or a file object's ``name``."""
        if self._name is None:
            self._name = _object_name(self.f)
        return self._name

    @property
    def is_path(self) -> bool:
        """Whether the caller passed a path (not a file object)."""
        return self.kind in (SAFETENSORS, INDEX, DIRECTORY, LEGACY)

    def close(self) -> None:
        """Closes the descriptor this value owns, if any."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Source({self.kind!r}, {self.name!r})"


def looks_like_safetensors(head: bytes) -> bool:
    """Whether the first bytes claim to be safetensors, whatever follows: an 8-byte
    little-endian header length from 2 to the 100,000,000-byte limit. A truncated or
    damaged safetensors file claims it too, and is then explained by the strict reader;
    torch's formats and text never do (their first 8 bytes are a zip signature, a pickle
    opcode or characters, far over the limit), and bytes too short to hold the length
    are left to torch, whose errors callers expect for them."""
    if len(head) < 8:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= MAX_JSON_BYTES


def is_pre16(head: bytes) -> bool:
    """Whether the first bytes open a pre-1.6 torch checkpoint (pickle protocol 2)."""
    return head.startswith(_PRE16_MAGIC)


def describe_head(head: bytes) -> Optional[str]:
    """What a file that is not safetensors is, by its first bytes, when it is one of
    torch's formats (or a pickle); None otherwise."""
    if head[:4] == b"PK\x03\x04":
        return "a legacy PyTorch checkpoint (torch.save's zip format)"
    if head.startswith(_PRE16_MAGIC) or head.startswith(b"L%d" % _PRE16_NUMBER):
        return "a legacy PyTorch checkpoint (the pre-1.6 pickle format)"
    if head[257:262] == b"ustar":
        return "a legacy PyTorch checkpoint (the tar format of torch < 0.4)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a pickle file"
    return None


def not_safetensors(name: str, head: bytes, err: SafetensorError, *, path: bool = True) -> SafetensorError:
    """The strict reader's refusal of a file that is one of torch's formats, saying what
    the file is and how to load or convert it (the reader's own error otherwise).

    Args:
        name: the file's path (``path=True``) or a file object's name, for the message.
        head: the file's first bytes.
        err: the strict reader's error.
        path: whether name is a path the CLI can convert.
    """
    what = describe_head(head)
    if what is None:
        return err
    how = "torch.load reads it without format='safetensors' (with weights_only=True)"
    if path:
        how += (f"; to convert it once: torch-safetensors convert {name} "
                f"{os.path.splitext(name)[0]}.safetensors")
    return _core.error(f"{name}: {what}, not a safetensors file. {how}", "not_safetensors")


def _is_index(path: str, head: bytes) -> bool:
    return path.endswith(INDEX_SUFFIX) or path.endswith(LEGACY_INDEX_SUFFIX) or is_index_head(head)


def _resolve_path(f: Any) -> Source:
    p = fspath(f)
    fd, st = open_path(p)  # a directory opens too: one open and one fstat tell all
    try:
        if stat.S_ISDIR(st.st_mode):
            os.close(fd)
            return Source(DIRECTORY, f, p)
        if not stat.S_ISREG(st.st_mode):
            return Source(LEGACY, f, p, fd=fd)  # a device: torch reads it by path
        head = os.pread(fd, SNIFF_BYTES, 0)
    except BaseException:
        os.close(fd)
        raise
    if _C.sniff(head, st.st_size) or looks_like_safetensors(head):
        kind = SAFETENSORS
    elif _is_index(p, head[:64]):
        kind = INDEX
    else:
        kind = LEGACY
    return Source(kind, f, p, fd=fd, head=head, size=st.st_size)


def _object_name(f: Any) -> str:
    name = getattr(f, "name", None)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    return name if isinstance(name, str) else f"a {type(f).__name__}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _size_from(f: Any, pos: int) -> Optional[int]:
    """The bytes from pos to the end of a seekable file object, or None when its seek
    takes no ``whence`` or does not say; the position is left at pos."""
    try:
        end = f.seek(0, io.SEEK_END)
        if not _is_int(end):  # some wrappers' seek() returns None: tell() says
            end = f.tell()
    except Exception:  # noqa: BLE001 - a minimal seek(pos): the size stays unknown
        end = None
    f.seek(pos)
    return end - pos if _is_int(end) and end >= pos else None


def _descriptor_for(f: Any, head: bytes, pos: int, size: Optional[int]) -> Optional[int]:
    """The file object's descriptor, when it holds exactly the object's bytes from 0
    (a wrapper that decrypts or decompresses may expose its underlying file's)."""
    if pos != 0 or size is None:
        return None
    try:
        fd = f.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None
    if not _is_int(fd) or fd < 0:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size or os.pread(fd, len(head), 0) != head:
            return None
    except OSError:
        return None
    return fd


def _resolve_object(f: Any) -> Source:
    if not callable(getattr(f, "read", None)):
        return Source(FILEOBJ, f)  # torch refuses it in its own words
    # "seekable" as torch decides it (_check_seekable): seek(tell()) works. seekable()
    # alone is not asked: research code passes minimal file-likes without it.
    try:
        pos = f.tell()
        f.seek(pos)
    except (io.UnsupportedOperation, AttributeError, OSError):
        return Source(STREAM, f)
    except Exception:  # noqa: BLE001 - a closed file, a broken object: torch says what
        return Source(FILEOBJ, f)
    if not _is_int(pos):
        return Source(FILEOBJ, f)  # a tell() without a position: torch decides
    try:
        head = f.read(SNIFF_BYTES)
    except Exception:  # noqa: BLE001 - torch's reads fail the same way, in its words
        head = None
    f.seek(pos)
    if not isinstance(head, (bytes, bytearray, memoryview)):
        return Source(FILEOBJ, f, None, pos=pos)
    head = bytes(head)
    if not looks_like_safetensors(head):
        return Source(FILEOBJ, f, None, head=head, pos=pos)
    size = _size_from(f, pos)
    return Source(FILEOBJ_SAFETENSORS, f, None, head=head, pos=pos, size=size,
                  map_fd=_descriptor_for(f, head, pos, size))


def resolve(f: Any) -> Source:
    """What ``torch.load`` was given, decided once; the caller closes the result.

    Paths are opened once (never blocking: a FIFO or socket is refused) and sniffed by
    their first bytes; file objects are tested for seeking as torch tests them, and
    sniffed at their position, which is restored.

    Raises:
        FileNotFoundError, OSError: a path cannot be opened.
        SafetensorError: a path is a FIFO or a socket.
    """
    if isinstance(f, (str, os.PathLike)):
        return _resolve_path(f)
    return _resolve_object(f)
