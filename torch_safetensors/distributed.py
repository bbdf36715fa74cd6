"""torch.distributed.checkpoint (DCP) storage in safetensors, through the C core.

``SafetensorsWriter`` and ``SafetensorsReader`` plug into ``dcp.save`` and ``dcp.load``.
A checkpoint directory holds::

    dcp-shards/<id>-rank00000.safetensors   one file per rank: its chunks and small objects
    dcp-index.json                          written last, atomically, by the coordinator
    model-00001-of-0000N.safetensors        with consolidate=True: full tensors in the
    model.safetensors.index.json            Hugging Face layout (or one model.safetensors)

Every shard file is a standard safetensors file written by the C writer (temporary file
then rename, GIL released). A chunk of a tensor is stored under its name, or under
``name@offset0,offset1,...`` when it is a part of the tensor. The index is JSON: DCP's
metadata (tensor sizes, dtypes, chunks and where each one lives) is rebuilt from it on
load, and nothing in a checkpoint is ever unpickled unless both sides opt in with
``allow_pickle=True``. Non-tensor values (``step``, optimizer hyper-parameters) are
stored as small safetensors blobs that ``import torch_safetensors`` makes ``torch.load``
read without pickle.

Reading maps each shard file privately and copies only the chunks (and the byte ranges
of them) that the planner asks for, from zero-copy tensors over the mapping.
"""
from __future__ import annotations

import dataclasses
import errno
import io
import json
import math
import os
import pickle
import re
import uuid
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from . import _C, _core, _load, _save, _sharded, _source
from ._core import SafetensorError

__all__ = ["SafetensorsWriter", "SafetensorsReader"]

PATH = Union[str, "os.PathLike[str]"]

INDEX_NAME = "dcp-index.json"
SHARD_DIR = "dcp-shards"
INDEX_FORMAT = "torch_safetensors.dcp"
INDEX_VERSION = 1
DCP_VERSION = "1.0.0"  # the DCP metadata version whose fields the index holds

# how a non-tensor value is stored: a safetensors blob of the value (no pickle), or the
# planner's own bytes verbatim (pickle: only with allow_pickle on both sides)
_ENCODINGS = ("safetensors", "pickle")
_TENSOR = "tensor"

_SHARD_RE = re.compile(r"[0-9a-f]{12}-rank[0-9]{5,}\.safetensors")
_SHARD_TMP_RE = re.compile(r"\.[0-9a-f]{12}-rank[0-9]{5,}\.safetensors\.[0-9a-f]{16}\.tmp")
_INDEX_TMP_RE = re.compile(re.escape(f".{INDEX_NAME}.") + r"[0-9a-f]{16}\.tmp")
_SNIFF_BYTES = 4096


@dataclasses.dataclass(frozen=True)
class _Location:
    """Where one DCP item lives: a shard file (relative path) and the key in it."""

    file: str
    key: str
    encoding: str = _TENSOR
    dtype: Optional[torch.dtype] = None
    sizes: Optional[Tuple[int, ...]] = None


def _new_id() -> str:
    return uuid.uuid4().hex[:12]


def _local_path(path: PATH) -> str:
    p = os.fspath(path)
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    return p


def _is_local_path(checkpoint_id: PATH) -> bool:
    try:
        p = _local_path(checkpoint_id)
    except TypeError:
        return False
    return "://" not in p


# ---- dtypes ----


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def _dtype_from_name(name: str) -> Optional[torch.dtype]:
    dtype = getattr(torch, name, None) if name.isidentifier() else None
    return dtype if isinstance(dtype, torch.dtype) else None


# ---- non-tensor values ----


def _orig_torch_save() -> Any:
    return getattr(torch.save, "__torch_safetensors_original__", torch.save)


def _load_is_wrapped() -> bool:
    """Whether torch.load is torch_safetensors' wrapper (it reads safetensors blobs)."""
    return hasattr(torch.load, "__torch_safetensors_original__")


def _encode_object(fqn: str, data: Any, allow_pickle: bool) -> Tuple[bytes, str]:
    """The bytes to store for a BYTE_IO item, and their encoding.

    DCP's planner hands over ``torch.save(value)`` bytes. They are decoded here with
    ``weights_only=True`` (this process's own data) and stored as a safetensors blob.
    """
    if isinstance(data, io.BytesIO):
        raw = data.getvalue()
    elif isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
    else:
        raise TypeError(f"{fqn}: the planner resolved a BYTE_IO item to {type(data).__name__}, not io.BytesIO")
    problem = ""
    try:
        value = torch.load(io.BytesIO(raw), weights_only=True)
    except Exception as e:  # noqa: BLE001 - reported below, or stored verbatim
        lines = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln] or str(e).splitlines() or [""]
        value, problem = None, f"only pickle can rebuild it ({lines[0]})"
    if not problem:
        out = io.BytesIO()
        try:
            _save.save_safetensors(value, out)
            return out.getvalue(), "safetensors"
        except (TypeError, ValueError) as e:
            problem = str(e)
    if allow_pickle:
        return raw, "pickle"
    raise TypeError(
        f"{fqn}: this value cannot be stored without pickle: {problem}. Store it as "
        "tensors, dict/list/tuple and None, bool, int, float, str, or pass allow_pickle=True "
        "to SafetensorsWriter (and to SafetensorsReader, only for checkpoints you trust)"
    ) from None


def _blob(reader: "_C.Reader", key: str) -> bytes:
    dtype, shape, begin, end = reader.info(key)
    if dtype != "U8" or len(shape) != 1:
        raise SafetensorError(f"tensor {key!r}: a stored value must be a 1-d U8 tensor, not {dtype} {list(shape)}")
    if end == begin:
        return b""
    buf = reader.buffer()
    if isinstance(buf, (bytes, bytearray)):
        return bytes(buf[begin:end])
    with memoryview(buf) as view:  # in range: the reader validated every entry's offsets
        return view[begin:end].tobytes()


def _object_stream(key: str, blob: bytes) -> io.BytesIO:
    """A stream that the planner's ``torch.load`` turns back into the stored value.

    The blob is validated as safetensors first, so torch.load never falls back to pickle.
    """
    if not _C.sniff(blob[:_SNIFF_BYTES], len(blob)):
        raise SafetensorError(f"tensor {key!r}: the stored value is not a safetensors blob")
    reader = _C.Reader(data=blob)
    if _load_is_wrapped():
        reader.close()  # valid: torch.load (wrapped) reads it as safetensors, without pickle
        return io.BytesIO(blob)
    # torch.load is torch's own again: hand it a pickle made here from the safely
    # decoded value (tensors, containers, plain values only)
    value = _load.finish(reader, "cpu")
    out = io.BytesIO()
    _orig_torch_save()(value, out)
    out.seek(0)
    return out


# ---- chunks ----


def _chunk_key(item: WriteItem) -> str:
    fqn = item.index.fqn
    td = item.tensor_data
    if td is None:
        return fqn
    offsets = list(td.chunk.offsets)
    if any(offsets) or list(td.chunk.sizes) != list(td.size):
        return f"{fqn}@{','.join(map(str, offsets))}"
    return fqn


def _narrow(t: torch.Tensor, offsets: Any, lengths: Any) -> torch.Tensor:
    for dim, (start, length) in enumerate(zip(offsets, lengths)):
        if start != 0 or length != t.size(dim):
            t = t.narrow(dim, start, length)
    return t


def _chunk_tensor(item: WriteItem, data: Any) -> torch.Tensor:
    fqn = item.index.fqn
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"{fqn}: the planner resolved a tensor item to {type(data).__name__}")
    t = data.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    td = item.tensor_data
    if td is not None:
        if t.dtype != td.properties.dtype:
            raise ValueError(f"{fqn}: the planner resolved a {t.dtype} tensor for a {td.properties.dtype} item")
        if tuple(t.shape) != tuple(td.chunk.sizes):
            raise ValueError(f"{fqn}: the planner resolved shape {list(t.shape)} for a chunk of {list(td.chunk.sizes)}")
    return t


def _check_chunk(t: torch.Tensor, loc: _Location, path: str) -> torch.Tensor:
    if loc.dtype is not None and t.dtype != loc.dtype:
        raise SafetensorError(f"{path}: tensor {loc.key!r} is {t.dtype}, the index says {loc.dtype}")
    if loc.sizes is not None and tuple(t.shape) != loc.sizes:
        raise SafetensorError(f"{path}: tensor {loc.key!r} has shape {list(t.shape)}, the index says {list(loc.sizes)}")
    return t


# ---- the index: DCP metadata as JSON ----


def _encode_planner_data(data: Any) -> Optional[Dict[str, Any]]:
    if data is None:
        return None
    if isinstance(data, dict) and all(
        isinstance(k, str) and isinstance(v, tuple) and all(type(p) in (str, int) for p in v)
        for k, v in data.items()
    ):
        # DefaultSavePlanner: flattened name -> path of keys in the original state_dict
        return {"kind": "paths", "value": {k: list(v) for k, v in data.items()}}
    try:
        json.dumps(data, allow_nan=False)
    except (TypeError, ValueError):
        raise TypeError(
            f"the save planner's planner_data ({type(data).__name__}) cannot be stored as JSON"
        ) from None
    return {"kind": "json", "value": data}


def _index_document(
    metadata: Metadata, locations: Dict[MetadataIndex, _Location], storage_meta: StorageMeta
) -> Dict[str, Any]:
    files: List[str] = []
    file_ids: Dict[str, int] = {}

    def file_id(name: str) -> int:
        if name not in file_ids:
            file_ids[name] = len(files)
            files.append(name)
        return file_ids[name]

    tensors: Dict[str, Any] = {}
    objects: Dict[str, Any] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            chunks = []
            for chunk in md.chunks:
                loc = locations.get(MetadataIndex(fqn, chunk.offsets))
                if loc is None:
                    raise RuntimeError(f"{fqn}: no rank wrote the chunk at offsets {list(chunk.offsets)}")
                chunks.append({"offsets": list(chunk.offsets), "sizes": list(chunk.sizes),
                               "file": file_id(loc.file), "key": loc.key})
            tensors[fqn] = {"dtype": _dtype_name(md.properties.dtype), "size": list(md.size), "chunks": chunks}
        elif isinstance(md, BytesStorageMetadata):
            loc = locations.get(MetadataIndex(fqn))
            if loc is None:
                raise RuntimeError(f"{fqn}: no rank wrote this value")
            objects[fqn] = {"file": file_id(loc.file), "key": loc.key, "encoding": loc.encoding}
        else:
            raise TypeError(f"{fqn}: unknown DCP storage metadata {type(md).__name__}")
    previous = metadata.storage_meta
    return {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "dcp_version": metadata.version or DCP_VERSION,
        "storage_meta": {
            "checkpoint_id": None if storage_meta.checkpoint_id is None else str(storage_meta.checkpoint_id),
            "save_id": storage_meta.save_id,
            "modules": list(previous.modules) if previous is not None else [],
        },
        "files": files,
        "tensors": tensors,
        "objects": objects,
        "planner_data": _encode_planner_data(metadata.planner_data),
    }


class _IndexParser:
    """Validates an index document and rebuilds DCP's Metadata from it."""

    def __init__(self, where: str):
        self.where = where

    def bad(self, msg: str) -> SafetensorError:
        return SafetensorError(f"{self.where}: invalid checkpoint index: {msg}")

    def obj(self, v: Any, what: str) -> Dict[str, Any]:
        if type(v) is not dict:
            raise self.bad(f"{what} is not a JSON object")
        return v

    def ints(self, v: Any, what: str) -> List[int]:
        if type(v) is not list or any(type(x) is not int or x < 0 for x in v):
            raise self.bad(f"{what} is not a list of non-negative integers")
        return v

    def text(self, v: Any, what: str, optional: bool = False) -> Optional[str]:
        if v is None and optional:
            return None
        if type(v) is not str:
            raise self.bad(f"{what} is not a string")
        return v

    def file(self, v: Any, files: List[str], what: str) -> str:
        if type(v) is not int or not 0 <= v < len(files):
            raise self.bad(f"{what}: file {v!r} is not an index into files")
        return files[v]

    def parse(self, doc: Any) -> Tuple[Metadata, Dict[MetadataIndex, _Location]]:
        doc = self.obj(doc, "the document")
        if doc.get("format") != INDEX_FORMAT:
            raise self.bad(f"format is {doc.get('format')!r}, not {INDEX_FORMAT!r}")
        if doc.get("version") != INDEX_VERSION:
            raise self.bad(
                f"version {doc.get('version')!r} is not {INDEX_VERSION} (written by another "
                "version of torch_safetensors?)"
            )
        files = doc.get("files")
        if type(files) is not list:
            raise self.bad("files is not a list")
        for name in files:
            if (type(name) is not str or not name or os.path.isabs(name) or "\\" in name
                    or os.path.normpath(name) != name or name.split("/")[0] == ".."):
                raise self.bad(f"file {name!r} is not a plain relative path inside the checkpoint")
        state: Dict[str, Any] = {}
        locations: Dict[MetadataIndex, _Location] = {}
        for fqn, entry in self.obj(doc.get("tensors"), "tensors").items():
            entry = self.obj(entry, f"tensor {fqn!r}")
            dtype_name = self.text(entry.get("dtype"), f"{fqn}: dtype")
            dtype = _dtype_from_name(dtype_name or "")
            if dtype is None:
                raise self.bad(f"{fqn}: unknown dtype {dtype_name!r}")
            size = self.ints(entry.get("size"), f"{fqn}: size")
            chunks_in = entry.get("chunks")
            if type(chunks_in) is not list:
                raise self.bad(f"{fqn}: chunks is not a list")
            chunks = []
            for i, c in enumerate(chunks_in):
                c = self.obj(c, f"{fqn}: chunk {i}")
                offsets = self.ints(c.get("offsets"), f"{fqn}: chunk {i} offsets")
                sizes = self.ints(c.get("sizes"), f"{fqn}: chunk {i} sizes")
                if len(offsets) != len(size) or len(sizes) != len(size):
                    raise self.bad(f"{fqn}: chunk {i} has not {len(size)} dimensions")
                if any(o + s > n for o, s, n in zip(offsets, sizes, size)):
                    raise self.bad(f"{fqn}: chunk {i} reaches past the tensor's size {size}")
                file = self.file(c.get("file"), files, f"{fqn}: chunk {i}")
                key = self.text(c.get("key"), f"{fqn}: chunk {i} key")
                assert key is not None
                chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)))
                locations[MetadataIndex(fqn, offsets, i)] = _Location(file, key, _TENSOR, dtype, tuple(sizes))
            self.coverage(fqn, size, chunks)
            state[fqn] = TensorStorageMetadata(
                properties=TensorProperties(dtype=dtype), size=torch.Size(size), chunks=chunks
            )
        for fqn, entry in self.obj(doc.get("objects"), "objects").items():
            entry = self.obj(entry, f"value {fqn!r}")
            if fqn in state:
                raise self.bad(f"{fqn!r} is both a tensor and a value")
            encoding = entry.get("encoding")
            if encoding not in _ENCODINGS:
                raise self.bad(f"{fqn}: unknown encoding {encoding!r}")
            file = self.file(entry.get("file"), files, fqn)
            key = self.text(entry.get("key"), f"{fqn}: key")
            assert key is not None
            state[fqn] = BytesStorageMetadata()
            locations[MetadataIndex(fqn)] = _Location(file, key, encoding)
        meta = self.obj(doc.get("storage_meta") or {}, "storage_meta")
        modules = meta.get("modules") or []
        if type(modules) is not list or any(type(m) is not str for m in modules):
            raise self.bad("storage_meta.modules is not a list of strings")
        storage_meta = StorageMeta(
            checkpoint_id=self.text(meta.get("checkpoint_id"), "storage_meta.checkpoint_id", True),
            save_id=self.text(meta.get("save_id"), "storage_meta.save_id", True),
            modules=modules,
        )
        metadata = Metadata(
            state_dict_metadata=state,
            planner_data=self.planner_data(doc.get("planner_data")),
            storage_data=locations,
            storage_meta=storage_meta,
            version=self.text(doc.get("dcp_version"), "dcp_version", True),
        )
        return metadata, locations

    def coverage(self, fqn: str, size: List[int], chunks: List[ChunkStorageMetadata]) -> None:
        """Checks that the chunks (already in bounds) tile the tensor exactly: no gap,
        no overlap. A tensor with no chunk at all would load as whatever the target
        held before."""
        if not chunks:
            raise self.bad(f"{fqn}: no chunks: the tensor's data is stored nowhere")
        boxes = [(list(c.offsets), list(c.sizes)) for c in chunks if math.prod(c.sizes) > 0]
        numel = math.prod(size)
        if numel == 0:
            return  # nothing to cover; empty chunks say where the empty tensor was
        if not size:
            if len(boxes) != 1:
                raise self.bad(f"{fqn}: a scalar stored in {len(boxes)} chunks")
            return
        # sweep along the dimension with the most distinct offsets: the one the tensor
        # was split along, so that few boxes are compared with each other
        dim = max(range(len(size)), key=lambda d: len({o[d] for o, _ in boxes}))
        boxes.sort(key=lambda b: b[0][dim])
        active: List[Tuple[List[int], List[int]]] = []
        for offsets, sizes in boxes:
            active = [a for a in active if a[0][dim] + a[1][dim] > offsets[dim]]
            for a_off, a_size in active:
                if all(ao < o + n and o < ao + an for ao, an, o, n in zip(a_off, a_size, offsets, sizes)):
                    raise self.bad(f"{fqn}: chunks at offsets {a_off} and {offsets} overlap")
            active.append((offsets, sizes))
        covered = sum(math.prod(n) for _, n in boxes)
        if covered != numel:
            raise self.bad(f"{fqn}: the chunks cover {covered} of the tensor's {numel} elements "
                           "(a gap: part of the tensor is stored nowhere)")

    def planner_data(self, v: Any) -> Any:
        if v is None:
            return None
        v = self.obj(v, "planner_data")
        if v.get("kind") == "json":
            return v.get("value")
        if v.get("kind") != "paths":
            raise self.bad(f"planner_data kind {v.get('kind')!r} is unknown")
        out = {}
        for k, path in self.obj(v.get("value"), "planner_data.value").items():
            if type(path) is not list or any(type(p) not in (str, int) for p in path):
                raise self.bad(f"planner_data: the path of {k!r} is not a list of keys")
            out[k] = tuple(path)
        return out


def _read_index(directory: str) -> Tuple[Metadata, Dict[MetadataIndex, _Location]]:
    where = os.path.join(directory, INDEX_NAME)
    # a regular file only (never a FIFO that would block), size checked before reading
    raw = _source.read_json_bytes(
        where,
        what="checkpoint index",
        missing=f"no complete torch_safetensors checkpoint in {directory!r}: its index {INDEX_NAME} "
        "is missing (the save was interrupted, or never ran)",
    )
    parser = _IndexParser(where)
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:
        raise parser.bad("nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise parser.bad(f"not UTF-8 JSON ({e})") from None
    return parser.parse(doc)


def _no_constant(name: str) -> Any:
    raise ValueError(f"the non-standard JSON constant {name}")


def _write_index(directory: str, doc: Dict[str, Any], durable: bool) -> None:
    """Writes the index with the C writer the shards use: a temporary name, then rename."""
    data = json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    _C.write_atomic(os.path.join(directory, INDEX_NAME), data, durable=durable)


def _remove_stale_shards(directory: str, keep: List[str]) -> None:
    """Removes shard files (and temporary files) of earlier or interrupted saves."""
    for name in os.listdir(directory):
        if _INDEX_TMP_RE.fullmatch(name):  # a coordinator died while writing the index
            _sharded._remove(os.path.join(directory, name))
    shard_dir = os.path.join(directory, SHARD_DIR)
    keep_names = {os.path.basename(k) for k in keep if os.path.dirname(k) == SHARD_DIR}
    try:
        names = os.listdir(shard_dir)
    except FileNotFoundError:
        return
    for name in names:
        if name in keep_names:
            continue
        if _SHARD_RE.fullmatch(name) or _SHARD_TMP_RE.fullmatch(name):
            _sharded._remove(os.path.join(shard_dir, name))


# ---- reading chunks back ----


def _open_shard(directory: str, rel: str) -> "_C.Reader":
    # never blocks on a FIFO; a special file is refused, naming it
    return _source.open_reader(os.path.join(directory, rel), None)


def _assemble_full(directory: str, metadata: Metadata,
                   locations: Dict[MetadataIndex, _Location]) -> Dict[str, torch.Tensor]:
    """Full tensors from the shards: zero-copy when one chunk is the whole tensor."""
    readers: Dict[str, "_C.Reader"] = {}
    out: Dict[str, torch.Tensor] = {}
    try:
        for fqn, md in metadata.state_dict_metadata.items():
            if not isinstance(md, TensorStorageMetadata):
                continue
            full: Optional[torch.Tensor] = None
            for chunk in md.chunks:
                loc = locations[MetadataIndex(fqn, chunk.offsets)]
                reader = readers.get(loc.file)
                if reader is None:
                    reader = readers[loc.file] = _open_shard(directory, loc.file)
                src = _check_chunk(_core.build(reader, [loc.key], "cpu")[loc.key], loc, loc.file)
                if len(md.chunks) == 1 and tuple(src.shape) == tuple(md.size):
                    full = src
                    break
                if full is None:
                    full = torch.empty(md.size, dtype=md.properties.dtype)
                _narrow(full, chunk.offsets, chunk.sizes).copy_(src)
            out[fqn] = full if full is not None else torch.empty(md.size, dtype=md.properties.dtype)
    finally:
        for reader in readers.values():
            reader.close()  # tensors built from it stay valid
    return out


# ---- the writer ----


class SafetensorsWriter(StorageWriter):
    """A DCP ``StorageWriter`` that saves each rank's chunks as a safetensors file.

    Each rank writes one shard file with the C writer (atomically, GIL released, in
    parallel across ranks); replicated tensors are written once (DCP's planner keeps one
    copy). The coordinator writes a JSON index last, atomically, so an interrupted save
    never looks complete, and a previous checkpoint in the same directory stays loadable
    until the new index replaces it; shard files no index refers to are then removed.

    Args:
        path: the checkpoint directory (created if needed).
        consolidate: also write the full tensors in ``path`` as a Hugging Face
            checkpoint (``model-0000i-of-0000N.safetensors`` and
            ``model.safetensors.index.json``, or one ``model.safetensors`` when it fits
            in ``max_shard_size``), assembled by the coordinator from the shards after
            every rank wrote; it needs memory for the tensors that were sharded.
        max_shard_size: the largest consolidated file, in bytes or as ``"5GB"``.
        sync_files: flush files and directory entries to stable storage.
        overwrite: replace an existing checkpoint in ``path``; ``False`` raises.
        allow_pickle: store non-tensor values that only pickle can hold (as DCP's own
            bytes); the reader then needs ``allow_pickle=True`` too. By default such
            values are refused with a ``TypeError`` naming them.

    Raises:
        ValueError: ``max_shard_size`` is not a size (checked here, with consolidate).
        FileExistsError: ``overwrite=False`` and ``path`` holds a checkpoint.
        TypeError: a value cannot be stored (see ``allow_pickle``).
        OSError: a file cannot be written; the previous checkpoint stays intact.

    Example:
        >>> import torch.distributed.checkpoint as dcp
        >>> from torch_safetensors.distributed import SafetensorsWriter
        >>> dcp.save(model.state_dict(), storage_writer=SafetensorsWriter("ckpt"))
    """

    def __init__(
        self,
        path: PATH,
        *,
        consolidate: bool = False,
        max_shard_size: Union[int, str] = "5GB",
        sync_files: bool = True,
        overwrite: bool = True,
        allow_pickle: bool = False,
    ) -> None:
        super().__init__()
        self.path = _local_path(path)
        self.consolidate = bool(consolidate)
        if self.consolidate:
            from ._sharded import parse_size

            parse_size(max_shard_size)  # a bad size fails here, not after every rank wrote
        self.max_shard_size = max_shard_size
        self.sync_files = bool(sync_files)
        self.overwrite = bool(overwrite)
        self.allow_pickle = bool(allow_pickle)
        self.save_id = _new_id()
        self.rank: Optional[int] = None
        self.is_coordinator = False

    @property
    def checkpoint_id(self) -> str:
        """The checkpoint directory."""
        return self.path

    def reset(self, checkpoint_id: Optional[PATH] = None) -> None:
        """Starts a new save, into ``checkpoint_id`` when given."""
        if checkpoint_id:
            self.path = _local_path(checkpoint_id)
        self.save_id = _new_id()

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: PATH) -> bool:
        """Whether ``checkpoint_id`` is a local directory path."""
        return _is_local_path(checkpoint_id)

    def storage_meta(self) -> Optional[StorageMeta]:
        """The checkpoint directory and this save's id."""
        return StorageMeta(checkpoint_id=self.path, save_id=self.save_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Records this rank's role.

        Raises:
            ValueError: ``use_collectives=False``: the index needs every rank's plan.
        """
        if kwargs.get("use_collectives", True) is False:
            raise ValueError(
                "SafetensorsWriter needs use_collectives=True: the coordinator writes one "
                "index for every rank's shards"
            )
        self.is_coordinator = bool(is_coordinator)
        rank = kwargs.get("rank")
        self.rank = rank if isinstance(rank, int) else None

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        """Creates the directory; refuses an existing checkpoint when ``overwrite=False``."""
        os.makedirs(os.path.join(self.path, SHARD_DIR), exist_ok=True)
        index = os.path.join(self.path, INDEX_NAME)
        if not self.overwrite and os.path.exists(index):
            raise FileExistsError(errno.EEXIST, "a checkpoint exists and overwrite=False", index)
        return plan

    def prepare_global_plan(self, plans: List[SavePlan]) -> List[SavePlan]:
        """Numbers the plans, so a rank knows its number even without ``rank``."""
        return [dataclasses.replace(plan, storage_data=i) for i, plan in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> "Future[List[WriteResult]]":
        """Writes this rank's items to one shard file and says where each one went.

        Returns:
            A completed future of one ``WriteResult`` per item.

        Raises:
            TypeError: a value cannot be stored without pickle (see ``allow_pickle``).
            OSError: the shard file cannot be written (no partial file is left).
        """
        rank = self.rank
        if rank is None:
            rank = plan.storage_data if isinstance(plan.storage_data, int) else 0
        rel = f"{SHARD_DIR}/{_new_id()}-rank{rank:05d}.safetensors"
        tensors: Dict[str, torch.Tensor] = {}
        results: List[WriteResult] = []
        for item in plan.items:
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                blob, encoding = _encode_object(item.index.fqn, data, self.allow_pickle)
                key = _unique_key(tensors, item.index.fqn)
                tensors[key] = (torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob
                                else torch.empty(0, dtype=torch.uint8))
                size = len(blob)
            else:
                t = _chunk_tensor(item, data)
                key = _unique_key(tensors, _chunk_key(item))
                tensors[key] = t
                encoding = _TENSOR
                size = t.numel() * t.element_size()
            results.append(WriteResult(index=item.index, size_in_bytes=size,
                                       storage_data=_Location(rel, key, encoding)))
        if tensors:
            meta = {"format": "pt", "torch_safetensors.dcp.save_id": self.save_id,
                    "torch_safetensors.dcp.rank": str(rank)}
            _C.save(tensors, meta, os.path.join(self.path, rel), durable=self.sync_files, check_shared=False)
        fut: Future = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: List[List[WriteResult]]) -> None:
        """Consolidates (if asked), then writes the index: the save is complete.

        Raises:
            RuntimeError: a chunk in the metadata was written by no rank.
            TypeError: the planner's ``planner_data`` cannot be stored as JSON.
            OSError: the index cannot be written; no index is left half-written.
        """
        locations: Dict[MetadataIndex, _Location] = {}
        for rank_results in results:
            for wr in rank_results:
                if not isinstance(wr.storage_data, _Location):
                    raise TypeError(f"{wr.index.fqn}: a write result from another storage writer")
                locations[wr.index] = wr.storage_data
        storage_meta = self.storage_meta()
        assert storage_meta is not None
        doc = _index_document(metadata, locations, storage_meta)
        if self.consolidate:
            self._consolidate(metadata, locations)
        _write_index(self.path, doc, self.sync_files)
        _remove_stale_shards(self.path, doc["files"])

    def _consolidate(self, metadata: Metadata, locations: Dict[MetadataIndex, _Location]) -> None:
        from ._sharded import save_sharded

        full = _assemble_full(self.path, metadata, locations)
        save_sharded(full, self.path, max_shard_size=self.max_shard_size, prefix="model")


def _unique_key(taken: Dict[str, torch.Tensor], key: str) -> str:
    if key not in taken:
        return key
    n = 1
    while f"{key}#{n}" in taken:
        n += 1
    return f"{key}#{n}"


# ---- the reader ----


class SafetensorsReader(StorageReader):
    """A DCP ``StorageReader`` for checkpoints written by :class:`SafetensorsWriter`.

    The JSON index becomes DCP's metadata, so a checkpoint saved by N ranks loads on M
    ranks with any placement, or in one process without a process group. Each rank maps
    only the shard files that hold chunks it needs and copies just those bytes, from
    zero-copy tensors over a private mapping, into the planner's tensors.

    Args:
        path: the checkpoint directory.
        allow_pickle: hand pickled values (saved with ``allow_pickle=True``) to the
            planner, which unpickles them: only for checkpoints you trust.

    Raises:
        FileNotFoundError: the directory has no index (an interrupted save).
        SafetensorError: the index or a shard file is malformed or inconsistent.
        pickle.UnpicklingError: a pickled value without ``allow_pickle=True``.

    Example:
        >>> import torch.distributed.checkpoint as dcp
        >>> from torch_safetensors.distributed import SafetensorsReader
        >>> state = model.state_dict()
        >>> dcp.load(state, storage_reader=SafetensorsReader("ckpt"))
    """

    def __init__(self, path: PATH, *, allow_pickle: bool = False) -> None:
        super().__init__()
        self.path = _local_path(path)
        self.allow_pickle = bool(allow_pickle)
        self.load_id = _new_id()
        self._locations: Dict[MetadataIndex, _Location] = {}

    @property
    def checkpoint_id(self) -> str:
        """The checkpoint directory."""
        return self.path

    def reset(self, checkpoint_id: Optional[PATH] = None) -> None:
        """Starts a new load, from ``checkpoint_id`` when given."""
        self._locations = {}
        if checkpoint_id:
            self.path = _local_path(checkpoint_id)
        self.load_id = _new_id()

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: PATH) -> bool:
        """Whether ``checkpoint_id`` is a local directory with an index."""
        return _is_local_path(checkpoint_id) and os.path.isfile(
            os.path.join(_local_path(checkpoint_id), INDEX_NAME))

    # not "**kwargs": DCP would then retry with rank=... for per-rank metadata, which a
    # collective save never writes, and repeat the same error twice
    def read_metadata(self, *args: Any, **options: Any) -> Metadata:
        """DCP's metadata, rebuilt from the JSON index.

        Raises:
            FileNotFoundError: no index (the save did not complete).
            SafetensorError: the index is malformed.
        """
        metadata, locations = _read_index(self.path)
        self._locations = locations
        assert metadata.storage_meta is not None
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Takes the chunk locations from ``metadata``."""
        if not isinstance(metadata.storage_data, dict):
            raise ValueError("metadata.storage_data must come from SafetensorsReader.read_metadata")
        self._locations = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        """Returns the plan unchanged."""
        return plan

    def prepare_global_plan(self, plans: List[LoadPlan]) -> List[LoadPlan]:
        """Returns the plans unchanged."""
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> "Future[None]":
        """Copies each planned chunk range from the mapped shards into the planner's tensors.

        Returns:
            A completed future.

        Raises:
            SafetensorError: a shard file is malformed or disagrees with the index.
            pickle.UnpicklingError: a pickled value without ``allow_pickle=True``.
        """
        per_file: Dict[str, List[Tuple[ReadItem, _Location]]] = {}
        for req in plan.items:
            loc = self._locations.get(req.storage_index)
            if loc is None:
                raise SafetensorError(
                    f"{req.storage_index.fqn}: the checkpoint has no chunk at offsets "
                    f"{list(req.storage_index.offset or [])}"
                )
            per_file.setdefault(loc.file, []).append((req, loc))
        for rel, reqs in per_file.items():
            reader = _open_shard(self.path, rel)
            try:
                keys = list(dict.fromkeys(loc.key for req, loc in reqs if req.type != LoadItemType.BYTE_IO))
                tensors = _core.build(reader, keys, "cpu") if keys else {}
                for req, loc in reqs:
                    if req.type == LoadItemType.BYTE_IO:
                        self._load_value(req, loc, reader, planner)
                        continue
                    src = _check_chunk(tensors[loc.key], loc, rel)
                    src = _narrow(src, req.storage_offsets, req.lengths)
                    target = planner.resolve_tensor(req).detach()
                    if target.size() != src.size():
                        raise SafetensorError(
                            f"{req.storage_index.fqn}: the planner's target has shape "
                            f"{list(target.size())}, the stored range {list(src.size())}"
                        )
                    target.copy_(src)
                    planner.commit_tensor(req, target)
            finally:
                reader.close()  # the mapping lives on in tensors still referenced
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _load_value(self, req: ReadItem, loc: _Location, reader: "_C.Reader", planner: LoadPlanner) -> None:
        blob = _blob(reader, loc.key)
        if loc.encoding == "pickle":
            if not self.allow_pickle:
                raise pickle.UnpicklingError(
                    f"{req.storage_index.fqn}: this value was saved as pickle (allow_pickle=True), "
                    "and unpickling can run code from the file. Pass allow_pickle=True to "
                    "SafetensorsReader only for a checkpoint you trust."
                )
            planner.load_bytes(req, io.BytesIO(blob))
            return
        planner.load_bytes(req, _object_stream(loc.key, blob))
