"""Hugging Face sharded checkpoints: ``{prefix}-00001-of-0000N.safetensors`` files plus
``{prefix}.safetensors.index.json``, written atomically as a set and read lazily.

The index is ``{"metadata": {"total_size": N}, "weight_map": {name: file}}`` (written
with sorted keys and two-space indentation, as transformers writes it). A checkpoint
that fits in one shard is a single ``{prefix}.safetensors`` with no index, as
transformers and huggingface_hub name it.

Write order: the old index (and an old single file) are removed first, then every
shard is written (each atomically and durably), then the index, atomically, LAST; then
shards of an older save that the new index does not name are deleted. An interrupted
save therefore never looks complete: there is no index until every shard is in place.

Ties: names that are the same view of the same memory (tied embeddings) are stored
once, in the shard of their first name; only stored names appear in ``weight_map``
(what transformers writes, since it drops tied duplicates), and the shard's header
records the other names so that ``torch.load`` gives them back sharing one storage.
"""
from __future__ import annotations

import errno
import json
import os
import re
import stat
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch

from . import _C, _checkpoint, _core, _torch
from ._core import SafetensorError

__all__ = ["save_sharded", "load_sharded"]

FILE_PATH = Union[str, "os.PathLike[str]"]
SIZE = Union[int, str]
MAP_LOCATION = Union[None, str, bytes, torch.device, Dict[str, str], Callable[..., Any]]

INDEX_SUFFIX = ".safetensors.index.json"
MAX_INDEX_BYTES = 100_000_000  # the same bound as a safetensors header
DEFAULT_PREFIX = "model"

# Decimal units as huggingface_hub and transformers read them ("5GB" = 5 * 10**9),
# binary units with an "i" ("5GiB" = 5 * 2**30); case-insensitive.
_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")

# Called after each shard is written: (bytes written so far, total bytes).
Progress = Callable[[int, int], None]


# ---- names and sizes ----


def parse_size(size: SIZE) -> int:
    """Bytes from an int or a string such as ``"5GB"``, ``"500MB"``, ``"2GiB"``, ``"1000"``.

    Args:
        size: a positive int (bytes), or a number followed by B, KB, MB, GB, TB
            (powers of 10) or KiB, MiB, GiB, TiB (powers of 2), case-insensitive.

    Returns:
        The size in bytes, at least 1.

    Raises:
        ValueError: the size is not positive or not in one of these forms.
        TypeError: size is neither an int nor a str.

    Example:
        >>> parse_size("5GB"), parse_size("2KiB"), parse_size(10)
        (5000000000, 2048, 10)
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise TypeError(f"max_shard_size must be an int or a str such as '5GB', not {type(size).__name__}")
    if isinstance(size, int):
        value = size
    else:
        m = _SIZE_RE.fullmatch(size)
        unit = m.group(2).lower() if m else ""
        if m is None or unit not in _UNITS:
            raise ValueError(
                f"max_shard_size {size!r} is not a size: use an int (bytes) or a number with a "
                "unit, such as '5GB', '500MB' or '2GiB'"
            )
        value = int(float(m.group(1)) * _UNITS[unit])
    if value < 1:
        raise ValueError(f"max_shard_size must be at least 1 byte, not {size!r}")
    return value


def shard_name(prefix: str, index: int, count: int) -> str:
    """The file name of shard ``index`` (1-based) of ``count``: ``model-00001-of-00003.safetensors``."""
    return f"{prefix}-{index:05d}-of-{count:05d}.safetensors"


_ANY_SHARD = re.compile(r".+-\d{5,}-of-\d{5,}\.safetensors")


def _shard_pattern(prefix: str) -> "re.Pattern[str]":
    return re.compile(re.escape(prefix) + r"-\d{5,}-of-\d{5,}\.safetensors")


def _check_prefix(prefix: Any) -> str:
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, not {type(prefix).__name__}")
    if not prefix or prefix.startswith(".") or "/" in prefix or "\0" in prefix or (
        os.sep != "/" and os.sep in prefix
    ):
        raise ValueError(
            f"prefix {prefix!r} must be a plain file name stem such as 'model' "
            "(not empty, no path separators, not starting with '.')"
        )
    return prefix


def _check_metadata(metadata: Any) -> Optional[Dict[str, str]]:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict of str to str, not {type(metadata).__name__}")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(
                f"metadata must be a dict of str to str; {k!r}: {type(v).__name__} is not"
            )
    if _checkpoint.STRUCTURE_KEY in metadata:
        raise ValueError(f"metadata key {_checkpoint.STRUCTURE_KEY!r} is reserved")
    return dict(metadata)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---- saving ----


def _plan(state_dict: Mapping[str, torch.Tensor], limit: int) -> Tuple[List[Dict[str, torch.Tensor]], int]:
    """Splits state_dict into shards, greedily in key order; returns (shards, total bytes).

    A tensor larger than ``limit`` gets a shard of its own. Ties join the shard of their
    first name and count once.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict must be a dict of str to Tensor, not {type(state_dict).__name__}"
        )
    shards: List[Dict[str, torch.Tensor]] = []
    sizes: List[int] = []
    home: Dict[tuple, int] = {}
    total = 0
    for name, t in state_dict.items():
        if not isinstance(name, str):
            raise TypeError(f"state_dict key {name!r}: names must be str, not {type(name).__name__}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"{name}: {type(t).__name__} cannot be saved in a sharded checkpoint, which "
                "holds a flat dict of tensors (save whole training checkpoints with "
                "torch.save(obj, f, format='safetensors'))"
            )
        problem = _checkpoint._tensor_problem(name, t)
        if problem is not None:
            raise problem
        key = _checkpoint.view_key(t)
        if key is not None and key in home:
            shards[home[key]][name] = t  # a tie: stored once, beside its first name
            continue
        n = _nbytes(t)
        if not shards or (shards[-1] and sizes[-1] + n > limit):
            shards.append({})
            sizes.append(0)
        shards[-1][name] = t
        sizes[-1] += n
        total += n
        if key is not None:
            home[key] = len(shards) - 1
    if not shards:
        shards.append({})
    return shards, total


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _write_index(path: str, index: Dict[str, Any]) -> None:
    """Writes the index atomically and durably, with the C writer the shards use."""
    data = (json.dumps(index, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
    _C.write_atomic(path, data, durable=True)


def _prepare_directory(directory: FILE_PATH) -> str:
    path = os.fspath(directory)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(errno.ENOTDIR, "save_sharded writes into a directory, and this is a file", path)
    os.makedirs(path, exist_ok=True)
    return path


def _save_sharded(
    state_dict: Mapping[str, torch.Tensor],
    directory: FILE_PATH,
    *,
    max_shard_size: SIZE = "5GB",
    prefix: str = DEFAULT_PREFIX,
    metadata: Optional[Dict[str, str]] = None,
    progress: Optional[Progress] = None,
) -> List[str]:
    """save_sharded, with a progress callback; returns the paths written (index last)."""
    limit = parse_size(max_shard_size)
    _check_prefix(prefix)
    meta = _check_metadata(metadata)
    shards, total = _plan(state_dict, limit)  # every refusal happens before a file changes
    path = _prepare_directory(directory)

    index_path = os.path.join(path, prefix + INDEX_SUFFIX)
    single_path = os.path.join(path, prefix + ".safetensors")
    # An old index would describe a half-replaced set as complete: it goes first, and
    # transformers prefers a single file over an index, so an old one must not shadow
    # a new sharded set either.
    _remove(index_path)
    if len(shards) > 1:
        _remove(single_path)
    _fsync_dir(path)  # the removals reach the disk before any new shard does
    written: List[str] = []
    done = 0
    if len(shards) == 1:
        _torch.save_safetensors(shards[0], single_path, meta, durable=True)
        written.append(single_path)
        done = total
        if progress is not None:
            progress(done, total)
    else:
        weight_map: Dict[str, str] = {}
        count = len(shards)
        for i, shard in enumerate(shards, 1):
            name = shard_name(prefix, i, count)
            _torch.save_safetensors(shard, os.path.join(path, name), meta, durable=True)
            written.append(os.path.join(path, name))
            stored = set()
            for key, t in shard.items():
                vk = _checkpoint.view_key(t)
                if vk is None or vk not in stored:
                    weight_map[key] = name
                    done += _nbytes(t)
                if vk is not None:
                    stored.add(vk)
            if progress is not None:
                progress(done, total)
        _write_index(index_path, {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.append(index_path)
    # shards of an older save with another count are no longer named by any index
    keep = {os.path.basename(p) for p in written}
    pattern = _shard_pattern(prefix)
    for entry in os.listdir(path):
        if entry not in keep and pattern.fullmatch(entry):
            _remove(os.path.join(path, entry))
    _fsync_dir(path)
    return written


def save_sharded(
    state_dict: Mapping[str, torch.Tensor],
    directory: FILE_PATH,
    *,
    max_shard_size: SIZE = "5GB",
    prefix: str = DEFAULT_PREFIX,
    metadata: Optional[Dict[str, str]] = None,
) -> None:
    """Saves a state dict as a Hugging Face sharded safetensors checkpoint.

    Tensors are assigned to shards greedily in key order (as huggingface_hub does); a
    tensor larger than ``max_shard_size`` gets a shard of its own. Shards are named
    ``{prefix}-00001-of-0000N.safetensors`` and described by
    ``{prefix}.safetensors.index.json`` (``{"metadata": {"total_size": N},
    "weight_map": {name: file}}``). When everything fits in one shard, a single
    ``{prefix}.safetensors`` is written and no index, as transformers does. Every file
    carries ``{"format": "pt"}`` metadata.

    The set is written atomically: the previous index goes first, each shard is
    written to a temporary file and renamed (and flushed to disk), the index comes
    last, and only then are shards of an older save with another shard count deleted.
    An interrupted save leaves no index, so it never looks complete.

    Tied tensors (the same view of the same memory, such as tied embeddings) are stored
    once, in the shard of their first name. ``weight_map`` lists only stored names, as
    in transformers' own output; ``torch.load`` gives the tied names back sharing one
    storage.

    Args:
        state_dict: names to tensors, such as ``model.state_dict()``.
        directory: where to write; created if missing.
        max_shard_size: the most tensor data per shard (headers add a little), as
            bytes (int) or a string such as ``"5GB"``, ``"500MB"`` (powers of 10) or
            ``"2GiB"`` (powers of 2).
        prefix: the file name stem (``"model"`` gives ``model.safetensors.index.json``).
        metadata: extra ``str`` -> ``str`` header metadata for every shard.

    Returns:
        None

    Raises:
        TypeError: a key is not a str, a value is not a dense tensor, or an option has
            the wrong type; the directory is untouched.
        ValueError: max_shard_size or prefix is invalid.
        NotADirectoryError: ``directory`` is an existing file.
        OSError: a file cannot be written; no index names a half-written set.

    Example:
        >>> import torch, torch_safetensors
        >>> model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 8))
        >>> torch_safetensors.save_sharded(model.state_dict(), "ckpt", max_shard_size="1MB")
        >>> sd = torch.load("ckpt")   # or torch.load("ckpt/model.safetensors.index.json")
    """
    _save_sharded(state_dict, directory, max_shard_size=max_shard_size, prefix=prefix, metadata=metadata)


# ---- finding and checking a checkpoint ----


def _named(path: str, err: SafetensorError) -> SafetensorError:
    """The same error with the file's path in front (keeping code, tensor, position)."""
    new = _core.error(f"{path}: {err}", getattr(err, "code", "error"), getattr(err, "tensor", None))
    new.position = getattr(err, "position", None)
    return new


def is_index_head(head: bytes) -> bool:
    """Whether the first bytes of a file that is not safetensors look like a JSON index."""
    return head.lstrip(b" \t\r\n\xef\xbb\xbf")[:1] == b"{"


def find_checkpoint(path: FILE_PATH) -> Tuple[str, str]:
    """Resolves a directory or file to ``("index", path)`` or ``("file", path)``.

    In a directory, as transformers looks: ``model.safetensors``, then
    ``model.safetensors.index.json``, then the only ``*.safetensors.index.json``, then
    the only ``*.safetensors`` file that is not a shard (``*-00001-of-00002.safetensors``;
    shards without an index are an interrupted save and are never loaded).

    Raises:
        FileNotFoundError: nothing to load there.
        ValueError: several candidates and none of them is ``model``'s.
    """
    p = os.fspath(path)
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    if not os.path.isdir(p):
        if not os.path.exists(p):
            raise FileNotFoundError(errno.ENOENT, "no such file or directory", p)
        with open(p, "rb") as f:
            head = f.read(4096)
            size = os.fstat(f.fileno()).st_size
        is_index = not _C.sniff(head, size) and (p.endswith(INDEX_SUFFIX) or is_index_head(head))
        return ("index" if is_index else "file"), p
    for kind, name in (("file", DEFAULT_PREFIX + ".safetensors"), ("index", DEFAULT_PREFIX + INDEX_SUFFIX)):
        if os.path.isfile(os.path.join(p, name)):
            return kind, os.path.join(p, name)
    entries = sorted(os.listdir(p))
    indexes = [e for e in entries if e.endswith(INDEX_SUFFIX) and not e.startswith(".")]
    singles = [e for e in entries if e.endswith(".safetensors") and not e.startswith(".")]
    shards = [e for e in singles if _ANY_SHARD.fullmatch(e)]
    singles = [e for e in singles if not _ANY_SHARD.fullmatch(e)]
    if not indexes and not singles and shards:
        # shards are only complete with their index: an interrupted save, or a lost index
        raise FileNotFoundError(
            errno.ENOENT,
            f"shard files ({shards[0]}, ...) but no *{INDEX_SUFFIX}: an interrupted save, "
            "or the index is missing",
            p,
        )
    for kind, found in (("index", indexes), ("file", singles)):
        if len(found) == 1:
            return kind, os.path.join(p, found[0])
        if len(found) > 1:
            raise ValueError(
                f"{p}: several checkpoints ({', '.join(found[:4])}{', ...' if len(found) > 4 else ''}); "
                "pass the one to load"
            )
    raise FileNotFoundError(
        errno.ENOENT,
        f"no safetensors checkpoint in this directory (looked for {DEFAULT_PREFIX}.safetensors, "
        f"*{INDEX_SUFFIX} and *.safetensors)",
        p,
    )


def read_index(path: str) -> Dict[str, str]:
    """Reads and checks an index file; returns its weight_map.

    Raises:
        SafetensorError: the file is not a valid index (named in the message).
        OSError: it cannot be read.
    """
    def bad(msg: str) -> SafetensorError:
        return _core.error(f"{path}: not a valid sharded checkpoint index: {msg}", "invalid_index")

    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size > MAX_INDEX_BYTES:
            raise bad(f"larger than {MAX_INDEX_BYTES} bytes")
        raw = f.read(MAX_INDEX_BYTES + 1)

    def pairs(items: List[Tuple[str, Any]]) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for k, v in items:
            if k in out:
                raise bad(f"duplicate key {k!r}")
            out[k] = v
        return out

    try:
        doc = json.loads(raw.decode("utf-8-sig"), object_pairs_hook=pairs)
    except UnicodeDecodeError:
        raise bad("not UTF-8") from None
    except RecursionError:
        raise bad("nested too deeply") from None
    except SafetensorError:
        raise
    except ValueError as e:
        raise bad(f"not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise bad("expected a JSON object")
    if "metadata" in doc and doc["metadata"] is not None and not isinstance(doc["metadata"], dict):
        raise bad("'metadata' is not an object")
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict):
        raise bad("no 'weight_map' object")
    for name, file in weight_map.items():
        if not isinstance(file, str):
            raise bad(f"weight_map[{name!r}] is not a file name")
        if (not file or file in (".", "..") or "/" in file or "\\" in file or "\0" in file):
            raise bad(f"weight_map[{name!r}] = {file!r} is not a plain file name in the index's directory")
    return weight_map


def _open_reader(path: str, mmap: Optional[bool], missing: Optional[str] = None) -> "_C.Reader":
    """A validated reader over path; errors name the file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        if missing is None:
            raise
        raise FileNotFoundError(errno.ENOENT, missing, path) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _core.error(f"{path}: not a regular file", "not_regular_file")
        try:
            return _C.Reader(fd=fd, mmap=mmap is not False)
        except SafetensorError as e:
            raise _named(path, e) from None
    finally:
        os.close(fd)


def iter_shards(index_path: str, *, mmap: Optional[bool] = None) -> Iterator[Tuple[str, "_C.Reader"]]:
    """Yields (shard path, validated reader) per shard of an index, in file-name order.

    Each shard's tensors must be exactly the names weight_map lists for it. The caller
    closes each reader.

    Raises:
        FileNotFoundError: a shard is missing (named, with the index).
        SafetensorError: the index is invalid, a shard is malformed, or a shard and the
            index disagree (naming both).
    """
    weight_map = read_index(index_path)
    directory = os.path.dirname(index_path)
    by_file: Dict[str, List[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    for file in sorted(by_file):
        shard = os.path.join(directory, file)
        reader = _open_reader(
            shard, mmap, missing=f"shard {file!r} listed in {index_path} is missing"
        )
        try:
            held = set(reader.keys())
            for name in by_file[file]:
                if name not in held:
                    raise _core.error(
                        f"{index_path}: weight_map lists tensor {name!r} in {file!r}, "
                        f"but {shard} does not hold it",
                        "index_mismatch",
                        name,
                    )
            if len(held) != len(by_file[file]):
                extra = sorted(held - set(by_file[file]))
                raise _core.error(
                    f"{shard}: holds tensor {extra[0]!r}, which {index_path} does not list "
                    f"for {file!r} ({len(extra)} such tensors)",
                    "index_mismatch",
                    extra[0],
                )
        except BaseException:
            reader.close()
            raise
        yield shard, reader


# ---- loading ----


def _load_file(path: str, map_location: Any, mmap: Optional[bool]) -> Any:
    reader = _open_reader(path, mmap)
    try:
        return _torch._finish(reader, map_location)
    except SafetensorError as e:
        raise _named(path, e) from None


def load_sharded(
    path: FILE_PATH,
    *,
    map_location: MAP_LOCATION = None,
    mmap: Optional[bool] = None,
) -> Dict[str, torch.Tensor]:
    """Loads a sharded checkpoint (or a checkpoint directory) as one dict, lazily.

    Every shard is mapped zero-copy; nothing is read until a tensor is touched. Tied
    names stored once by :func:`save_sharded` come back sharing one storage.
    ``torch.load`` calls this for an index file or a directory.

    Args:
        path: a ``*.safetensors.index.json`` file, or a directory holding
            ``model.safetensors`` or an index (as transformers looks for them).
        map_location: as for ``torch.load`` (str, ``torch.device``, dict or callable).
        mmap: ``False`` reads the data into memory instead of mapping it.

    Returns:
        Names to tensors: shard by shard, each in its file's order.

    Raises:
        FileNotFoundError: the path, or a shard the index lists, is missing (named).
        SafetensorError: the index is invalid, a shard is malformed or disagrees with
            the index, or two shards hold the same name (naming the files).
        ValueError: a directory holds several checkpoints.

    Example:
        >>> sd = load_sharded("ckpt/model.safetensors.index.json", map_location="meta")
    """
    kind, resolved = find_checkpoint(path)
    if kind == "file":
        return _load_file(resolved, map_location, mmap)
    out: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}
    for shard, reader in iter_shards(resolved, mmap=mmap):
        try:
            part = _torch._finish(reader, map_location)
        except SafetensorError as e:
            raise _named(shard, e) from None
        if not isinstance(part, dict):
            raise _core.error(f"{shard}: holds a {type(part).__name__} checkpoint, not a dict of tensors",
                              "invalid_shard")
        for name, t in part.items():
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise _core.error(f"{shard}: {name!r} is not a tensor of a flat state dict", "invalid_shard")
            if name in out:
                raise _core.error(f"tensor {name!r} is in both {origin[name]} and {shard}",
                                  "duplicate_tensor", name)
            out[name] = t
            origin[name] = shard
    return out
