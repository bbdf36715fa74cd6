"""The command line: ``torch-safetensors`` and ``python -m torch_safetensors``.

Subcommands: ``inspect``, ``convert``, ``verify`` and ``demo``. User errors print one
line to stderr and exit with a documented status (see ``EXIT_STATUSES``), never a
traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import stat
import sys
import tempfile
import textwrap
import threading
import time
import zipfile
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, TextIO, Tuple

import torch

from . import _C, _checkpoint, _core, _legacy_map, _sharded, _source, _torch
from ._checksums import CHECKSUM_ALGORITHM, CHECKSUM_KEY, file_crc as _file_crc, read_checksums
from ._core import SafetensorError

__all__ = ["main", "EXIT_OK", "EXIT_INVALID", "EXIT_USAGE", "EXIT_IO", "EXIT_REFUSED"]

EXIT_OK = 0
EXIT_INVALID = 1  # a file is not valid (or its contents cannot be stored as safetensors)
EXIT_USAGE = 2  # bad arguments
EXIT_IO = 3  # not found, unreadable, unwritable
EXIT_REFUSED = 4  # a legacy file the weights_only unpickler refused: never run
EXIT_INTERRUPTED = 130

_STATUS_LINES = {
    0: "  0  success",
    1: "  1  invalid input: a malformed or corrupt file, a shard that disagrees with its\n"
       "     index, or a checkpoint holding objects safetensors cannot store",
    2: "  2  usage error: bad arguments or options",
    3: "  3  I/O error: a file or directory is missing, unreadable or unwritable",
    4: "  4  refused: a legacy checkpoint that the safe (weights_only) unpickler will not\n"
       "     load, because it would run code or is not a plain weights file; nothing in it\n"
       "     was executed",
    130: "  130 interrupted (Ctrl-C)",
}
# what each subcommand can return, with its own wording where it differs
_STATUSES = {
    None: (0, 1, 2, 3, 4, 130),
    "inspect": (0, 1, 2, 3, 130),
    "convert": (0, 1, 2, 3, 4, 130),
    "verify": (0, 1, 2, 3, 130),
    "demo": (0, 1, 2, 3, 130),
}
_STATUS_OVERRIDES = {
    ("verify", 0): "  0  every FILE is valid",
    ("verify", 1): "  1  at least one FILE is invalid (malformed, corrupt, a shard that disagrees\n"
                   "     with its index, or tensor data that does not match its checksum)",
    ("verify", 3): "  3  none is invalid, but at least one is missing or unreadable",
    ("demo", 1): "  1  the demo's checks failed",
    ("inspect", 1): "  1  FILE is not a valid safetensors checkpoint (a legacy pickle checkpoint\n"
                    "     is named as such, with the command that converts it)",
}


def exit_statuses(command: Optional[str] = None) -> str:
    """The "exit status" help section for a subcommand (None: the program)."""
    lines = ["exit status:"]
    for code in _STATUSES[command]:
        lines.append(_STATUS_OVERRIDES.get((command, code), _STATUS_LINES[code]))
    return "\n".join(lines) + "\n"


EXIT_STATUSES = exit_statuses()

PROGRESS_MIN_BYTES = 64 * 2**20  # "auto" shows a bar for files at least this large


class CLIError(Exception):
    """A user-facing failure: one line of message and an exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


# ---- output helpers ----


_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x00, 0x20), *range(0x7F, 0xA0))}


def _clean(text: str) -> str:
    """Text from a file made safe for a terminal: C0 and C1 control characters (ESC,
    CSI, BEL, CR, ...) and DEL become visible \\xNN escapes, so a hostile name cannot
    move the cursor, recolour or rewrite what the user sees. Newlines are kept only
    where we print them ourselves (never in text taken from a file)."""
    return str(text).translate(_CONTROLS)


def _emit(line: str = "") -> None:
    """Prints one line of our own output, with anything from a file already cleaned."""
    sys.stdout.write(_clean(line) + "\n")


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{n} B"


def _shown(name: str) -> str:
    return _clean(name)


def _json_out(doc: Any) -> None:
    """Exact JSON, with C1 controls and DEL escaped too (JSON escapes only C0)."""
    text = json.dumps(doc, indent=2, ensure_ascii=False)
    sys.stdout.write(text.translate({c: f"\\u{c:04x}" for c in range(0x7F, 0xA0)}) + "\n")


class _Bar:
    """A byte-count progress bar on stderr, redrawn in place; silent when disabled."""

    def __init__(self, total: int, label: str, *, enabled: bool, stream: Optional[TextIO] = None) -> None:
        self.total = max(total, 1)
        self.label = label
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self._last = ""
        self._t0 = time.monotonic()

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        self.done = min(max(done, self.done), self.total)
        frac = self.done / self.total
        width = 30
        filled = int(frac * width)
        rate = self.done / max(time.monotonic() - self._t0, 1e-6)
        line = (f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {frac * 100:5.1f}% "
                f"{_human(self.done)} / {_human(self.total)} ({_human(int(rate))}/s)")
        if line != self._last:
            self.stream.write(line)
            self.stream.flush()
            self._last = line

    def close(self) -> None:
        if self.enabled and self._last:
            self.stream.write("\n")
            self.stream.flush()


class _Watcher:
    """Follows the size of the writer's temporary files in a directory, for the bar.

    The C writer writes ``.{target}.{random}.tmp`` beside its target; ``base()`` gives
    the bytes of files already finished.
    """

    def __init__(self, bar: _Bar, directory: str, stem: str, base: Callable[[], int]) -> None:
        self.bar = bar
        self.directory = directory or "."
        self.stem = "." + stem
        self.base = base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _partial(self) -> int:
        total = 0
        try:
            with os.scandir(self.directory) as it:
                for e in it:
                    if e.name.startswith(self.stem) and e.name.endswith(".tmp"):
                        try:
                            total += e.stat().st_size
                        except OSError:
                            pass
        except OSError:
            pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.bar.update(self.base() + self._partial())

    def __enter__(self) -> "_Watcher":
        if self.bar.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


# ---- what a path holds, when it is not safetensors ----

_PRE16_HEAD = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_LEGACY_SHARD = re.compile(r"pytorch_model(-\d{5,}-of-\d{5,})?\.bin")
LEGACY_INDEX = "pytorch_model.bin.index.json"


def _read_head(path: str, n: int = 512) -> Tuple[bytes, int]:
    """The first bytes and the size of a regular file (never blocks on a FIFO or device)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return b"", -1
        return os.pread(fd, n, 0), st.st_size
    finally:
        os.close(fd)


def legacy_kind(path: str) -> Optional[str]:
    """What a file that is not safetensors is, when it is one of torch's own formats."""
    try:
        head, size = _read_head(path)
    except OSError:
        return None
    if size < 0 or _C.sniff(head[:4096], size):
        return None
    if head.startswith(b"PK\x03\x04"):
        return "a legacy PyTorch checkpoint (torch.save's zip format)"
    if head.startswith(_PRE16_HEAD):
        return "a legacy PyTorch checkpoint (the pre-1.6 pickle format)"
    if head[257:262] == b"ustar":
        return "a legacy PyTorch checkpoint (the tar format of torch < 0.4)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a pickle file"
    return None


def legacy_shards(path: str) -> Optional[Tuple[Optional[str], List[str]]]:
    """(index or None, shard paths) when path is a Hugging Face checkpoint of legacy
    ``pytorch_model*.bin`` shards (a directory without safetensors, or their index)."""
    if os.path.isdir(path):
        try:
            names = sorted(os.listdir(path))
        except OSError:
            return None
        if any(n.endswith(".safetensors") or n.endswith(_sharded.INDEX_SUFFIX) for n in names):
            return None  # safetensors first, as transformers
        bins = [n for n in names if _LEGACY_SHARD.fullmatch(n)]
        index = os.path.join(path, LEGACY_INDEX) if LEGACY_INDEX in names else None
        if index is not None:
            return index, _index_shards(index)
        if bins == ["pytorch_model.bin"]:
            return None, [os.path.join(path, bins[0])]
        if bins:
            raise CLIError(f"{path}: legacy shard files ({bins[0]}, ...) but no {LEGACY_INDEX}: "
                           "an interrupted download, or the index is missing", EXIT_INVALID)
        return None
    if path.endswith(".bin.index.json") and os.path.isfile(path):
        return path, _index_shards(path)
    return None


def _index_shards(index: str) -> List[str]:
    weight_map = _sharded.read_index(index)
    files = sorted(set(weight_map.values()))
    return [os.path.join(os.path.dirname(index), f) for f in files]


def _not_safetensors(path: str) -> Optional[CLIError]:
    """A CLIError that says what path is and how to convert it, if it is a legacy
    checkpoint (a file, a directory of legacy shards or their index)."""
    shards = legacy_shards(path)
    if shards is not None:
        index, files = shards
        what = (f"a Hugging Face checkpoint of {len(files)} legacy (pickle) shard"
                f"{'s' if len(files) != 1 else ''}" + (f" (index {os.path.basename(index)})" if index else ""))
        out = os.path.normpath(path if os.path.isdir(path) else os.path.dirname(path) or ".") + "-safetensors"
        return CLIError(f"{path}: {what}, not safetensors; convert it: {_PROG} convert {path} {out}",
                        EXIT_INVALID)
    kind = legacy_kind(path) if os.path.isfile(path) else None
    if kind is None:
        return None
    stem, _ext = os.path.splitext(path)
    if kind == "a pickle file":
        return CLIError(f"{path}: {kind}, not safetensors (if it is a torch checkpoint, convert it: "
                        f"{_PROG} convert {path} {stem}.safetensors)", EXIT_INVALID)
    return CLIError(f"{path}: {kind}, not safetensors; convert it: {_PROG} convert {path} {stem}.safetensors",
                    EXIT_INVALID)


# ---- reading files for inspect and verify ----


def _open(path: str) -> "_C.Reader":
    """A validated reader; errors name the file."""
    return _sharded._open_reader(path, True)


def _check_structure(reader: "_C.Reader") -> None:
    """Validates a whole-checkpoint structure key, building meta tensors only (no data read)."""
    meta = reader.metadata() or {}
    if _checkpoint.STRUCTURE_KEY in meta:
        _checkpoint.unflatten(_torch._read_tensors(reader, "meta"), meta, check=True)


def aliases(metadata: Dict[str, str], names: Sequence[str],
            tree: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
    """Tied names a file records but stores once: alias -> stored name.

    From the whole-checkpoint structure's ties (``tree``, from ``_checkpoint.describe``:
    torch.save, save_sharded), and from the ``{removed: kept}`` entries that
    safetensors' ``save_model`` writes."""
    held = set(names)
    out: Dict[str, str] = {}
    for stored, places in ((tree or {}).get("ties") or {}).items():
        for where in places:
            if where != stored:
                out[where] = stored
    for alias, stored in metadata.items():
        if alias not in held and stored in held:
            out.setdefault(alias, stored)
    return dict(sorted(out.items()))


def _describe_file(path: str, reader: Optional["_C.Reader"] = None, *, check: bool = False) -> Dict[str, Any]:
    """One file's entries and totals; closes the reader."""
    reader = reader if reader is not None else _open(path)
    try:
        if check:
            _check_structure(reader)
        tensors = []
        for name in reader.offset_keys():
            dtype, shape, begin, end = reader.info(name)
            tensors.append({"name": name, "dtype": dtype, "shape": list(shape),
                            "bytes": end - begin, "offset": begin, "file": path})
        meta = reader.metadata() or {}
        out: Dict[str, Any] = {
            "file": {"path": path, "size": reader.file_size, "header_size": reader.data_start,
                     "tensors": len(tensors), "metadata": meta},
            "tensors": tensors,
        }
        if _checkpoint.STRUCTURE_KEY in meta:  # a whole checkpoint: its tree (issue 14)
            try:
                out["file"]["tree"] = _checkpoint.describe(meta[_checkpoint.STRUCTURE_KEY],
                                                           {t["name"]: t for t in tensors})
            except SafetensorError as e:
                out["file"]["tree_error"] = str(e)
        names = [t["name"] for t in tensors]
        out["file"]["aliases"] = aliases(meta, names, out["file"].get("tree"))
        return out
    finally:
        reader.close()


def _describe(path: str, *, check: bool = False) -> Dict[str, Any]:
    """A checkpoint (file, index or directory) as a JSON-ready description."""
    legacy = _not_safetensors(path)
    if legacy is not None:
        raise legacy
    try:
        kind, resolved = _sharded.find_checkpoint(path)
    except ValueError as e:
        raise CLIError(str(e), EXIT_USAGE) from None
    files: List[Dict[str, Any]] = []
    tensors: List[Dict[str, Any]] = []
    index = None
    if kind == "file":
        legacy = _not_safetensors(resolved) if resolved != path else None
        if legacy is not None:
            raise legacy
        part = _describe_file(resolved, check=check)
        files.append(part["file"])
        tensors += part["tensors"]
    else:
        index = resolved
        for shard, reader in _sharded.iter_shards(resolved):
            part = _describe_file(shard, reader, check=check)
            files.append(part["file"])
            tensors += part["tensors"]
    tied: Dict[str, str] = {}
    for f in files:
        tied.update(f["aliases"])
    return {
        "path": path,
        "format": "sharded" if index else "safetensors",
        "index": index,
        "files": files,
        "tensors": tensors,
        "aliases": tied,
        "total_tensors": len(tensors),
        "total_bytes": sum(t["bytes"] for t in tensors),
    }


# ---- inspect ----


def _table(rows: List[List[str]], right: Sequence[int]) -> List[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)]
        out.append("  ".join(cells).rstrip())
    return out


def cmd_inspect(args: argparse.Namespace) -> int:
    """``inspect FILE [--json]``: tensors, totals and metadata of a file, index or directory."""
    desc = _describe(args.file)
    if args.json:
        _json_out(desc)
        return EXIT_OK
    sharded = desc["index"] is not None
    head = ["name", "dtype", "shape", "bytes", "offset"] + (["file"] if sharded else [])
    rows = [head]
    for t in desc["tensors"]:
        row = [_shown(t["name"]), t["dtype"], "[" + ", ".join(map(str, t["shape"])) + "]",
               f"{t['bytes']:,}", f"{t['offset']:,}"]
        if sharded:
            row.append(_shown(os.path.basename(t["file"])))
        rows.append(row)
    _emit(f"{desc['path']}: " + (f"sharded checkpoint, {len(desc['files'])} files (index {desc['index']})"
                                 if sharded else "safetensors file"))
    _emit()
    for line in _table(rows, right=(3, 4)):
        _emit(line)
    _emit()
    file_bytes = sum(f["size"] for f in desc["files"])
    header_bytes = sum(f["header_size"] for f in desc["files"])
    for f in desc["files"]:
        if "tree_error" in f:
            _emit(f"checkpoint tree: {_one_line(f['tree_error'])}")
            _emit()
        if "tree" in f:
            _emit(f"checkpoint tree ({_shown(os.path.basename(f['path']))}, structure version {f['tree']['version']}):")
            for line in _checkpoint.tree_lines(f["tree"]):
                _emit(f"  {_shown(line)}")
            _emit()
    _emit(f"total: {desc['total_tensors']:,} tensors, {desc['total_bytes']:,} bytes of data "
          f"({_human(desc['total_bytes'])}); headers {header_bytes:,} bytes; "
          f"file{'s' if sharded else ''} {file_bytes:,} bytes")
    # the tree already shows its ties: list the others (safetensors' save_model records)
    listed: Dict[str, str] = {}
    for f in desc["files"]:
        listed.update(aliases(f["metadata"], [t["name"] for t in desc["tensors"] if t["file"] == f["path"]]))
    if listed:
        _emit(f"tied: {len(listed):,} name{'s' if len(listed) > 1 else ''} stored once "
              "under another name:")
        for alias, stored in sorted(listed.items()):
            _emit(f"  {alias} -> {stored}")
    for f in desc["files"]:
        meta = f["metadata"]
        label = f"metadata ({_shown(os.path.basename(f['path']))})" if sharded else "metadata"
        if not meta:
            _emit(f"{label}: none")
            continue
        _emit(f"{label}:")
        for k in sorted(meta):
            v = meta[k]
            if k == _checkpoint.STRUCTURE_KEY:
                v = f"<whole-checkpoint structure, {len(v):,} characters of JSON>"
            elif k == CHECKSUM_KEY:
                v = f"<per-tensor {CHECKSUM_ALGORITHM} checksums: verify --data checks them>"
            elif len(v) > 200:
                v = v[:200] + "..."
            _emit(f"  {k}: {_one_line(v)}")
    return EXIT_OK


# ---- verify ----


def _check_data(path: str) -> str:
    """Reads every tensor's bytes and compares them with the checksums recorded at save
    time. Returns a note for the OK line; raises SafetensorError naming the tensors that
    do not match."""
    reader = _sharded._open_reader(path, False)  # pread from the validated descriptor
    try:
        recorded = read_checksums(reader.metadata() or {}, path)
        names = reader.offset_keys()
        bad = []
        for name in names:
            _dtype, _shape, begin, end = reader.info(name)
            got = _file_crc(reader.fd, begin, end, path)
            if recorded is not None and name in recorded and recorded[name] != got:
                bad.append(name)
        if bad:
            raise _core.error(
                f"{path}: tensor data does not match the checksums recorded at save time: "
                f"{', '.join(map(repr, bad[:5]))}{', ...' if len(bad) > 5 else ''} "
                f"({len(bad)} of {len(names)} tensors): the file is corrupt",
                "checksum", bad[0])
        if recorded is None:
            return "data read in full; no checksums recorded (save with checksums=True to record them)"
        unchecked = len([n for n in names if n not in recorded])
        return (f"data matches {len(names) - unchecked:,} recorded checksum{'s' if len(names) - unchecked != 1 else ''}"
                + (f", {unchecked:,} tensors without one" if unchecked else ""))
    finally:
        reader.close()


def cmd_verify(args: argparse.Namespace) -> int:
    """``verify FILE... [--data]``: one line per file; 0 only if all are valid."""
    invalid = unreadable = 0
    for path in args.files:
        try:
            desc = _describe(path, check=True)
            notes = [_check_data(f["path"]) for f in desc["files"]] if args.data else []
        except (SafetensorError, CLIError, ValueError, TypeError) as e:
            invalid += 1
            message = _one_line(str(e))
            if message.startswith(f"{path}: "):
                message = message[len(path) + 2:]  # the line already names the file
            _emit(f"INVALID  {path}: {message}")
            continue
        except OSError as e:
            unreadable += 1
            message = _os_message(e)
            if message.startswith(f"{path}: "):
                message = message[len(path) + 2:]
            _emit(f"ERROR    {path}: {message}")
            continue
        what = (f"sharded, {len(desc['files'])} files, " if desc["index"] else "")
        if args.data:
            note = notes[0] if len(set(notes)) == 1 else "; ".join(
                f"{os.path.basename(f['path'])}: {n}" for f, n in zip(desc["files"], notes))
        else:
            note = "header and layout checked; tensor data not read (--data reads it)"
        _emit(f"OK       {path} ({what}{desc['total_tensors']:,} tensors, {_human(desc['total_bytes'])}; {note})")
    bad = invalid + unreadable
    if bad:
        _say(f"{bad} of {len(args.files)} checkpoint{'s' if len(args.files) > 1 else ''} "
             f"failed verification")
        return EXIT_INVALID if invalid else EXIT_IO
    return EXIT_OK


# ---- convert ----


def _refusal_reason(err: BaseException) -> str:
    """What torch's weights_only unpickler refused, in one line: the class or global
    when it names one."""
    text = _ANSI.sub("", str(err))
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return (f"it needs {m.group(1)}, a class or function outside torch's weights_only "
                "allowlist")
    m = re.search(r"WeightsUnpickler error: (.+)", text)
    if m:
        return m.group(1).strip().rstrip(".")
    skip = ("weights only load failed", "please file an issue", "check the documentation",
            "torch_safetensors loaded", "(1)", "(2)", "(3)")
    for line in text.splitlines():
        line = line.strip()
        if line and not line.lower().startswith(skip):
            return line.rstrip(".")
    return "it is not a plain weights file"


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _load_legacy(src: str) -> Any:
    """Loads src with weights_only semantics only; never runs code from it.

    Zip checkpoints are mapped by torch (mmap=True), pre-1.6 ones by _legacy_map: the
    data is read only when the writer copies it out, so memory does not grow with the
    file. Anything else is read by torch.load(weights_only=True)."""
    os.close(_source.open_regular(src)[0])  # a FIFO or a device is refused, never waited on
    try:
        head, _size = _read_head(src, 64)
        if _legacy_map.is_pre16(head):
            try:
                return _legacy_map.load_pre16_mapped(src)
            except _legacy_map.NotMappable:
                pass  # torch's own loader below, reading into memory (still weights_only)
        mmap = zipfile.is_zipfile(src)  # torch maps only zip checkpoints
        return torch.load(src, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise _refused(src, e) from None
    except (SafetensorError, OSError):
        raise
    except Exception as e:  # a damaged zip or pickle: torch raises many kinds
        raise CLIError(f"{src}: cannot be read as a checkpoint: {type(e).__name__}: {_one_line(str(e))}",
                       EXIT_INVALID) from None


def _refused(src: str, err: BaseException) -> CLIError:
    return CLIError(
        f"refused {src}: the safe (weights_only) unpickler would not load it: "
        f"{_refusal_reason(err)}; nothing in it was run (if you trust the file, convert it in "
        "Python with torch.load(..., weights_only=False))",
        EXIT_REFUSED,
    )


def _is_state_dict(obj: Any) -> bool:
    """A flat dict of str -> Tensor: what "state dict" means in messages."""
    return isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                         for k, v in obj.items())


def _flat_state_dict(obj: Any, src: str) -> Dict[str, torch.Tensor]:
    if _is_state_dict(obj):
        return obj
    hint = ""
    if isinstance(obj, dict):
        subs = [k for k, v in obj.items() if isinstance(v, dict)]
        if subs:
            hint = f" (it holds {', '.join(map(repr, subs[:3]))}: convert without --shard-size to keep it whole)"
    raise CLIError(f"--shard-size needs a state dict (a flat dict of names to tensors), and {src} "
                   f"holds a whole checkpoint{hint}", EXIT_INVALID)


def _tensor_refs(obj: Any) -> List[torch.Tensor]:
    """Every tensor reference in a checkpoint, in order (ties counted per name)."""
    out: List[torch.Tensor] = []
    stack = [obj]
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, dict):
            stack.extend(reversed(list(v.values())))
        elif isinstance(v, (list, tuple)):
            stack.extend(reversed(v))
        elif isinstance(v, (set, frozenset)):
            stack.extend(v)
    return out


def _counts(obj: Any) -> Tuple[int, int, int]:
    """(tensor names, names stored once as ties of another, bytes of data counting
    ties once): the one way every convert mode counts."""
    seen = set()
    total = ties = 0
    refs = _tensor_refs(obj)
    for t in refs:
        key = _checkpoint.view_key(t)
        if key is not None and key in seen:
            ties += 1
            continue
        total += t.numel() * t.element_size()
        if key is not None:
            seen.add(key)
    return len(refs), ties, total


def _summary(obj: Any) -> Tuple[str, int]:
    names, ties, total = _counts(obj)
    kind = "state dict" if _is_state_dict(obj) else "whole checkpoint"
    tied = f" ({ties:,} tied, stored once)" if ties else ""
    return f"{kind}, {names:,} tensor{'s' if names != 1 else ''}{tied}, {_human(total)}", total


def _data_bytes(tensors: Dict[str, torch.Tensor]) -> int:
    """Bytes of data, counting ties once."""
    return _counts(tensors)[2]


def _progress_enabled(choice: Optional[bool], total: int) -> bool:
    if choice is not None:
        return choice
    return total >= PROGRESS_MIN_BYTES and sys.stderr.isatty()


def _check_sizes(args: argparse.Namespace) -> Optional[int]:
    if args.shard_size is None:
        return None
    try:
        return _sharded.parse_size(args.shard_size)
    except (TypeError, ValueError, OverflowError) as e:
        raise CLIError(f"--shard-size: {e}", EXIT_USAGE) from None


def _write_sharded(obj: Any, src: str, dst: str, limit: int, args: argparse.Namespace, label: str) -> int:
    if args.checksums:
        raise CLIError("--checksums records checksums in a single-file output; sharded output does "
                       "not support it yet", EXIT_USAGE)
    sd = _flat_state_dict(obj, src)
    summary, total = _summary(sd)
    bar = _Bar(total, label, enabled=_progress_enabled(args.progress, total))
    done = [0]

    def step(written: int, _total: int) -> None:
        done[0] = written
        bar.update(written)

    with _Watcher(bar, dst, args.prefix + "-", lambda: done[0]):
        written = _sharded._save_sharded(sd, dst, max_shard_size=limit, prefix=args.prefix, progress=step)
    bar.close()
    shards = [p for p in written if p.endswith(".safetensors")]
    _emit(f"converted {src} -> {dst}: {summary} in {len(shards)} file{'s' if len(shards) > 1 else ''}"
          + (f" (index {os.path.basename(written[-1])})" if len(shards) > 1 else ""))
    return EXIT_OK


def _load_legacy_shards(src: str) -> Dict[str, torch.Tensor]:
    """One state dict from a directory of legacy shards (or their index), through the
    sharded loader that torch.load uses: each shard with weights_only, zip shards mapped,
    every shard checked against the index."""
    try:
        return _sharded.load_sharded(src, map_location="cpu", mmap=True)
    except pickle.UnpicklingError as e:
        raise _refused(src, e) from None


def cmd_convert(args: argparse.Namespace) -> int:
    """``convert SRC DST [--shard-size SIZE]``: a legacy checkpoint to safetensors, safely."""
    src, dst = args.src, args.dst
    if not os.path.exists(src):
        raise FileNotFoundError(2, "no such file or directory", src)
    if os.path.exists(dst) and os.path.samefile(src, dst):
        raise CLIError("SRC and DST are the same file; write the safetensors checkpoint elsewhere", EXIT_USAGE)
    limit = _check_sizes(args)
    shards = legacy_shards(src)
    if shards is not None:
        # a Hugging Face checkpoint of pytorch_model-*.bin shards: a sharded safetensors one
        if os.path.exists(dst) and not os.path.isdir(dst):
            raise CLIError(f"{dst} is a file; a sharded checkpoint converts into a directory", EXIT_USAGE)
        sd = _load_legacy_shards(src)
        return _write_sharded(sd, src, dst, limit if limit is not None else _sharded.parse_size("5GB"),
                              args, "converting shards")
    if os.path.isdir(src):
        raise CLIError(f"{src} is a directory without legacy shards (pytorch_model*.bin); convert takes "
                       "one legacy checkpoint file or such a directory", EXIT_USAGE)
    if limit is not None:
        if os.path.exists(dst) and not os.path.isdir(dst):
            raise CLIError(f"{dst} is a file; with --shard-size DST is a directory", EXIT_USAGE)
    elif os.path.isdir(dst):
        raise CLIError(f"{dst} is a directory; give a file name, or use --shard-size to write a "
                       "sharded checkpoint into it", EXIT_USAGE)

    obj = _load_legacy(src)  # zip checkpoints are mapped: their bytes are read as they are written
    if limit is not None:
        return _write_sharded(obj, src, dst, limit, args, "converting")

    try:
        tensors, structure = _checkpoint.flatten(obj)  # refuses what cannot be stored
    except (TypeError, ValueError) as e:
        raise CLIError(f"{src}: {_one_line(str(e))}", EXIT_INVALID) from None
    summary, total = _summary(obj)
    bar = _Bar(total, "converting", enabled=_progress_enabled(args.progress, total))
    with _Watcher(bar, os.path.dirname(dst), os.path.basename(dst) + ".", lambda: 0):
        # flatten already stored ties once: no overlap check, no second walk
        _torch.save_safetensors(obj, dst, parts=(tensors, structure, False), checksums=args.checksums)
    bar.update(total)
    bar.close()
    _emit(f"converted {src} -> {dst}: {summary}")
    return EXIT_OK


# ---- demo ----


class _Marker:
    """A harmless stand-in for a malicious payload: it would create a file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _timed(fn: Callable[[], object], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _mib(n: int) -> str:
    return f"{n / 2**20:8.2f} MiB"


def demo(out: Optional[str] = None) -> int:
    """Trains a tiny model, saves and loads it both ways, and shows a refused payload.

    Writes into ``out`` (kept), or into a new temporary directory that is removed at
    the end, whatever happens.
    """
    if out is not None:
        os.makedirs(out, exist_ok=True)
        print(f"writing the demo's files into {out} (kept afterwards)")
        return _demo(out)
    work = tempfile.mkdtemp(prefix="torch_safetensors_demo_")
    print(f"writing the demo's files into {work} (removed at the end)")
    try:
        return _demo(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        print(f"removed {work}")


def _demo(work: str) -> int:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, torch_safetensors {_version()}\n")

    # 1. train a tiny model for a few steps
    def make_model() -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
            torch.nn.ReLU(), torch.nn.Linear(1024, 10),
        )

    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(512, 256), torch.randint(0, 10, (512,))
    for step in range(20):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"1. trained a {sum(p.numel() for p in model.parameters()):,}-parameter MLP "
          f"for 20 steps (loss {loss.item():.3f})")

    # 2. save it as safetensors, through plain torch.save
    st_path = os.path.join(work, "model.pt")  # the name does not matter: content decides
    sd = model.state_dict()
    torch.save(sd, st_path, format="safetensors")
    with open(st_path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        print(f"2. torch.save(..., format='safetensors') wrote {os.path.getsize(st_path):,} bytes; "
              f"header: {f.read(min(header_len, 90)).decode()}...")

    # 3. load it back with plain torch.load and check it is the same model
    loaded = torch.load(st_path)
    fresh = make_model()
    fresh.load_state_dict(loaded)
    same = torch.equal(fresh(x), model(x))
    print(f"3. torch.load read it back zero-copy ({len(loaded)} tensors); "
          f"outputs identical: {same}")

    # 4. a legacy pickle checkpoint still loads, through the weights_only unpickler
    legacy = os.path.join(work, "legacy.pt")
    torch.save({"model": sd, "step": 20}, legacy, format="pickle")
    back = torch.load(legacy)
    print(f"4. legacy checkpoint loaded transparently (weights_only=True): "
          f"step={back['step']}, {len(back['model'])} tensors")

    # 5. a malicious legacy checkpoint is refused and its payload never runs
    marker = os.path.join(work, "PWNED")
    evil = os.path.join(work, "evil.pt")
    torch.save({"weight": torch.zeros(2), "payload": _Marker(marker)}, evil, format="pickle")
    try:
        torch.load(evil)
        refused = False
    except pickle.UnpicklingError as e:
        refused = True
        lines = [ln for ln in str(e).splitlines() if "GLOBAL" in ln] or str(e).splitlines()
        reason = lines[0].strip()[:120]
    ran = os.path.exists(marker)
    print(f"5. malicious checkpoint refused: {refused}; payload ran: {ran}")
    if refused:
        print(f"   ({reason})")

    # 6. sizes and timings against pickle
    pk_path = os.path.join(work, "model_pickle.pt")
    t_save_st = _timed(lambda: torch.save(sd, st_path, format="safetensors"))
    t_save_pk = _timed(lambda: torch.save(sd, pk_path))
    t_load_st = _timed(lambda: torch.load(st_path))
    t_load_pk = _timed(lambda: torch.load(pk_path))
    t_load_mm = _timed(lambda: torch.load(pk_path, mmap=True))
    rows = [
        ("file size", _mib(os.path.getsize(st_path)), _mib(os.path.getsize(pk_path))),
        ("save", f"{t_save_st * 1e3:8.2f} ms", f"{t_save_pk * 1e3:8.2f} ms"),
        ("load", f"{t_load_st * 1e3:8.2f} ms", f"{t_load_pk * 1e3:8.2f} ms"),
        ("load (pickle mmap=True)", "", f"{t_load_mm * 1e3:8.2f} ms"),
    ]
    print("\n6. medians of 5 runs      safetensors        pickle")
    for name, a, b in rows:
        print(f"   {name:24s}{a:>13s}{b:>14s}")
    ok = same and refused and not ran
    print("\ndemo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


def _version() -> str:
    import torch_safetensors

    return torch_safetensors.__version__


def cmd_demo(args: argparse.Namespace) -> int:
    """``demo [--out DIR]``: the built-in example."""
    return demo(args.out)


# ---- the parser and the error boundary ----


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line and status 2."""

    def error(self, message: str) -> NoReturn:
        _say(f"{message} (see {self.prog} --help)")
        sys.exit(EXIT_USAGE)


_PROG = "torch-safetensors"


def _say(message: str) -> None:
    sys.stderr.write(_clean(f"{_PROG}: error: {_one_line(message)}") + "\n")
    sys.stderr.flush()


def _os_message(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else ""
    text = e.strerror or str(e)
    return f"{where}{text}"


def _wrap(text: str) -> str:
    """A help description wrapped to the terminal's usual width (argparse's raw
    formatter keeps our epilog tables as written, so it would not wrap these)."""
    return textwrap.fill(text, 79)


def build_parser(prog: str = _PROG) -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=prog,
        description=_wrap("Inspect, convert and verify safetensors checkpoints (single files, "
                    "Hugging Face sharded checkpoints and legacy torch pickles)."),
        epilog=EXIT_STATUSES,
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {_version()} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="what to do (each COMMAND has its own --help)",
                                parser_class=_Parser)

    p = sub.add_parser("inspect", help="list a checkpoint's tensors, totals and metadata",
                       description=_wrap("Print a table of tensors (name, dtype, shape, bytes, offset), "
                                   "totals, tied names and metadata. Only the headers are read. "
                                   "A legacy torch checkpoint is named as such, with the command "
                                   "that converts it."),
                       epilog=exit_statuses("inspect"), formatter_class=fmt)
    p.add_argument("file", metavar="FILE",
                   help="a safetensors file, a *.safetensors.index.json, or a checkpoint directory")
    p.add_argument("--json", action="store_true", help="print a JSON description instead")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("convert", help="convert a legacy torch checkpoint to safetensors, safely",
                       description=_wrap("Convert a legacy checkpoint to safetensors: a torch zip file or "
                                   "a pre-1.6 pickle (a state dict or a whole training checkpoint), "
                                   "or a Hugging Face directory of pytorch_model-*.bin shards (or "
                                   "its pytorch_model.bin.index.json), which becomes a sharded "
                                   "safetensors checkpoint. SRC is loaded only with "
                                   "weights_only=True: a file that would run code, or is not a "
                                   "plain weights file, is refused and nothing in it runs. Zip "
                                   "checkpoints are mapped, so their bytes are read as they are "
                                   "written."),
                       epilog=exit_statuses("convert"), formatter_class=fmt)
    p.add_argument("src", metavar="SRC",
                   help="the legacy checkpoint: a .pt/.pth/.bin file, or a directory of "
                        "pytorch_model-*.bin shards or its index")
    p.add_argument("dst", metavar="DST",
                   help="the safetensors file to write (a directory with --shard-size or a "
                        "sharded SRC)")
    p.add_argument("--shard-size", metavar="SIZE",
                   help="write a Hugging Face sharded checkpoint into directory DST, with shards "
                        "of at most SIZE (e.g. 5GB, 500MB, 2GiB, or bytes; default for a sharded "
                        "SRC: 5GB); needs a state dict")
    p.add_argument("--prefix", default="model",
                   help="file name stem of the shards (default: model)")
    p.add_argument("--checksums", action="store_true",
                   help="record each tensor's CRC32C in the header, for verify --data "
                        "(single-file output)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar on stderr (default: for files of 64 MiB or more, "
                        "when stderr is a terminal)")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("verify", help="validate files strictly; exit 0 only if all are valid",
                       description=_wrap("Validate each FILE strictly with the torch_safetensors reader: "
                                   "every header rule and the exact file length, plus the "
                                   "whole-checkpoint structure when present. An index or a "
                                   "directory verifies every shard and that the index agrees with "
                                   "them. Without --data only headers are read: tensor bytes are "
                                   "not checked. With --data every tensor is read and compared "
                                   "with the CRC32C checksums recorded at save time "
                                   "(torch.save(..., checksums=True), save_file(..., "
                                   "checksums=True), convert --checksums). Prints one line per FILE."),
                       epilog=exit_statuses("verify"), formatter_class=fmt)
    p.add_argument("files", metavar="FILE", nargs="+",
                   help="safetensors files, *.safetensors.index.json files or checkpoint directories")
    p.add_argument("--data", action="store_true",
                   help="also read every tensor and compare it with its recorded checksum")
    p.set_defaults(run=cmd_verify)

    p = sub.add_parser("demo", help="train, save, load and refuse a payload on a built-in example",
                       description=_wrap("Train a tiny model, save and load it as safetensors through "
                                   "torch.save/torch.load, load a legacy checkpoint, refuse a "
                                   "malicious one, and compare with pickle. Files go to a new "
                                   "temporary directory that is removed at the end, or to --out."),
                       epilog=exit_statuses("demo"), formatter_class=fmt)
    p.add_argument("--out", help="directory for the demo's files, kept afterwards (default: a new "
                                 "temporary directory, removed at the end)")
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None, *, prog: Optional[str] = None) -> int:
    """Runs the command line and returns its exit status (documented in ``--help``).

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
        prog: the program name shown in messages.

    Returns:
        The exit status: 0 success, 1 invalid input, 2 usage, 3 I/O, 4 refused legacy file.

    Example:
        >>> main(["verify", "model.safetensors"])
        OK       model.safetensors (4 tensors, 1.00 MiB)
        0
    """
    global _PROG
    _PROG = prog or _PROG
    parser = build_parser(_PROG)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already reported
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        return int(args.run(args))
    except CLIError as e:
        _say(str(e))
        return e.status
    except SafetensorError as e:
        _say(str(e))
        return EXIT_INVALID
    except OSError as e:
        _say(_os_message(e))
        return EXIT_IO
    except (TypeError, ValueError) as e:
        _say(str(e))
        return EXIT_INVALID
    except KeyboardInterrupt:
        _say("interrupted")
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the boundary: never a traceback for users
        if os.environ.get("TORCH_SAFETENSORS_DEBUG"):
            raise
        _say(f"unexpected {type(e).__name__}: {e} (set TORCH_SAFETENSORS_DEBUG=1 for a traceback)")
        return EXIT_INVALID
