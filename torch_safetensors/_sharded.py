"""Hugging Face sharded checkpoints: ``{prefix}-00001-of-0000N.safetensors`` files plus
``{prefix}.safetensors.index.json``, written atomically as a set and read lazily.

The index is ``{"metadata": {"total_size": N}, "weight_map": {name: file}}`` (written
with sorted keys and two-space indentation, as transformers writes it). A checkpoint
that fits in one shard is a single ``{prefix}.safetensors`` with no index, as
transformers and huggingface_hub name it.

Write order: new shards take names no file in the directory has (the standard ones
when free, else ``{prefix}-{8 hex}-00001-of-0000N.safetensors``), each written
atomically and durably; then the index (or a single file) is renamed into place LAST;
only then are the old index, an old single file and unnamed shards deleted. At every
instant the directory holds a complete checkpoint: the old one until the new index
lands, the new one after, whatever stops the save (an error, Ctrl-C, SIGKILL).

Ties: names that are the same view of the same memory (tied embeddings) are stored
once, in the shard of their first name; only stored names appear in ``weight_map``
(what transformers writes, since it drops tied duplicates), and the shard's header
records the other names so that ``torch.load`` gives them back sharing one storage.
"""
from __future__ import annotations

import contextlib
import decimal
import errno
import fcntl
import json
import os
import re
import uuid
import warnings
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch

from . import _C, _checkpoint, _core, _load, _save, _source
from ._core import SafetensorError

__all__ = ["save_sharded", "load_sharded"]

FILE_PATH = Union[str, "os.PathLike[str]"]
SIZE = Union[int, str]
MAP_LOCATION = Union[None, str, bytes, torch.device, Dict[str, str], Callable[..., Any]]

INDEX_SUFFIX = _source.INDEX_SUFFIX
MAX_INDEX_BYTES = _source.MAX_JSON_BYTES  # the same bound as a safetensors header
DEFAULT_PREFIX = "model"
MAX_SHARD_SIZE = 2**63 - 1  # what a file offset can represent

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
        ValueError: the size is not positive, too large to represent (over 2**63 - 1
            bytes), or not in one of these forms.
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
        # exact decimal arithmetic: no float overflow (OverflowError) or rounding
        exact = decimal.Decimal(m.group(1)) * _UNITS[unit]
        value = int(exact) if exact <= MAX_SHARD_SIZE else MAX_SHARD_SIZE + 1
    if value < 1:
        raise ValueError(f"max_shard_size must be at least 1 byte, not {size!r}")
    if value > MAX_SHARD_SIZE:
        raise ValueError(f"max_shard_size {size!r} is too large: at most {MAX_SHARD_SIZE} bytes (2**63 - 1)")
    return value


def shard_name(prefix: str, index: int, count: int) -> str:
    """The file name of shard ``index`` (1-based) of ``count``: ``model-00001-of-00003.safetensors``."""
    return f"{prefix}-{index:05d}-of-{count:05d}.safetensors"


_ANY_SHARD = re.compile(r".+-\d{5,}-of-\d{5,}\.safetensors")


def _shard_pattern(prefix: str) -> "re.Pattern[str]":
    """Shard names of this prefix: standard, or unique to one save (8 hex digits)."""
    return re.compile(re.escape(prefix) + r"(?:-[0-9a-f]{8})?-\d{5,}-of-\d{5,}\.safetensors")


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


def _discard(path: str) -> None:
    """Removes a file that no complete checkpoint needs; never raises: a failure (a
    directory of that name, a read-only entry) is a warning."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            raise IsADirectoryError(errno.EISDIR, "a directory, not a file", path)
        _remove(path)
    except OSError as e:
        warnings.warn(f"torch_safetensors: left {path} in place ({e.strerror or e})", RuntimeWarning,
                      stacklevel=3)


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    """Holds an exclusive flock on the directory: concurrent saves into it take turns
    (each one's cleanup would otherwise delete the other's new shards)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # a file system without flock: saves are still each complete
        yield
    finally:
        os.close(fd)  # releases the lock


def _replace_with(directory: str, name: str, token: str, write: Callable[[str], None]) -> str:
    """Writes a file under a temporary name unique to this save, then renames it to
    ``name``: a symlink planted at ``name`` is replaced, never written through."""
    tmp_name = f".{name}.{token}.partial"
    if len(os.fsencode(tmp_name)) > 200:  # a long prefix: keep the name (and the C
        tmp_name = f".torch_safetensors.{token}.partial"  # writer's own) within NAME_MAX
    tmp = os.path.join(directory, tmp_name)
    final = os.path.join(directory, name)
    try:
        write(tmp)
        os.replace(tmp, final)
    except BaseException:
        try:
            _remove(tmp)
        except OSError:
            pass
        raise
    return final


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


def _shard_names(directory: str, prefix: str, count: int, token: str) -> List[str]:
    """Standard names (``model-00001-of-00003.safetensors``) when none of them is taken;
    else names unique to this save (``model-{token}-00001-of-00003.safetensors``), so a
    new shard never replaces one that the current index still names."""
    names = [shard_name(prefix, i, count) for i in range(1, count + 1)]
    if any(os.path.lexists(os.path.join(directory, n)) for n in names):
        names = [shard_name(f"{prefix}-{token}", i, count) for i in range(1, count + 1)]
    return names


def _cleanup(directory: str, prefix: str, keep: List[str]) -> None:
    """Deletes shards (and this layer's temporary files) of older or interrupted saves
    that the checkpoint now in place does not name. Never raises."""
    keep_names = {os.path.basename(p) for p in keep}
    shard = _shard_pattern(prefix)
    # the C writer's ".{name}.{16 hex}.tmp", and ".{name}.{token}.partial" (with its own
    # temporary "..{name}.{token}.partial.{16 hex}.tmp") of a save that was killed
    partial = re.compile(r"\.\.?(?:" + re.escape(prefix) + r"(?:-[^/]*\.safetensors|\.safetensors|"
                         + re.escape(INDEX_SUFFIX) + r")|torch_safetensors)"
                         r"(?:\.[0-9a-f]{8}\.partial(?:\.[0-9a-f]{16}\.tmp)?|\.[0-9a-f]{16}\.tmp)")
    try:
        entries = os.listdir(directory)
    except OSError as e:
        warnings.warn(f"torch_safetensors: cannot list {directory} to remove old shards ({e})",
                      RuntimeWarning, stacklevel=3)
        return
    for entry in entries:
        if entry not in keep_names and (shard.fullmatch(entry) or partial.fullmatch(entry)):
            _discard(os.path.join(directory, entry))


def _save_sharded(
    state_dict: Mapping[str, torch.Tensor],
    directory: FILE_PATH,
    *,
    max_shard_size: SIZE = "5GB",
    prefix: str = DEFAULT_PREFIX,
    metadata: Optional[Dict[str, str]] = None,
    progress: Optional[Progress] = None,
    checksums: bool = False,
) -> List[str]:
    """save_sharded, with a progress callback; returns the paths written (index last).

    At every instant the directory holds a complete checkpoint: new shards get names
    that no current file has, and the file that makes the new set the one loaded (the
    index, or a single file) is renamed into place last; only then are the old index,
    single file and shards removed.
    """
    limit = parse_size(max_shard_size)
    _check_prefix(prefix)
    meta = _check_metadata(metadata)
    shards, total = _plan(state_dict, limit)  # every refusal happens before a file changes
    path = _prepare_directory(directory)
    token = uuid.uuid4().hex[:8]
    index_name = prefix + INDEX_SUFFIX
    single_name = prefix + ".safetensors"

    def saver(tensors: Dict[str, torch.Tensor]) -> Callable[[str], None]:
        return lambda tmp: _save.save_safetensors(tensors, tmp, meta, durable=True, checksums=checksums)

    written: List[str] = []
    done = 0
    with _locked(path):
        if len(shards) == 1:
            # the single file is what loaders look for first: it replaces the old
            # checkpoint in one rename, whatever the old one was
            written.append(_replace_with(path, single_name, token, saver(shards[0])))
            done = total
            if progress is not None:
                progress(done, total)
            _fsync_dir(path)
            _discard(os.path.join(path, index_name))
        else:
            weight_map: Dict[str, str] = {}
            names = _shard_names(path, prefix, len(shards), token)
            try:
                for name, shard in zip(names, shards):
                    # the name is free (checked): the C writer's rename cannot replace a
                    # file of the current checkpoint
                    written.append(os.path.join(path, name))
                    saver(shard)(written[-1])
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
                _fsync_dir(path)  # every shard is on disk before the index names them
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                written.append(_replace_with(path, index_name, token, lambda tmp: _write_index(tmp, index)))
            except BaseException:
                # nothing names this save's shards: they go, the old checkpoint stays
                for shard_path in written:
                    try:
                        _remove(shard_path)
                    except OSError:
                        pass
                raise
            _fsync_dir(path)
            # an old single file would shadow the new index (loaders look for it first)
            _discard(os.path.join(path, single_name))
        _cleanup(path, prefix, written)
        try:
            _fsync_dir(path)
        except OSError as e:
            warnings.warn(f"torch_safetensors: cannot flush {path} after removing old shards ({e})",
                          RuntimeWarning, stacklevel=2)
    return written


def save_sharded(
    state_dict: Mapping[str, torch.Tensor],
    directory: FILE_PATH,
    *,
    max_shard_size: SIZE = "5GB",
    prefix: str = DEFAULT_PREFIX,
    metadata: Optional[Dict[str, str]] = None,
    checksums: bool = False,
) -> None:
    """Saves a state dict as a Hugging Face sharded safetensors checkpoint.

    Tensors are assigned to shards greedily in key order (as huggingface_hub does); a
    tensor larger than ``max_shard_size`` gets a shard of its own. Shards are named
    ``{prefix}-00001-of-0000N.safetensors`` and described by
    ``{prefix}.safetensors.index.json`` (``{"metadata": {"total_size": N},
    "weight_map": {name: file}}``). When everything fits in one shard, a single
    ``{prefix}.safetensors`` is written and no index, as transformers does. Every file
    carries ``{"format": "pt"}`` metadata.

    A re-save never destroys the previous checkpoint: new shards get names no file has
    (standard names when free, else names unique to this save), every file is flushed,
    the index (or single file) is renamed into place last, and only then are the old
    index and shards deleted (a failure to delete one is a warning). An interrupted
    save leaves the previous checkpoint loadable. A symlink planted at a shard's or the
    index's name is replaced, never written through.

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
        checksums: record each tensor's CRC32C in its shard's header, for
            ``torch-safetensors verify --data DIRECTORY`` (other readers ignore it).

    Returns:
        None

    Raises:
        TypeError: a key is not a str, a value is not a dense tensor, or an option has
            the wrong type; the directory is untouched.
        ValueError: max_shard_size or prefix is invalid.
        NotADirectoryError: ``directory`` is an existing file.
        OSError: a file cannot be written; the previous checkpoint still loads.

    Example:
        >>> import torch, torch_safetensors
        >>> model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 8))
        >>> torch_safetensors.save_sharded(model.state_dict(), "ckpt", max_shard_size="1MB")
        >>> sd = torch.load("ckpt")   # or torch.load("ckpt/model.safetensors.index.json")
    """
    _save_sharded(state_dict, directory, max_shard_size=max_shard_size, prefix=prefix, metadata=metadata,
                  checksums=checksums)


# ---- finding and checking a checkpoint (the source module decides; kept here by name) ----

_named = _source.named
is_index_head = _source.is_index_head
find_checkpoint = _source.find_checkpoint
_open_reader = _source.open_reader


def read_index(path: str) -> Dict[str, str]:
    """Reads and checks an index file; returns its weight_map.

    Raises:
        SafetensorError: the file is not a valid index (named in the message).
        OSError: it cannot be read.
    """
    def bad(msg: str) -> SafetensorError:
        return _core.error(f"{path}: not a valid sharded checkpoint index: {msg}", "invalid_index")

    raw = _source.read_json_bytes(path, what="sharded checkpoint index", limit=MAX_INDEX_BYTES)

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


def _shards_of(index_path: str) -> List[Tuple[str, str, List[str]]]:
    """(file, path, names) per shard of an index, in file-name order."""
    weight_map = read_index(index_path)
    directory = os.path.dirname(index_path)
    by_file: Dict[str, List[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    return [(file, os.path.join(directory, file), by_file[file]) for file in sorted(by_file)]


def _check_names(index_path: str, file: str, shard: str, held: "set[str]", listed: List[str]) -> None:
    """A shard must hold exactly the names the index lists for it."""
    for name in listed:
        if name not in held:
            raise _core.error(
                f"{index_path}: weight_map lists tensor {name!r} in {file!r}, "
                f"but {shard} does not hold it",
                "index_mismatch",
                name,
            )
    if len(held) != len(listed):
        extra = sorted(held - set(listed))
        raise _core.error(
            f"{shard}: holds tensor {extra[0]!r}, which {index_path} does not list "
            f"for {file!r} ({len(extra)} such tensors)",
            "index_mismatch",
            extra[0],
        )


def _missing(file: str, index_path: str) -> str:
    return f"shard {file!r} listed in {index_path} is missing"


def iter_shards(index_path: str, *, mmap: Optional[bool] = None) -> Iterator[Tuple[str, "_C.Reader"]]:
    """Yields (shard path, validated reader) per shard of an index, in file-name order.

    Each shard's tensors must be exactly the names weight_map lists for it. The caller
    closes each reader.

    Raises:
        FileNotFoundError: a shard is missing (named, with the index).
        SafetensorError: the index is invalid, a shard is malformed or a special file,
            or a shard and the index disagree (naming both).
    """
    for file, shard, listed in _shards_of(index_path):
        reader = _open_reader(shard, mmap, missing=_missing(file, index_path))
        try:
            _check_names(index_path, file, shard, set(reader.keys()), listed)
        except BaseException:
            reader.close()
            raise
        yield shard, reader


# ---- loading ----


def _load_file(path: str, map_location: Any, mmap: Optional[bool]) -> Any:
    reader = _open_reader(path, mmap)
    try:
        return _load.finish(reader, map_location)
    except SafetensorError as e:
        raise _named(path, e) from None


def _load_legacy(path: str, map_location: Any, mmap: Optional[bool], weights_only: bool) -> Any:
    """A legacy (pickle) file through the same path torch.load takes for one: torch's
    weights_only loader (unless weights_only=False was passed explicitly)."""
    kwargs: Dict[str, Any] = {"map_location": map_location, "weights_only": weights_only}
    if mmap is not None:
        kwargs["mmap"] = mmap
    a = _load.bind(path, **kwargs)
    with _source.resolve(path) as src:
        if src.kind not in _load.LOADERS:
            raise _core.error(f"{path}: a {src.kind}, not a checkpoint file", "invalid_shard")
        return _load.LOADERS[src.kind](src, a)


def _flat_part(shard: str, part: Any) -> Dict[str, torch.Tensor]:
    if not isinstance(part, dict):
        raise _core.error(f"{shard}: holds a {type(part).__name__} checkpoint, not a dict of tensors",
                          "invalid_shard")
    for name, t in part.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise _core.error(f"{shard}: {name!r} is not a tensor of a flat state dict", "invalid_shard")
    return part


def _load_shard(index_path: str, file: str, shard: str, listed: List[str], map_location: Any,
                mmap: Optional[bool], weights_only: bool) -> Dict[str, torch.Tensor]:
    """One shard of an index: safetensors through our reader (a ``*.safetensors`` name
    always), anything else (Hugging Face's ``pytorch_model-00001-of-00002.bin``)
    through the legacy path."""
    kind = "safetensors" if file.endswith(".safetensors") else _source.sniff_path(shard) \
        if os.path.lexists(shard) else "missing"
    if kind == "missing":
        raise FileNotFoundError(errno.ENOENT, _missing(file, index_path), shard)
    if kind == "safetensors":
        reader = _open_reader(shard, mmap, missing=_missing(file, index_path))
        try:
            _check_names(index_path, file, shard, set(reader.keys()), listed)
            part = _load.finish(reader, map_location)
        except SafetensorError as e:
            raise (e if str(e).startswith((shard, index_path)) else _named(shard, e)) from None
        finally:
            reader.close()
        return _flat_part(shard, part)
    if kind == "index":
        raise _core.error(f"{index_path}: shard {file!r} is itself an index, not a checkpoint file",
                          "invalid_shard")
    part = _flat_part(shard, _load_legacy(shard, map_location, mmap, weights_only))
    _check_names(index_path, file, shard, set(part), listed)
    return part


def load_sharded(
    path: FILE_PATH,
    *,
    map_location: MAP_LOCATION = None,
    mmap: Optional[bool] = None,
    weights_only: bool = True,
) -> Dict[str, torch.Tensor]:
    """Loads a sharded checkpoint (or a checkpoint directory) as one dict, lazily.

    Every safetensors shard is mapped zero-copy; nothing is read until a tensor is
    touched. Tied names stored once by :func:`save_sharded` come back sharing one
    storage. Hugging Face's legacy layout (``pytorch_model-00001-of-00002.bin`` shards
    and ``pytorch_model.bin.index.json``, or one ``pytorch_model.bin``) loads too, each
    shard through torch's ``weights_only`` loader; a directory holding both kinds loads
    the safetensors one, as transformers does. ``torch.load`` calls this for an index
    file or a directory.

    Args:
        path: a ``*.safetensors.index.json`` or ``*.bin.index.json`` file, or a
            directory holding ``model.safetensors``, an index or ``pytorch_model.bin``
            (as transformers looks for them).
        map_location: as for ``torch.load`` (str, ``torch.device``, dict or callable).
        mmap: ``False`` reads the data into memory instead of mapping it.
        weights_only: for legacy (pickle) shards only: ``False`` lets torch's full
            unpickler run, which can run code from the file; only for trusted files.

    Returns:
        Names to tensors: shard by shard, each in its file's order.

    Raises:
        FileNotFoundError: the path, or a shard the index lists, is missing (named).
        SafetensorError: the index is invalid, a shard is malformed, a special file or
            disagrees with the index, or two shards hold the same name (naming the files).
        ValueError: a directory holds several checkpoints.
        pickle.UnpicklingError: torch's weights_only loader refused a legacy shard.

    Example:
        >>> sd = load_sharded("ckpt/model.safetensors.index.json", map_location="meta")
    """
    for attempt in range(_ATTEMPTS):
        before = _snapshot(path)
        try:
            return _load_once(path, map_location, mmap, weights_only)
        except _Changed:
            cause: Optional[BaseException] = None
        except (FileNotFoundError, SafetensorError) as e:
            # a save replaced the checkpoint between reading its index and opening a
            # shard (the old shard is gone): the new one is complete, load it instead
            racing = isinstance(e, FileNotFoundError) or getattr(e, "code", None) == "index_mismatch"
            if not racing or _snapshot(path) == before:
                raise
            cause = e
        if attempt == _ATTEMPTS - 1:
            raise _core.error(f"{_source.fspath(path)}: another save replaced the checkpoint during each of "
                              f"{_ATTEMPTS} attempts to load it; is a save looping over it?",
                              "checkpoint_changed") from cause
    raise AssertionError("unreachable")


# each retry follows a save that completed during the attempt (the snapshot changed), so
# retrying is progress, never a spin: a busy machine with two savers needed more than 3
_ATTEMPTS = 10


def _snapshot(path: FILE_PATH) -> Any:
    """What changes when a save replaces the checkpoint at path: the directory's
    entries, or the index file itself."""
    p = _source.fspath(path)
    return [_identity(q) for q in (p, os.path.dirname(p) or ".")]


def _load_once(path: FILE_PATH, map_location: Any, mmap: Optional[bool], weights_only: bool) -> Dict[str, torch.Tensor]:
    kind, resolved = find_checkpoint(path, legacy=True)
    if kind == "file":
        return _load_file(resolved, map_location, mmap)
    if kind == "legacy_file":
        return _load_legacy(resolved, map_location, mmap, weights_only)
    out: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}
    index_before = _identity(resolved)
    for file, shard, listed in _shards_of(resolved):
        part = _load_shard(resolved, file, shard, listed, map_location, mmap, weights_only)
        for name, t in part.items():
            if name in out:
                raise _core.error(f"tensor {name!r} is in both {origin[name]} and {shard}",
                                  "duplicate_tensor", name)
            out[name] = t
            origin[name] = shard
    if _identity(resolved) != index_before:
        # a save completed while the shards were opened, and a later one may have
        # reused a shard name this index gave (standard names are taken again once
        # free): the shards opened may belong to different saves
        raise _Changed(resolved)
    return out


class _Changed(Exception):
    """The index was replaced while its shards were being opened."""


def _identity(path: str) -> Any:
    """Which file is at path, and its last change (None: none there). A save replaces
    the index (a new inode) before any later save can reuse a name it gives, so an index
    unchanged from before its shards were opened until after proves every shard opened
    is the one it names."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
