"""One test per validation rule of the format engine, each built from raw bytes and
checked through load(bytes), load_file(path), safe_open(path) and Reader(mmap=False)."""
from __future__ import annotations

import json
import os
import struct

import pytest
import torch

import torch_safetensors as ts
from torch_safetensors import _C

from conftest import SafetensorError, entry, expect_error, make_file

F32_2 = entry("F32", [2], 0, 8)  # a valid 8-byte entry
DATA8 = struct.pack("<2f", 1.5, -2.0)


def _hdr(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _nest(depth: int) -> str:
    return "[" * depth + "]" * depth


# (id, file bytes, code, message fragment, tensor name (None: not about a tensor),
#  position in the file or ... when not checked)
_CASES = [
    # ---- the 8-byte prefix ----
    ("empty", b"", "too_small", "file too small: 0 bytes", None, 0),
    ("seven_bytes", b"\x02\x00\x00\x00\x00\x00\x00", "too_small", "file too small: 7 bytes",
     None, 0),
    ("header_over_limit", make_file("{}", length=100_000_001), "header_too_large",
     "header length 100000001 is over the limit", None, 0),
    ("header_u64_max", make_file("{}", length=2**64 - 1), "header_too_large",
     "header length 18446744073709551615 is over the limit", None, 0),
    ("header_past_end", make_file("{}", length=3), "header_past_end",
     "header length 3 runs past the end of the 10-byte file", None, 0),
    ("header_at_limit_past_end", make_file("{}", b"x" * 90, length=100_000_000),
     "header_past_end", "runs past the end", None, 0),
    ("header_len_zero", make_file(b""), "json", "the header is empty", None, 8),
    ("header_len_zero_with_data", make_file(b"", b"{}"), "json", "the header is empty",
     None, 8),
    # ---- UTF-8 ----
    ("utf8_invalid_byte", make_file(b'{"a\xff":' + _hdr(F32_2).encode() + b"}", DATA8),
     "utf8", "not valid UTF-8", None, 8 + 3),
    ("utf8_overlong", make_file(b'{"\xc0\xaf":{}}'), "utf8", "not valid UTF-8", None, 8 + 2),
    ("utf8_encoded_surrogate", make_file(b'{"\xed\xa0\x80":{}}'), "utf8", "not valid UTF-8",
     None, 8 + 2),
    ("utf8_truncated_sequence", make_file(b'{"a":{}}\xe2\x82'), "utf8", "not valid UTF-8",
     None, 8 + 8),
    # ---- JSON syntax ----
    ("not_json", make_file("hello"), "json", "expected '{'", None, 8),
    ("not_json_unquoted_key", make_file("{a:1}"), "json", "a string key", None, 9),
    ("truncated_json", make_file('{"a":{"dtype":"F32"'), "json", "header ends", "a", 8 + 19),
    ("truncated_string", make_file('{"a'), "json", "unterminated string", None, 9),
    ("trailing_comma", make_file('{"a":' + _hdr(F32_2) + ",}", DATA8), "json", "a string key",
     None, ...),
    ("control_char_in_string", make_file('{"a\x01":{}}'), "json", "control character 0x01",
     None, 8 + 3),
    ("invalid_escape", make_file('{"a\\x":{}}'), "json", "invalid escape", None, ...),
    ("not_object_array", make_file("[]"), "schema", "the header must be a JSON object", None, 8),
    ("not_object_string", make_file('"abc"'), "schema", "the header must be a JSON object",
     None, 8),
    ("not_object_number", make_file("123"), "schema", "the header must be a JSON object",
     None, 8),
    ("not_object_null", make_file("null"), "schema", "the header must be a JSON object",
     None, 8),
    ("nul_after_object", make_file(b"{}\x00"), "json", "trailing byte 0x00", None, 10),
    ("nul_padding", make_file(b"{}\x00\x00\x00\x00\x00\x00"), "json", "trailing byte 0x00",
     None, 10),
    ("garbage_after_object", make_file("{}x"), "json", "trailing byte 0x78", None, 10),
    ("second_object", make_file("{}{}"), "json", "trailing byte 0x7b", None, 10),
    # ---- duplicates ----
    ("duplicate_tensor", make_file('{"a":' + _hdr(F32_2) + ',"a":'
                                   + _hdr(entry("F32", [2], 8, 16)) + "}", DATA8 * 2),
     "duplicate", "duplicate tensor name", "a", ...),
    ("duplicate_metadata", make_file('{"__metadata__":{},"__metadata__":{}}'), "duplicate",
     "duplicate key '__metadata__'", None, 8 + 19),
    ("duplicate_metadata_key", make_file('{"__metadata__":{"k":"1","k":"2"}}'), "duplicate",
     "duplicate __metadata__ key 'k'", None, ...),
    ("duplicate_field_dtype",
     make_file('{"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', DATA8),
     "duplicate", "field 'dtype' appears twice", "a", 8 + 20),
    ("duplicate_field_shape",
     make_file('{"a":{"dtype":"F32","shape":[2],"shape":[2],"data_offsets":[0,8]}}', DATA8),
     "duplicate", "field 'shape' appears twice", "a", ...),
    ("duplicate_field_offsets",
     make_file('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"data_offsets":[0,8]}}',
               DATA8),
     "duplicate", "field 'data_offsets' appears twice", "a", ...),
    # ---- nesting ----
    ("deep_nesting_unknown_field",
     make_file('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + _nest(200_000)
               + "}}", DATA8),
     "depth", "nested deeper than 64 levels", "a", ...),
    ("deep_nesting_unknown_field_objects",
     make_file('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":'
               + '{"k":' * 200_000 + "1" + "}" * 200_000 + "}}", DATA8),
     "depth", "nested deeper than 64 levels", "a", ...),
    ("deep_nesting_top_level", make_file(_nest(200_000)), "schema",
     "the header must be a JSON object", None, 8),
    ("deep_nesting_top_level_objects", make_file("{" * 200_000 + "}" * 200_000), "json",
     "a string key", None, 9),
    ("deep_nesting_entry_value", make_file('{"a":' + _nest(200_000) + "}"), "depth",
     "nested deeper than 64 levels", "a", ...),
    ("deep_nesting_metadata_value",
     make_file('{"__metadata__":{"k":' + _nest(200_000) + "}}"), "depth",
     "nested deeper than 64 levels", None, ...),
    ("deep_nesting_metadata", make_file('{"__metadata__":' + _nest(200_000) + "}"), "depth",
     "nested deeper than 64 levels", None, ...),
    # ---- dtype ----
    ("unknown_dtype", make_file('{"a":' + _hdr(entry("F33", [2], 0, 8)) + "}", DATA8),
     "dtype", "unknown dtype 'F33'", "a", 8 + 14),
    ("unknown_dtype_lowercase", make_file('{"a":' + _hdr(entry("f32", [2], 0, 8)) + "}", DATA8),
     "dtype", "unknown dtype 'f32'", "a", ...),
    ("non_string_dtype",
     make_file('{"a":{"dtype":32,"shape":[2],"data_offsets":[0,8]}}', DATA8),
     "schema", "dtype must be a string", "a", 8 + 14),
    ("null_dtype",
     make_file('{"a":{"dtype":null,"shape":[2],"data_offsets":[0,8]}}', DATA8),
     "schema", "dtype must be a string", "a", ...),
    # ---- shape ----
    ("negative_dim", make_file('{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}', DATA8),
     "schema", "a shape dimension must be a non-negative integer", "a", 8 + 29),
    ("fractional_dim",
     make_file('{"a":{"dtype":"F32","shape":[1.5],"data_offsets":[0,8]}}', DATA8),
     "schema", "a shape dimension must be an integer, not a fraction", "a", 8 + 29),
    ("exponent_dim",
     make_file('{"a":{"dtype":"F32","shape":[1e3],"data_offsets":[0,8]}}', DATA8),
     "schema", "a shape dimension must be an integer, not a fraction", "a", ...),
    ("string_dim", make_file('{"a":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}}', DATA8),
     "schema", "a shape dimension must be a non-negative integer", "a", ...),
    ("huge_dim",
     make_file('{"a":{"dtype":"U8","shape":[' + "9" * 30 + '],"data_offsets":[0,8]}}', DATA8),
     "schema", "a shape dimension is too large", "a", ...),
    ("shape_not_array", make_file('{"a":{"dtype":"F32","shape":2,"data_offsets":[0,8]}}', DATA8),
     "schema", "shape must be an array of integers", "a", ...),
    ("dim_leading_zero",
     make_file('{"a":{"dtype":"F32","shape":[02],"data_offsets":[0,8]}}', DATA8),
     "json", "leading zero", "a", ...),
    ("numel_overflow",
     make_file('{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}',
               DATA8),
     "overflow", "the number of elements overflows", "a", 8 + 1),
    ("bits_overflow",
     make_file('{"a":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,8]}}',
               DATA8),
     "overflow", "the size in bits overflows", "a", ...),
    ("f4_odd_bits", make_file('{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}', b"\0\0"),
     "misaligned", "3 elements of F4 do not fill a whole number of bytes", "a", ...),
    ("f6_odd_bits",
     make_file('{"a":{"dtype":"F6_E2M3","shape":[3],"data_offsets":[0,3]}}', b"\0\0\0"),
     "misaligned", "3 elements of F6_E2M3 do not fill a whole number of bytes", "a", ...),
    ("size_mismatch", make_file('{"a":' + _hdr(entry("F32", [3], 0, 8)) + "}", DATA8),
     "size_mismatch", "data_offsets span 8 bytes but dtype F32 and the shape need 12", "a", 9),
    ("size_mismatch_zero_size",
     make_file('{"a":' + _hdr(entry("F32", [0], 0, 8)) + "}", DATA8),
     "size_mismatch", "span 8 bytes but dtype F32 and the shape need 0", "a", ...),
    # ---- data_offsets ----
    ("offsets_reversed", make_file('{"a":' + _hdr(entry("U8", [8], 8, 0)) + "}", DATA8),
     "offsets", "data_offsets [8, 0] end before they begin", "a", ...),
    ("offsets_overlap",
     make_file(_hdr({"a": F32_2, "b": entry("F32", [2], 4, 12)}), DATA8 + b"\0" * 4),
     "offsets", "data_offsets [4, 12] overlap the previous tensor, which ends at 8", "b", ...),
    ("offsets_same_range",
     make_file(_hdr({"a": F32_2, "b": F32_2}), DATA8),
     "offsets", "overlap the previous tensor", "b", ...),
    ("offsets_hole",
     make_file(_hdr({"a": F32_2, "b": entry("F32", [2], 12, 20)}), DATA8 * 2 + b"\0" * 4),
     "offsets", "data_offsets [12, 20] leave a hole after the previous tensor, which ends at 8",
     "b", ...),
    ("offsets_hole_at_start", make_file(_hdr({"a": entry("F32", [2], 4, 12)}), b"\0" * 12),
     "offsets", "leave a hole", "a", ...),
    ("offsets_three",
     make_file('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}}', DATA8),
     "schema", "data_offsets must hold exactly 2 integers", "a", ...),
    ("offsets_one", make_file('{"a":{"dtype":"F32","shape":[2],"data_offsets":[8]}}', DATA8),
     "schema", "data_offsets must hold exactly 2 integers", "a", ...),
    ("offsets_empty", make_file('{"a":{"dtype":"F32","shape":[2],"data_offsets":[]}}', DATA8),
     "schema", "data_offsets must hold exactly 2 integers", "a", ...),
    ("offsets_negative",
     make_file('{"a":{"dtype":"F32","shape":[2],"data_offsets":[-1,7]}}', DATA8),
     "schema", "a data offset must be a non-negative integer", "a", ...),
    ("offsets_2_pow_64",
     make_file('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,18446744073709551616]}}',
               DATA8),
     "schema", "a data offset is too large", "a", ...),
    ("offsets_not_array",
     make_file('{"a":{"dtype":"F32","shape":[2],"data_offsets":"0,8"}}', DATA8),
     "schema", "data_offsets must be an array of integers", "a", ...),
    ("offsets_past_end", make_file(_hdr({"a": F32_2}), DATA8[:4]), "file_length",
     "the tensors need 8 data bytes but the file holds only 4", None, ...),
    ("offsets_far_past_end",
     make_file(_hdr({"a": entry("U8", [2**60], 0, 2**60)}), DATA8), "file_length",
     "the tensors need 1152921504606846976 data bytes but the file holds only 8", None, ...),
    ("offsets_u64_max",
     make_file(_hdr({"a": entry("U8", [2**64 - 1], 0, 2**64 - 1)}), DATA8), "overflow",
     "the size in bits overflows", "a", ...),
    ("offsets_u64_max_bool_past_end",
     make_file(_hdr({"a": entry("U8", [2**61 - 1], 0, 2**61 - 1)}), DATA8), "file_length",
     "the tensors need 2305843009213693951 data bytes", None, ...),
    ("trailing_bytes", make_file(_hdr({"a": F32_2}), DATA8 + b"tail"), "file_length",
     "4 trailing bytes after the last tensor", None, ...),
    ("trailing_bytes_empty_header", make_file("{}", b"x"), "file_length",
     "1 trailing bytes after the last tensor", None, 10),
    # ---- __metadata__ ----
    ("metadata_list", make_file('{"__metadata__":["a"]}'), "schema",
     "__metadata__ must be an object of strings", None, ...),
    ("metadata_null", make_file('{"__metadata__":null}'), "schema",
     "__metadata__ must be an object of strings", None, ...),
    ("metadata_string", make_file('{"__metadata__":"abc"}'), "schema",
     "__metadata__ must be an object of strings", None, ...),
    ("metadata_int_value", make_file('{"__metadata__":{"k":1}}'), "schema",
     "__metadata__ value for key 'k' must be a string", None, 8 + 21),
    ("metadata_null_value", make_file('{"__metadata__":{"k":null}}'), "schema",
     "__metadata__ value for key 'k' must be a string", None, ...),
    ("metadata_object_value", make_file('{"__metadata__":{"k":{"x":"y"}}}'), "schema",
     "__metadata__ value for key 'k' must be a string", None, ...),
    # ---- entry schema ----
    ("missing_dtype", make_file('{"a":{"shape":[2],"data_offsets":[0,8]}}', DATA8), "schema",
     "entry is missing the field 'dtype'", "a", 9),
    ("missing_shape", make_file('{"a":{"dtype":"F32","data_offsets":[0,8]}}', DATA8), "schema",
     "entry is missing the field 'shape'", "a", 9),
    ("missing_offsets", make_file('{"a":{"dtype":"F32","shape":[2]}}', DATA8), "schema",
     "entry is missing the field 'data_offsets'", "a", 9),
    ("empty_entry", make_file('{"a":{}}'), "schema", "entry is missing the field 'dtype'", "a",
     ...),
    ("entry_list", make_file('{"a":[1,2]}'), "schema", "entry must be an object", "a", 13),
    ("entry_string", make_file('{"a":"F32"}'), "schema", "entry must be an object", "a", ...),
    ("entry_null", make_file('{"a":null}'), "schema", "entry must be an object", "a", ...),
    # ---- headers that claim more than they hold ----
    ("many_tensors_tiny_header",
     make_file('{"t":{"dtype":"U8","shape":[1000000000000],"data_offsets":[0,1000000000000]}}'),
     "file_length", "the tensors need 1000000000000 data bytes", None, ...),
    ("many_dims_tiny_header",
     make_file('{"t":{"dtype":"U8","shape":[' + ",".join(["65536"] * 8)
               + '],"data_offsets":[0,8]}}', DATA8),
     "overflow", "the number of elements overflows", "t", ...),
    # ---- escapes ----
    ("lone_high_surrogate", make_file('{"\\ud800":{}}'), "json", "lone surrogate", None, ...),
    ("lone_low_surrogate", make_file('{"\\udc00":{}}'), "json", "lone surrogate", None, ...),
    ("high_surrogate_then_letter", make_file('{"\\ud800\\u0041":{}}'), "json",
     "lone surrogate", None, ...),
    ("surrogate_in_metadata", make_file('{"__metadata__":{"k":"\\udfff"}}'), "json",
     "lone surrogate", None, ...),
    ("surrogate_in_dtype",
     make_file('{"a":{"dtype":"\\ud83d","shape":[2],"data_offsets":[0,8]}}', DATA8), "json",
     "lone surrogate", "a", ...),
    ("bad_unicode_escape", make_file('{"\\u00zz":{}}'), "json", "invalid \\u escape", None, ...),
]


def _reader_no_mmap(data: bytes, tmp_path):
    p = tmp_path / "nommap.safetensors"
    p.write_bytes(data)
    r = _C.Reader(str(p), mmap=False)
    try:
        return r.tensors()
    finally:
        r.close()


@pytest.mark.parametrize("data,code,fragment,tensor,position",
                         [pytest.param(*c[1:], id=c[0]) for c in _CASES])
@pytest.mark.parametrize("via", ["load", "load_file", "safe_open", "reader_nommap"])
def test_malformed(data, code, fragment, tensor, position, via, tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    if via == "load":
        fn = lambda: ts.load(data)  # noqa: E731
    elif via == "load_file":
        fn = lambda: ts.load_file(path)  # noqa: E731
    elif via == "safe_open":
        fn = lambda: ts.safe_open(str(path), framework="pt")  # noqa: E731
    else:
        fn = lambda: _reader_no_mmap(data, tmp_path)  # noqa: E731
    exc = expect_error(fn, code, fragment, tensor)
    if position is not ...:
        assert exc.position == position, (exc.position, str(exc))
    if tensor is not None:
        assert repr(tensor) in str(exc)
    if exc.position is not None:
        assert f"(at byte {exc.position})" in str(exc)


def test_every_case_has_a_unique_id():
    ids = [c[0] for c in _CASES]
    assert len(ids) == len(set(ids))


# ---- valid edge cases ----


@pytest.mark.parametrize("header", [b"{}", b"  {}", b"{}  ", b"\n\t{ }\r\n ", b"{}      "])
def test_whitespace_around_header_is_valid(header, loader, mode):
    assert loader(make_file(header)) == {}


def test_whitespace_inside_and_around_entries_is_valid(loader, mode):
    hdr = ' \n{ "a" : { "dtype" : "F32" , "shape" : [ 2 ] , "data_offsets" : [ 0 , 8 ] } }\t\r\n'
    out = loader(make_file(hdr, DATA8))
    assert list(out) == ["a"]
    assert out["a"].tolist() == [1.5, -2.0]


def test_empty_header(loader, mode):
    assert loader(make_file("{}")) == {}
    assert loader(make_file("{}", pad_to=8)) == {}


def test_empty_header_metadata(tmp_path):
    p = tmp_path / "m.safetensors"
    p.write_bytes(make_file('{"__metadata__":{}}'))
    with ts.safe_open(p, framework="pt") as f:
        assert f.metadata() == {}
        assert f.keys() == []
    p.write_bytes(make_file("{}"))
    with ts.safe_open(p, framework="pt") as f:
        assert f.metadata() is None


def test_zero_size_tensors(loader, mode):
    hdr = _hdr({
        "z0": entry("F32", [0], 0, 0),
        "z1": entry("I64", [2, 0, 3], 0, 0),
        "a": entry("F32", [2], 0, 8),
        "z2": entry("BF16", [0], 8, 8),
    })
    out = loader(make_file(hdr, DATA8))
    assert out["z0"].shape == (0,) and out["z0"].dtype == torch.float32
    assert out["z1"].shape == (2, 0, 3) and out["z1"].dtype == torch.int64
    assert out["z2"].shape == (0,) and out["z2"].dtype == torch.bfloat16
    assert out["a"].tolist() == [1.5, -2.0]


def test_only_zero_size_tensors(loader, mode):
    out = loader(make_file(_hdr({"z": entry("U8", [0, 5], 0, 0)})))
    assert out["z"].shape == (0, 5)


def test_scalar_tensors(loader, mode):
    data = struct.pack("<f", 3.25) + struct.pack("<q", -7) + b"\x01"
    hdr = _hdr({
        "f": entry("F32", [], 0, 4),
        "i": entry("I64", [], 4, 12),
        "b": entry("BOOL", [], 12, 13),
    })
    out = loader(make_file(hdr, data))
    assert out["f"].shape == () and out["f"].item() == 3.25
    assert out["i"].shape == () and out["i"].item() == -7
    assert out["b"].shape == () and out["b"].item() is True


def test_unknown_entry_field_is_accepted(loader, mode):
    hdr = ('{"a":{"dtype":"F32","extra":{"x":[1,2,{"y":null}],"z":"s"},"shape":[2],'
           '"data_offsets":[0,8],"more":true}}')
    out = loader(make_file(hdr, DATA8))
    assert out["a"].tolist() == [1.5, -2.0]


def test_moderate_nesting_in_unknown_field_is_accepted(loader):
    hdr = '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + _nest(32) + "}}"
    assert loader(make_file(hdr, DATA8))["a"].tolist() == [1.5, -2.0]


def test_escaped_key_names(loader, mode):
    hdr = ('{"\\u0061":' + _hdr(entry("U8", [1], 0, 1))
           + ',"q\\"\\\\\\/\\n\\t\\u00e9\\ud83d\\ude00":'
           + _hdr(entry("U8", [1], 1, 2)) + "}")
    out = loader(make_file(hdr, b"\x05\x06"))
    assert set(out) == {"a", 'q"\\/\n\té\U0001F600'}
    assert out["a"].item() == 5
    assert out['q"\\/\n\té\U0001F600'].item() == 6


def test_escaped_key_equal_to_raw_key_is_a_duplicate(loader):
    hdr = ('{"a":' + _hdr(entry("U8", [1], 0, 1)) + ',"\\u0061":'
           + _hdr(entry("U8", [1], 1, 2)) + "}")
    expect_error(lambda: loader(make_file(hdr, b"\x05\x06")), "duplicate",
                 "duplicate tensor name", "a")


def test_escaped_dtype_and_field_names(loader):
    hdr = '{"a":{"\\u0064type":"\\u0046\\u0033\\u0032","shape":[2],"data_offsets":[0,8]}}'
    assert loader(make_file(hdr, DATA8))["a"].tolist() == [1.5, -2.0]


def test_unicode_names_raw(loader, mode):
    names = ["héllo", "名前", "emoji\U0001F680", "ÿ", "\u2028sep", "nul\x00inside", ""]
    hdr = {n: entry("U8", [1], i, i + 1) for i, n in enumerate(names)}
    out = loader(make_file(hdr, bytes(range(len(names)))))
    assert set(out) == set(names)
    for i, n in enumerate(names):
        assert out[n].item() == i


def test_metadata_escapes_decode(tmp_path):
    p = tmp_path / "m.safetensors"
    p.write_bytes(make_file('{"__metadata__":{"k\\n":"v\\u00e9\\"","":""}}'))
    with ts.safe_open(p, framework="pt") as f:
        assert f.metadata() == {"k\n": 'vé"', "": ""}


def test_metadata_name_is_not_a_tensor(loader):
    out = loader(make_file('{"__metadata__":{"a":"b"},"t":' + _hdr(F32_2) + "}", DATA8))
    assert list(out) == ["t"]


def test_tensors_in_any_header_order(loader, mode):
    hdr = _hdr({"b": entry("F32", [2], 8, 16), "a": entry("F32", [2], 0, 8)})
    data = struct.pack("<4f", 1, 2, 3, 4)
    out = loader(make_file(hdr, data))
    assert out["a"].tolist() == [1, 2]
    assert out["b"].tolist() == [3, 4]


# ---- rules that apply when a tensor is created ----


def _f6_file(tmp_path):
    p = tmp_path / "f6.safetensors"
    p.write_bytes(make_file(_hdr({"a": entry("F6_E2M3", [4], 0, 3),
                                  "b": entry("U8", [2], 3, 5)}), b"\x01\x02\x03\x04\x05"))
    return p


def test_f6_parses_but_has_no_torch_dtype(tmp_path, mode):
    p = _f6_file(tmp_path)
    with ts.safe_open(p, framework="pt") as f:
        assert f.keys() == ["a", "b"]
        assert f.get_slice("a").get_dtype() == "F6_E2M3"
        assert f.get_slice("a").get_shape() == [4]
        assert f.get_tensor("b").tolist() == [4, 5]
        expect_error(lambda: f.get_tensor("a"), None, "no torch equivalent")
    expect_error(lambda: ts.load_file(p), None, "no torch equivalent")
    expect_error(lambda: ts.load(p.read_bytes()), None, "no torch equivalent")


def test_f4_odd_last_dim_raises_at_tensor_creation(tmp_path, mode):
    p = tmp_path / "f4.safetensors"
    p.write_bytes(make_file(_hdr({"a": entry("F4", [2, 3], 0, 3)}), b"\x12\x34\x56"))
    with ts.safe_open(p, framework="pt") as f:
        assert f.keys() == ["a"]
        expect_error(lambda: f.get_tensor("a"), None, "F4 needs an even last dimension")
    expect_error(lambda: ts.load_file(p), None, "F4 needs an even last dimension")
    expect_error(lambda: ts.load(p.read_bytes()), None, "F4 needs an even last dimension")


def test_f4_even_last_dim_loads_halved(loader, mode):
    out = loader(make_file(_hdr({"a": entry("F4", [3, 2], 0, 3)}), b"\x12\x34\x56"))
    assert out["a"].dtype == torch.float4_e2m1fn_x2
    assert out["a"].shape == (3, 1)
    assert bytes(out["a"].view(torch.uint8).reshape(-1).tolist()) == b"\x12\x34\x56"


@pytest.mark.parametrize("kind", ["f6", "f4_odd"])
def test_tensor_creation_errors_carry_attributes(tmp_path, kind, mode):
    # every SafetensorError has .code, .tensor and .position (the documented API)
    if kind == "f6":
        data = make_file(_hdr({"a": entry("F6_E2M3", [4], 0, 3)}), b"\0\0\0")
    else:
        data = make_file(_hdr({"a": entry("F4", [2, 3], 0, 3)}), b"\0\0\0")
    p = tmp_path / "x.safetensors"
    p.write_bytes(data)
    for fn in (lambda: ts.load(data), lambda: ts.load_file(p)):
        with pytest.raises(SafetensorError) as info:
            fn()
        assert getattr(info.value, "tensor", "<missing>") == "a"
        assert isinstance(getattr(info.value, "code", None), str)
        assert hasattr(info.value, "position")


def test_unknown_tensor_name(tmp_path, mode):
    p = tmp_path / "a.safetensors"
    p.write_bytes(make_file(_hdr({"a": F32_2}), DATA8))
    with ts.safe_open(p, framework="pt") as f:
        exc = expect_error(lambda: f.get_tensor("nope"), "missing", "no tensor named 'nope'",
                           "nope")
        assert exc.position is None
        expect_error(lambda: f.get_slice("nope"), "missing", "'nope'", "nope")
        # a prefix or extension of a real name is not that name
        expect_error(lambda: f.get_tensor("a\0"), "missing", "no tensor named", "a\0")
        expect_error(lambda: f.get_tensor(""), "missing", "no tensor named", "")
        with pytest.raises(TypeError):
            f.get_tensor(1)


def test_missing_file(tmp_path):
    p = tmp_path / "does_not_exist.safetensors"
    with pytest.raises(FileNotFoundError):
        ts.load_file(p)
    with pytest.raises(FileNotFoundError):
        ts.safe_open(str(p), framework="pt")
    with pytest.raises(FileNotFoundError):
        _C.Reader(str(p), mmap=False)


def test_directory(tmp_path):
    for fn in (lambda: ts.load_file(tmp_path), lambda: ts.safe_open(str(tmp_path), "pt"),
               lambda: _C.Reader(str(tmp_path), mmap=False)):
        with pytest.raises(OSError) as info:
            fn()
        assert isinstance(info.value, IsADirectoryError), repr(info.value)
        assert not isinstance(info.value, SafetensorError)


def test_safetensor_error_is_value_error():
    assert issubclass(SafetensorError, ValueError)
    assert ts.SafetensorError is _C.SafetensorError


def test_long_tensor_name_truncated_in_error():
    name = "é" * 300  # 600 UTF-8 bytes, truncated on a character boundary
    data = make_file(_hdr({name: entry("F33", [2], 0, 8)}), DATA8)
    exc = expect_error(lambda: ts.load(data), "dtype", "unknown dtype")
    assert exc.tensor and name.startswith(exc.tensor)
    assert len(exc.tensor.encode()) <= 200


def test_error_does_not_leak_mapping(tmp_path):
    before = _C.live_mappings()
    p = tmp_path / "bad.safetensors"
    p.write_bytes(make_file(_hdr({"a": F32_2}), DATA8 + b"x"))
    for _ in range(3):
        with pytest.raises(SafetensorError):
            ts.load_file(p)
    assert _C.live_mappings() == before
    assert str(p) not in open("/proc/self/maps").read()


def test_truncated_after_validation_with_pread(tmp_path):
    # mmap=False reads data by position after validating: a file that shrank meanwhile
    # is reported, not read past its end
    p = tmp_path / "t.safetensors"
    p.write_bytes(make_file(_hdr({"a": entry("U8", [4096], 0, 4096)}), b"\1" * 4096))
    r = _C.Reader(str(p), mmap=False)
    try:
        os.truncate(p, 100)
        expect_error(lambda: r.tensors(), None, "truncated")
    finally:
        r.close()
