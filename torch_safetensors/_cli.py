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
import shutil
import sys
import tempfile
import threading
import time
import zipfile
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, TextIO

import torch

from . import _C, _checkpoint, _core, _sharded, _torch
from ._core import SafetensorError

__all__ = ["main", "EXIT_OK", "EXIT_INVALID", "EXIT_USAGE", "EXIT_IO", "EXIT_REFUSED"]

EXIT_OK = 0
EXIT_INVALID = 1  # a file is not valid (or its contents cannot be stored as safetensors)
EXIT_USAGE = 2  # bad arguments
EXIT_IO = 3  # not found, unreadable, unwritable
EXIT_REFUSED = 4  # a legacy file the weights_only unpickler refused: never run
EXIT_INTERRUPTED = 130

EXIT_STATUSES = """\
exit status:
  0  success (verify: every file is valid)
  1  invalid input: a malformed or corrupt file, a shard that disagrees with its
     index, or a checkpoint holding objects safetensors cannot store
  2  usage error: bad arguments or options
  3  I/O error: a file or directory is missing, unreadable or unwritable
  4  refused: a legacy checkpoint that the safe (weights_only) unpickler will not
     load, because it would run code or is not a plain weights file; nothing in it
     was executed
  130 interrupted (Ctrl-C)
verify exits 1 if any file is invalid, else 3 if any is missing or unreadable.
"""

PROGRESS_MIN_BYTES = 64 * 2**20  # "auto" shows a bar for files at least this large


class CLIError(Exception):
    """A user-facing failure: one line of message and an exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


# ---- output helpers ----


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
    return name if name.isprintable() else repr(name)


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


# ---- reading files for inspect and verify ----


def _open(path: str) -> "_C.Reader":
    """A validated reader; errors name the file."""
    return _sharded._open_reader(path, True)


def _legacy_hint(path: str) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return ""
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return " (it looks like a legacy pickle checkpoint: convert it with the convert command)"
    return ""


def _check_structure(reader: "_C.Reader") -> None:
    """Validates a whole-checkpoint structure key, building meta tensors only (no data read)."""
    meta = reader.metadata() or {}
    if _checkpoint.STRUCTURE_KEY in meta:
        _checkpoint.unflatten(_torch._read_tensors(reader, "meta"), meta)


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
        out = {
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
        return out
    finally:
        reader.close()


def _describe(path: str, *, check: bool = False) -> Dict[str, Any]:
    """A checkpoint (file, index or directory) as a JSON-ready description."""
    try:
        kind, resolved = _sharded.find_checkpoint(path)
    except ValueError as e:
        raise CLIError(str(e), EXIT_USAGE) from None
    files: List[Dict[str, Any]] = []
    tensors: List[Dict[str, Any]] = []
    index = None
    if kind == "file":
        try:
            part = _describe_file(resolved, check=check)
        except SafetensorError as e:
            hint = _legacy_hint(resolved)
            if not hint:
                raise
            raise _core.error(f"{e}{hint}", getattr(e, "code", "error"), getattr(e, "tensor", None)) from None
        files.append(part["file"])
        tensors += part["tensors"]
    else:
        index = resolved
        for shard, reader in _sharded.iter_shards(resolved):
            part = _describe_file(shard, reader, check=check)
            files.append(part["file"])
            tensors += part["tensors"]
    return {
        "path": path,
        "format": "sharded" if index else "safetensors",
        "index": index,
        "files": files,
        "tensors": tensors,
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
        json.dump(desc, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
        return EXIT_OK
    sharded = desc["index"] is not None
    head = ["name", "dtype", "shape", "bytes", "offset"] + (["file"] if sharded else [])
    rows = [head]
    for t in desc["tensors"]:
        row = [_shown(t["name"]), t["dtype"], "[" + ", ".join(map(str, t["shape"])) + "]",
               f"{t['bytes']:,}", f"{t['offset']:,}"]
        if sharded:
            row.append(os.path.basename(t["file"]))
        rows.append(row)
    print(f"{desc['path']}: " + (f"sharded checkpoint, {len(desc['files'])} files (index {desc['index']})"
                                  if sharded else "safetensors file"))
    print()
    for line in _table(rows, right=(3, 4)):
        print(line)
    print()
    file_bytes = sum(f["size"] for f in desc["files"])
    header_bytes = sum(f["header_size"] for f in desc["files"])
    for f in desc["files"]:
        if "tree_error" in f:
            print(f"checkpoint tree: {_one_line(f['tree_error'])}\n")
        if "tree" in f:
            print(f"checkpoint tree ({os.path.basename(f['path'])}, structure version {f['tree']['version']}):")
            for line in _checkpoint.tree_lines(f["tree"]):
                print(f"  {_shown(line)}")
            print()
    print(f"total: {desc['total_tensors']:,} tensors, {desc['total_bytes']:,} bytes of data "
          f"({_human(desc['total_bytes'])}); headers {header_bytes:,} bytes; "
          f"file{'s' if sharded else ''} {file_bytes:,} bytes")
    for f in desc["files"]:
        meta = f["metadata"]
        label = f"metadata ({os.path.basename(f['path'])})" if sharded else "metadata"
        if not meta:
            print(f"{label}: none")
            continue
        print(f"{label}:")
        for k in sorted(meta):
            v = meta[k]
            if k == _checkpoint.STRUCTURE_KEY:
                v = f"<whole-checkpoint structure, {len(v):,} characters of JSON>"
            elif len(v) > 200:
                v = v[:200] + "..."
            print(f"  {_shown(k)}: {_one_line(v)}")
    return EXIT_OK


# ---- verify ----


def cmd_verify(args: argparse.Namespace) -> int:
    """``verify FILE...``: one line per file; 0 only if all are valid."""
    invalid = unreadable = 0
    for path in args.files:
        try:
            desc = _describe(path, check=True)
        except (SafetensorError, CLIError, ValueError, TypeError) as e:
            invalid += 1
            message = _one_line(str(e))
            if message.startswith(f"{path}: "):
                message = message[len(path) + 2:]  # the line already names the file
            print(f"INVALID  {path}: {message}")
            continue
        except OSError as e:
            unreadable += 1
            message = _os_message(e)
            if message.startswith(f"{path}: "):
                message = message[len(path) + 2:]
            print(f"ERROR    {path}: {message}")
            continue
        what = (f"sharded, {len(desc['files'])} files, " if desc["index"] else "")
        print(f"OK       {path} ({what}{desc['total_tensors']:,} tensors, {_human(desc['total_bytes'])})")
    bad = invalid + unreadable
    if bad:
        _say(f"{bad} of {len(args.files)} checkpoint{'s' if len(args.files) > 1 else ''} "
             f"failed verification")
        return EXIT_INVALID if invalid else EXIT_IO
    return EXIT_OK


# ---- convert ----


def _refusal_reason(err: BaseException) -> str:
    skip = ("weights only load failed", "please file an issue", "check the documentation",
            "torch_safetensors loaded", "weightsunpickler error:")
    for line in str(err).splitlines():
        text = line.strip()
        if text and not text.lower().startswith(skip) and not text.startswith("("):
            return text.rstrip(".")
    return "it is not a plain weights file"


def _load_legacy(src: str) -> Any:
    """Loads src with weights_only=True only; never runs code from it."""
    mmap = zipfile.is_zipfile(src)  # torch maps only zip checkpoints
    try:
        return torch.load(src, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CLIError(
            f"refused {src}: the safe (weights_only) unpickler would not load it: "
            f"{_refusal_reason(e)}; nothing in it was run (if you trust the file, convert it in "
            "Python with torch.load(..., weights_only=False))",
            EXIT_REFUSED,
        ) from None
    except (SafetensorError, OSError):
        raise
    except Exception as e:  # a damaged zip or pickle: torch raises many kinds
        raise CLIError(f"{src}: cannot be read as a checkpoint: {type(e).__name__}: {_one_line(str(e))}",
                       EXIT_INVALID) from None


def _flat_state_dict(obj: Any, src: str) -> Dict[str, torch.Tensor]:
    if isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return obj
    hint = ""
    if isinstance(obj, dict):
        subs = [k for k, v in obj.items() if isinstance(v, dict)]
        if subs:
            hint = f" (it holds {', '.join(map(repr, subs[:3]))}: convert without --shard-size to keep it whole)"
    raise CLIError(f"--shard-size needs a flat state dict of tensors, and {src} holds a whole "
                   f"checkpoint{hint}", EXIT_INVALID)


def _data_bytes(tensors: Dict[str, torch.Tensor]) -> int:
    """Bytes of data, counting ties once."""
    seen = set()
    total = 0
    for t in tensors.values():
        key = _checkpoint.view_key(t)
        if key is None or key not in seen:
            total += t.numel() * t.element_size()
        if key is not None:
            seen.add(key)
    return total


def _progress_enabled(choice: Optional[bool], total: int) -> bool:
    if choice is not None:
        return choice
    return total >= PROGRESS_MIN_BYTES and sys.stderr.isatty()


def cmd_convert(args: argparse.Namespace) -> int:
    """``convert SRC DST [--shard-size SIZE]``: a legacy checkpoint to safetensors, safely."""
    src, dst = args.src, args.dst
    if not os.path.exists(src):
        raise FileNotFoundError(2, "no such file", src)
    if os.path.isdir(src):
        raise CLIError(f"{src} is a directory; convert takes one legacy checkpoint file", EXIT_USAGE)
    if os.path.exists(dst) and os.path.samefile(src, dst):
        raise CLIError("SRC and DST are the same file; write the safetensors file elsewhere", EXIT_USAGE)
    limit = None
    if args.shard_size is not None:
        try:
            limit = _sharded.parse_size(args.shard_size)
        except (TypeError, ValueError) as e:
            raise CLIError(f"--shard-size: {e}", EXIT_USAGE) from None
        if os.path.exists(dst) and not os.path.isdir(dst):
            raise CLIError(f"{dst} is a file; with --shard-size DST is a directory", EXIT_USAGE)
    elif os.path.isdir(dst):
        raise CLIError(f"{dst} is a directory; give a file name, or use --shard-size to write a "
                       "sharded checkpoint into it", EXIT_USAGE)

    obj = _load_legacy(src)
    if limit is not None:
        sd = _flat_state_dict(obj, src)
        total = _data_bytes(sd)
        bar = _Bar(total, "writing shards", enabled=_progress_enabled(args.progress, total))
        done = [0]

        def step(written: int, _total: int) -> None:
            done[0] = written
            bar.update(written)

        with _Watcher(bar, dst, args.prefix + "-", lambda: done[0]):
            written = _sharded._save_sharded(sd, dst, max_shard_size=limit, prefix=args.prefix,
                                             progress=step)
        bar.close()
        shards = [p for p in written if p.endswith(".safetensors")]
        print(f"converted {src} -> {dst}: {len(sd):,} tensors, {_human(total)} in "
              f"{len(shards)} file{'s' if len(shards) > 1 else ''}"
              + (f" (index {os.path.basename(written[-1])})" if len(shards) > 1 else ""))
        return EXIT_OK

    try:
        tensors, structure = _checkpoint.flatten(obj)  # refuses what cannot be stored
    except (TypeError, ValueError) as e:
        raise CLIError(f"{src}: {_one_line(str(e))}", EXIT_INVALID) from None
    total = _data_bytes(tensors)
    bar = _Bar(total, "writing", enabled=_progress_enabled(args.progress, total))
    with _Watcher(bar, os.path.dirname(dst), os.path.basename(dst) + ".", lambda: 0):
        # flatten already stored ties once: no overlap check, no second walk
        _torch.save_safetensors(obj, dst, parts=(tensors, structure, False))
    bar.update(total)
    bar.close()
    kind = "whole checkpoint" if structure else "state dict"
    print(f"converted {src} -> {dst}: {kind}, {len(tensors):,} tensors, {_human(total)}")
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
    sys.stderr.write(f"{_PROG}: error: {_one_line(message)}\n")
    sys.stderr.flush()


def _os_message(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else ""
    text = e.strerror or str(e)
    return f"{where}{text}"


def build_parser(prog: str = _PROG) -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=prog,
        description="Inspect, convert and verify safetensors checkpoints (single files, "
                    "Hugging Face sharded checkpoints and legacy torch pickles).",
        epilog=EXIT_STATUSES,
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {_version()} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)

    p = sub.add_parser("inspect", help="list a checkpoint's tensors, totals and metadata",
                       description="Print a table of tensors (name, dtype, shape, bytes, offset), "
                                   "totals and metadata. FILE is a safetensors file, a "
                                   "*.safetensors.index.json or a checkpoint directory. Only the "
                                   "headers are read.",
                       epilog=EXIT_STATUSES, formatter_class=fmt)
    p.add_argument("file", metavar="FILE")
    p.add_argument("--json", action="store_true", help="print a JSON description instead")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("convert", help="convert a legacy torch checkpoint to safetensors, safely",
                       description="Convert a legacy checkpoint (a torch zip file or a pre-1.6 "
                                   "pickle; a state dict or a whole training checkpoint) to "
                                   "safetensors. SRC is loaded only with weights_only=True: a file "
                                   "that would run code, or is not a plain weights file, is refused "
                                   "and nothing in it runs.",
                       epilog=EXIT_STATUSES, formatter_class=fmt)
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST", help="the safetensors file (a directory with --shard-size)")
    p.add_argument("--shard-size", metavar="SIZE",
                   help="write a Hugging Face sharded checkpoint into directory DST, with shards "
                        "of at most SIZE (e.g. 5GB, 500MB, 2GiB, or bytes); needs a flat state dict")
    p.add_argument("--prefix", default="model",
                   help="file name stem for --shard-size (default: model)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar on stderr (default: for files of 64 MiB or more, "
                        "when stderr is a terminal)")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("verify", help="validate files strictly; exit 0 only if all are valid",
                       description="Validate each FILE strictly with the torch_safetensors reader: "
                                   "every header rule and the exact file length (which is what "
                                   "the format guarantees; tensor bytes are not read), plus the "
                                   "whole-checkpoint structure when present. An index or a "
                                   "directory verifies every shard and that the index agrees with "
                                   "them. Prints one line per FILE.",
                       epilog=EXIT_STATUSES, formatter_class=fmt)
    p.add_argument("files", metavar="FILE", nargs="+")
    p.set_defaults(run=cmd_verify)

    p = sub.add_parser("demo", help="train, save, load and refuse a payload on a built-in example")
    p.add_argument("--out", help="directory for the demo's files (default: a new temp dir)")
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
