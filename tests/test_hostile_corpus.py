"""Issue 5, point 3: a corpus of hostile files, built from raw bytes, refused through every
way a user can load a file: load(bytes), load_file, safe_open, and torch.load (path, path with
format="safetensors", mmap=False, BytesIO). Each refusal must come within a second (a bound
on a hang, not a speed goal) and with bounded memory (checked in a subprocess under
RLIMIT_AS, with its peak RSS measured).

tests/test_rules.py checks each rule's exact message and position through the C reader;
this file checks that no entry point hangs, crashes or allocates from a hostile header,
and that torch.load routes each file correctly.

torch.load has no magic number to go by (DESIGN.md: "There is no magic number"): it treats a
file as safetensors only when its length prefix is plausible and the header starts with
'{'. A file that fails that sniff is not ours to judge; torch's own weights_only loader
gets it and refuses it (UnpicklingError, EOFError or RuntimeError). With
format="safetensors", every file must be refused with SafetensorError.

This module imports nothing from conftest: the memory test runs it in a child process.
"""
from __future__ import annotations

import gc
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Tuple

import pytest
import torch

import torch_safetensors as ts
from torch_safetensors import _C

pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")
SafetensorError = ts.SafetensorError
# a bound on a hang, not a speed goal; .ci/valgrind.sh raises it (memcheck is ~50x slower)
HANG_BOUND_S = float(os.environ.get("TORCH_SAFETENSORS_HANG_BOUND_S", "1.0"))
MAX_HEADER = 100_000_000

# ---- building files from raw bytes ----


def _file(header, data: bytes = b"", length=None) -> bytes:
    """8-byte little-endian N, then the header (str/bytes/dict), then data."""
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    if isinstance(header, str):
        header = header.encode("utf-8")
    n = len(header) if length is None else length
    return struct.pack("<Q", n) + header + data


def _entry(dtype, shape, begin, end) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _one(field_text: str, data: bytes = b"\0" * 8) -> bytes:
    """A file with one tensor 'a' whose entry is the given JSON text."""
    return _file('{"a":' + field_text + "}", data)


F32_2 = _entry("F32", [2], 0, 8)
D8 = struct.pack("<2f", 1.0, 2.0)
DEEP = 200_000


def _many_entries(n: int, tail: str) -> bytes:
    """n distinct zero-size tensors then `tail` (more JSON members, or '')."""
    body = ",".join(f'"t{i}":{{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}'
                    for i in range(n))
    return body + tail


def _corpus() -> List[Tuple[str, bytes]]:
    c: List[Tuple[str, bytes]] = [
        # ---- sizes and the length prefix ----
        ("empty", b""),
        ("seven_bytes", b"\x02\0\0\0\0\0\0"),
        ("eight_bytes_zero", struct.pack("<Q", 0)),
        ("header_len_zero_with_data", _file(b"", b"{}")),
        ("header_len_larger_than_file", _file("{}", length=1000)),
        ("header_len_one_past_end", _file("{}", length=3)),
        ("header_len_u64_max", _file("{}", length=2**64 - 1)),
        ("header_len_2_pow_63", _file("{}", length=2**63)),
        ("header_len_over_limit", _file("{}", length=MAX_HEADER + 1)),
        ("header_len_at_limit_tiny_file", _file("{}", b" " * 90, length=MAX_HEADER)),
        # ---- not JSON / not an object / bad bytes ----
        ("not_json", _file("hello world")),
        ("not_json_after_brace", _file("{hello}")),
        ("truncated_json", _file('{"a":{"dtype":"F32","sha')),
        ("truncated_json_in_number", _file('{"a":{"dtype":"F32","shape":[12')),
        ("truncated_json_open_brace", _file('{"')),
        ("json_array", _file("[1,2]")),
        ("json_string", _file('"{}"')),
        ("json_number", _file("12345")),
        ("json_null", _file("null")),
        ("json_true", _file("true")),
        ("invalid_utf8_key", _file(b'{"a\xff":' + json.dumps(F32_2).encode() + b"}", D8)),
        ("invalid_utf8_dtype", _file(b'{"a":{"dtype":"F3\xc0","shape":[2],"data_offsets":[0,8]}}',
                                     D8)),
        ("invalid_utf8_metadata", _file(b'{"__metadata__":{"k":"\xed\xa0\x80"}}')),
        ("nul_after_json", _file(b"{}\x00")),
        ("nul_padding_after_json", _file(b'{"a":' + json.dumps(F32_2).encode() + b"}\0\0\0\0",
                                         D8)),
        ("nul_inside_key", _file(b'{"a\x00b":{}}')),
        ("second_json_value", _file("{}{}")),
        # ---- duplicates ----
        ("duplicate_tensor", _file('{"a":' + json.dumps(F32_2) + ',"a":'
                                   + json.dumps(_entry("F32", [2], 8, 16)) + "}", D8 * 2)),
        ("duplicate_metadata", _file('{"__metadata__":{},"__metadata__":{}}')),
        ("duplicate_metadata_key", _file('{"__metadata__":{"k":"1","k":"1"}}')),
        ("duplicate_field", _one('{"dtype":"F32","shape":[2],"shape":[2],"data_offsets":[0,8]}')),
        # ---- nesting: 200,000 levels, nowhere a stack overflow ----
        ("deep_arrays_top_level", _file("[" * DEEP + "]" * DEEP)),
        ("deep_objects_top_level", _file('{"a":' * DEEP + "1" + "}" * DEEP)),
        ("deep_unclosed_objects", _file('{"a":' * DEEP)),
        ("deep_arrays_in_entry", _one("[" * DEEP + "]" * DEEP)),
        ("deep_in_unknown_field", _one('{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":'
                                       + "[" * DEEP + "]" * DEEP + "}")),
        ("deep_in_shape", _one('{"dtype":"F32","shape":' + "[" * DEEP + "]" * DEEP
                               + ',"data_offsets":[0,8]}')),
        ("deep_in_metadata", _file('{"__metadata__":{"k":' + "[" * DEEP + "]" * DEEP + "}}")),
        # ---- dtype ----
        ("unknown_dtype", _one('{"dtype":"F33","shape":[2],"data_offsets":[0,8]}')),
        ("empty_dtype", _one('{"dtype":"","shape":[2],"data_offsets":[0,8]}')),
        ("dtype_number", _one('{"dtype":4,"shape":[2],"data_offsets":[0,8]}')),
        ("dtype_array", _one('{"dtype":["F32"],"shape":[2],"data_offsets":[0,8]}')),
        ("dtype_null", _one('{"dtype":null,"shape":[2],"data_offsets":[0,8]}')),
        # ---- shape ----
        ("dim_negative", _one('{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}')),
        ("dim_fractional", _one('{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}')),
        ("dim_exponent", _one('{"dtype":"F32","shape":[2e0],"data_offsets":[0,8]}')),
        ("dim_string", _one('{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}')),
        ("dim_30_digits", _one('{"dtype":"U8","shape":[' + "1" * 30 + '],"data_offsets":[0,8]}')),
        ("dim_2_pow_64", _one('{"dtype":"U8","shape":[18446744073709551616],'
                              '"data_offsets":[0,8]}')),
        ("dim_nested", _one('{"dtype":"F32","shape":[[2]],"data_offsets":[0,8]}')),
        ("shape_null", _one('{"dtype":"F32","shape":null,"data_offsets":[0,8]}')),
        ("numel_overflow", _one('{"dtype":"F32","shape":[4294967296,4294967297],'
                                '"data_offsets":[0,8]}')),
        ("numel_times_size_overflow", _one('{"dtype":"F64","shape":[2305843009213693952],'
                                           '"data_offsets":[0,8]}')),
        ("bytes_overflow_many_dims", _one('{"dtype":"C64","shape":[65536,65536,65536,65536],'
                                          '"data_offsets":[0,8]}')),
        # valid by the format, but no torch tensor can have this shape
        ("zero_numel_dim_past_int64", _one('{"dtype":"U8","shape":[0,9223372036854775808],'
                                           '"data_offsets":[0,0]}', b"")),
        ("zero_numel_strides_overflow", _one('{"dtype":"F32","shape":[0,4611686018427387904,4],'
                                             '"data_offsets":[0,0]}', b"")),
        ("size_mismatch_small", _one('{"dtype":"F32","shape":[3],"data_offsets":[0,8]}')),
        ("size_mismatch_large", _one('{"dtype":"F32","shape":[1],"data_offsets":[0,8]}')),
        # ---- data_offsets ----
        ("offsets_reversed", _one('{"dtype":"U8","shape":[8],"data_offsets":[8,0]}')),
        ("offsets_overlapping", _file({"a": F32_2, "b": _entry("F32", [2], 4, 12)},
                                      D8 + b"\0" * 4)),
        ("offsets_identical", _file({"a": F32_2, "b": F32_2}, D8)),
        ("offsets_hole", _file({"a": F32_2, "b": _entry("F32", [2], 12, 20)}, b"\0" * 20)),
        ("offsets_hole_at_start", _file({"a": _entry("F32", [2], 8, 16)}, b"\0" * 16)),
        ("offsets_three_elements", _one('{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}')),
        ("offsets_one_element", _one('{"dtype":"F32","shape":[2],"data_offsets":[8]}')),
        ("offsets_negative", _one('{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}')),
        ("offsets_fractional", _one('{"dtype":"F32","shape":[2],"data_offsets":[0,8.0]}')),
        ("offsets_string", _one('{"dtype":"F32","shape":[2],"data_offsets":["0","8"]}')),
        ("offsets_past_end", _file({"a": F32_2}, D8[:5])),
        ("offsets_far_past_end", _file({"a": _entry("U8", [2**62], 0, 2**62)}, D8)),
        ("offsets_past_u64", _one('{"dtype":"F32","shape":[2],'
                                  '"data_offsets":[0,99999999999999999999999999999]}')),
        ("trailing_bytes", _file({"a": F32_2}, D8 + b"\0")),
        ("trailing_bytes_empty_header", _file("{}", b"junk")),
        # ---- __metadata__ ----
        ("metadata_array", _file('{"__metadata__":["k","v"]}')),
        ("metadata_string", _file('{"__metadata__":"k=v"}')),
        ("metadata_number", _file('{"__metadata__":1}')),
        ("metadata_int_value", _file('{"__metadata__":{"k":1}}')),
        ("metadata_null_value", _file('{"__metadata__":{"k":null}}')),
        ("metadata_bool_value", _file('{"__metadata__":{"k":true}}')),
        ("metadata_list_value", _file('{"__metadata__":{"k":["v"]}}')),
        ("metadata_object_value", _file('{"__metadata__":{"k":{"v":"w"}}}')),
        # ---- entries missing a field / of the wrong type ----
        ("entry_missing_dtype", _one('{"shape":[2],"data_offsets":[0,8]}')),
        ("entry_missing_shape", _one('{"dtype":"F32","data_offsets":[0,8]}')),
        ("entry_missing_offsets", _one('{"dtype":"F32","shape":[2]}')),
        ("entry_empty", _one("{}")),
        ("entry_array", _one('["F32",[2],[0,8]]')),
        ("entry_string", _one('"F32"')),
        # ---- headers that claim far more than the file holds ----
        # a length prefix claiming a 99,999,999-byte header, and ~100 bytes of it
        ("claims_huge_header_in_100_bytes",
         _file(('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},' * 2)[:100],
               length=MAX_HEADER - 1)),
        # a hundred bytes that claim a million tensors' worth of data
        ("claims_million_elements_in_100_bytes",
         _file('{"t":{"dtype":"U8","shape":[1000000],"data_offsets":[0,1000000]}}')),
        ("claims_exabytes_in_100_bytes",
         _file('{"t":{"dtype":"F64","shape":[1000000,1000000,1000000],'
               '"data_offsets":[0,8000000000000000000]}}')),
        # the '{"a":{...' pattern repeated: an unterminated tree of entries
        ("repeated_open_entries", _file('{"a":{' * 20)),
        ("repeated_entry_pattern_truncated",
         _file('{' + '"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},' * 2)),
        # real headers with many entries: the cost must stay linear
        ("hundred_thousand_entries_trailing_byte",
         _file("{" + _many_entries(100_000, "") + "}", b"x")),
        ("hundred_thousand_entries_last_duplicates_first",
         _file("{" + _many_entries(100_000, ',"t0":{"dtype":"U8","shape":[0],'
                                            '"data_offsets":[0,0]}') + "}")),
        ("hundred_thousand_metadata_keys_then_bad_value",
         _file('{"__metadata__":{' + ",".join(f'"k{i}":"v"' for i in range(100_000))
               + ',"last":1}}')),
    ]
    return c


CASES = _corpus()
CASE_IDS = [name for name, _ in CASES]
CASE_BYTES: Dict[str, bytes] = dict(CASES)


def looks_like_safetensors(data: bytes) -> bool:
    """DESIGN.md's sniff rule: N plausible for the file size, header starts with '{'."""
    if len(data) < 10:
        return False
    n = struct.unpack("<Q", data[:8])[0]
    if n < 2 or n > MAX_HEADER or n > len(data) - 8:
        return False
    head = data[8:8 + min(n, 4088)].lstrip(b" \t\r\n")
    return head[:1] == b"{"


# ---- the ways to load ----


def _safe_open_all(path):
    with ts.safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# each takes (bytes, path of a file holding those bytes)
VIAS: Dict[str, Callable] = {
    "load_bytes": lambda data, path: ts.load(data),
    "load_file": lambda data, path: ts.load_file(path),
    "safe_open": lambda data, path: _safe_open_all(path),
    "torch_load": lambda data, path: torch.load(path),
    "torch_load_format": lambda data, path: torch.load(path, format="safetensors"),
    "torch_load_nommap": lambda data, path: torch.load(path, mmap=False),
    "torch_load_bytesio": lambda data, path: torch.load(io.BytesIO(data)),
}


def attempt(case: str, via: str, tmp) -> Tuple[str, str, float]:
    """Loads a case one way; returns (exception type name or 'loaded', message, seconds).

    The file is written before the clock starts: only the load is timed."""
    data = CASE_BYTES[case]
    path = os.path.join(str(tmp), "hostile.safetensors.bin")
    with open(path, "wb") as f:
        f.write(data)
    start = time.monotonic()
    try:
        VIAS[via](data, path)
    except Exception as e:  # noqa: BLE001 - classified by the caller
        return type(e).__name__, str(e)[:300], time.monotonic() - start
    return "loaded", "", time.monotonic() - start


# torch.load without format: bytes that claim to be safetensors (a plausible header
# length) are explained by the strict reader; bytes that do not are torch's to refuse,
# with torch's own exception (callers and torch's own tests catch it by class)
TORCH_VIAS = {"torch_load": "path", "torch_load_nommap": "path", "torch_load_bytesio": "bytesio"}


def claims_safetensors(data: bytes) -> bool:
    return len(data) >= 8 and 2 <= struct.unpack("<Q", data[:8])[0] <= MAX_HEADER


def plain_torch_kind(case: str, via: str) -> str:
    """The exception class name plain torch raises for a case, loaded as via loads it."""
    from torch_safetensors import _torch

    data = CASE_BYTES[case]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "hostile.bin")
        with open(path, "wb") as f:
            f.write(data)
        try:
            _torch._orig_load(io.BytesIO(data) if TORCH_VIAS[via] == "bytesio" else path)
        except Exception as e:  # noqa: BLE001 - classified here
            return type(e).__name__
    return "loaded"


def check_outcome(case: str, via: str, kind: str, msg: str, secs: float) -> None:
    assert secs < HANG_BOUND_S, f"{case} via {via} took {secs:.3f} s"
    assert kind != "loaded", f"{case} via {via} was accepted"
    if via in TORCH_VIAS and not claims_safetensors(CASE_BYTES[case]):
        assert kind == plain_torch_kind(case, via), f"{case} via {via}: {kind}: {msg}"
        return
    assert kind == "SafetensorError", f"{case} via {via}: {kind}: {msg}"


# ---- the tests ----


def test_corpus_ids_unique_and_large():
    assert len(CASE_IDS) == len(set(CASE_IDS))
    assert len(CASES) >= 90


def test_sniff_classification_matches_design():
    # the corpus' expectations rely on this rule; the C sniff must agree with it
    for name, data in CASES:
        assert _C.sniff(data[:4096], len(data)) == looks_like_safetensors(data), name


@pytest.mark.parametrize("via", sorted(VIAS))
@pytest.mark.parametrize("case", CASE_IDS)
def test_refused(case, via, tmp_path):
    kind, msg, secs = attempt(case, via, tmp_path)
    check_outcome(case, via, kind, msg, secs)


@pytest.mark.parametrize("case", ["truncated_json", "trailing_bytes", "deep_arrays_in_entry",
                                  "offsets_overlapping", "claims_million_elements_in_100_bytes"])
def test_torch_load_file_objects(case, tmp_path):
    # an open file (fd path) and a file object at an offset (read path), with mmap on and off
    data = CASE_BYTES[case]
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    for mmap in (None, False, True):
        with open(p, "rb") as f:
            with pytest.raises(SafetensorError):
                torch.load(f, mmap=mmap)
    p.write_bytes(b"JUNK" + data)
    with open(p, "rb") as f:
        f.read(4)
        with pytest.raises(SafetensorError):
            torch.load(f)


def test_unsniffable_files_are_explained_by_the_strict_reader(tmp_path):
    # bytes that do not claim to be safetensors go to torch's safe loader, whose error
    # stands; with format="safetensors" the strict reader names the rule they break
    path = tmp_path / "u64max.pt"
    path.write_bytes(CASE_BYTES["header_len_u64_max"])
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)
    with pytest.raises(ts.SafetensorError) as info:
        torch.load(path, format="safetensors")
    assert "over the limit" in str(info.value) and "torch" not in str(info.value)


def test_no_mapping_or_fd_left_by_the_corpus(tmp_path):
    gc.collect()
    fds = len(os.listdir("/proc/self/fd"))
    maps = _C.live_mappings()
    for case in CASE_IDS:
        for via in ("load_file", "torch_load_nommap"):
            attempt(case, via, tmp_path)
    gc.collect()
    assert _C.live_mappings() == maps
    assert len(os.listdir("/proc/self/fd")) == fds
    with open("/proc/self/maps") as f:
        assert "hostile.safetensors.bin" not in f.read()


# ---- bounded memory: the whole corpus in a child under RLIMIT_AS ----

_CHILD = r"""
import gc, importlib.util, json, os, resource, sys, tempfile
spec = importlib.util.spec_from_file_location("hostile", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
import torch, torch_safetensors as ts

tmp = tempfile.mkdtemp(dir=sys.argv[2])
# warm every path with a valid file first, so one-time costs are not counted
good = ts.save({"a": torch.arange(4.0)})
for via in mod.VIAS:
    mod.CASE_BYTES["_good"] = good
    kind, msg, _ = mod.attempt("_good", via, tmp)
    assert kind == "loaded", (via, kind, msg)
gc.collect()

def vm_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
limit = vm_bytes() + (1 << 30)  # 1 GiB of headroom over what torch already holds
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
results = []
for case in mod.CASE_IDS:
    for via in mod.VIAS:
        kind, msg, secs = mod.attempt(case, via, tmp)
        results.append([case, via, kind, msg, secs])
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"limit": limit, "rss0": rss0, "rss1": rss1, "results": results}))
"""


def test_corpus_in_bounded_memory(tmp_path):
    env = dict(os.environ, MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _CHILD, __file__, str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = out["rss1"] - out["rss0"]
    # the largest corpus file is ~7 MB; reading it through seven paths must not need more
    assert growth < 100 * 2**20, f"peak RSS grew by {growth / 2**20:.1f} MiB"
    assert len(out["results"]) == len(CASES) * len(VIAS)
    for case, via, kind, msg, secs in out["results"]:
        assert kind != "MemoryError", f"{case} via {via} ran out of memory: {msg}"
        check_outcome(case, via, kind, msg, secs)
