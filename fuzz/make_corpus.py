#!/usr/bin/env python3
"""Writes the seed corpus for fuzz_engine into fuzz/corpus/ (stdlib only).

Every file is small and has a deterministic name: valid_*.st files are well-formed
safetensors files, bad_*.st files break one rule each. Run it again after editing;
it rewrites the directory from scratch.

Example:
    python3 fuzz/make_corpus.py
"""

import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "corpus")

# name -> bits per element
DTYPES = {
    "BOOL": 8, "U8": 8, "I8": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "F64": 64, "I64": 64, "U64": 64, "C64": 64,
    "F8_E4M3": 8, "F8_E5M2": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F8_E8M0": 8,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
# the reference writer's order
WRITE_ORDER = [
    "U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
    "F8_E5M2FNUZ", "F8_E4M3FNUZ", "F8_E8M0", "F8_E4M3", "F8_E5M2", "I8", "U8",
    "F6_E3M2", "F6_E2M3", "F4", "BOOL",
]

U64_MAX = 2**64 - 1


def nbytes(dtype, shape):
    numel = 1
    for d in shape:
        numel *= d
    return numel * DTYPES[dtype] // 8


def data(n):
    """Deterministic, non-zero data bytes."""
    return bytes((i * 37 + 11) & 0xFF for i in range(n))


def prefix(n):
    return struct.pack("<Q", n)


def raw(header, tail=b"", n=None):
    """A file from raw header bytes; n overrides the length prefix."""
    if isinstance(header, str):
        header = header.encode("utf-8")
    return prefix(len(header) if n is None else n) + header + tail


def compact(obj):
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def canonical(tensors, metadata=None):
    """The reference writer's bytes; tensors is a list of (name, dtype, shape)."""
    order = sorted(tensors, key=lambda t: (WRITE_ORDER.index(t[1]), t[0].encode("utf-8")))
    parts = []
    if metadata is not None:
        parts.append('"__metadata__":' + compact(dict(sorted(metadata.items()))))
    off = 0
    for name, dtype, shape in order:
        end = off + nbytes(dtype, shape)
        entry = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, end]}
        parts.append(compact(name) + ":" + compact(entry))
        off = end
    header = ("{" + ",".join(parts) + "}").encode("utf-8")
    header += b" " * (-(8 + len(header)) % 8)
    return prefix(len(header)) + header + data(off)


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def from_obj(obj, data_len, extra=b""):
    return raw(compact(obj), data(data_len) + extra)


def valid():
    files = {}
    for dtype in DTYPES:
        # [2, 4]: 8 elements fill whole bytes for the 4- and 6-bit types too
        files["valid_" + dtype.lower()] = canonical([("t", dtype, [2, 4])])
    files["valid_all_dtypes"] = canonical(
        [("w." + d.lower(), d, [4]) for d in DTYPES], {"format": "pt"})
    files["valid_empty_header"] = raw("{}")
    files["valid_empty_padded"] = raw("{}      ")
    files["valid_whitespace"] = raw(
        ' \t\r\n{ "a" : { "dtype" : "U8" , "shape" : [ 2 ] , "data_offsets" : [ 0 , 2 ] } }'
        " \n\t ", data(2))
    files["valid_zero_size"] = canonical(
        [("empty", "F32", [0]), ("empty2", "F16", [3, 0, 5]), ("x", "U8", [1])])
    files["valid_zero_only"] = canonical([("z", "F64", [0, 0])])
    files["valid_scalar"] = canonical([("s", "F32", []), ("b", "BOOL", [])])
    files["valid_metadata"] = canonical(
        [("w", "F32", [2])], {"z": "last", "a": "first", "format": "pt", "": "empty"})
    files["valid_metadata_empty"] = canonical([("w", "I8", [3])], {})
    files["valid_metadata_only"] = raw('{"__metadata__":{"k":"v"}}')
    files["valid_metadata_last"] = from_obj(
        {"w": entry("U8", [1], 0, 1), "__metadata__": {"b": "2", "a": "1"}}, 1)
    files["valid_escaped_names"] = raw(
        '{"a\\"b":' + compact(entry("U8", [1], 0, 1))
        + ',"back\\\\slash":' + compact(entry("U8", [1], 1, 2))
        + ',"nl\\n\\t\\r\\b\\f\\/":' + compact(entry("U8", [1], 2, 3))
        + ',"nul\\u0000x":' + compact(entry("U8", [1], 3, 4))
        + ',"\\u00e9\\u4E2D":' + compact(entry("U8", [1], 4, 5))
        + ',"\\ud83d\\ude00":' + compact(entry("U8", [1], 5, 6))
        + ',"":' + compact(entry("U8", [1], 6, 7))
        + ',"\\u005f_metadata_\\u005fx":' + compact(entry("U8", [1], 7, 8))
        + "}", data(8))
    files["valid_utf8_names"] = canonical(
        [("caf\u00e9", "U8", [1]), ("\u4e2d\u6587", "U8", [1]), ("\U0001f600", "U8", [1]),
         ("del\x7f", "U8", [1])])
    files["valid_unknown_field"] = from_obj(
        {"w": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2],
               "extra": {"a": [1, -2.5e3, True, False, None, "s", {}, []]}}}, 2)
    files["valid_unsorted_offsets"] = from_obj(
        {"b": entry("U8", [2], 2, 4), "a": entry("U8", [2], 0, 2)}, 4)
    files["valid_many"] = canonical(
        [("layer.%d.%s" % (i, p), d, [i % 3 + 1, 2])
         for i in range(12) for p, d in (("w", "F16"), ("b", "F32"))])
    files["valid_f4_odd_dims"] = canonical([("q", "F4", [3, 2])])
    files["valid_f6_four"] = canonical([("q", "F6_E2M3", [4]), ("r", "F6_E3M2", [1, 4])])
    files["valid_big_dims_zero"] = canonical([("z", "F32", [0, U64_MAX])])
    files["valid_big_numel"] = raw(compact({"a": entry("U8", [1, 1, 1, 1, 1, 1, 2], 0, 2)}),
                                   data(2))
    files["valid_exp_in_unknown"] = from_obj(
        {"w": {"data_offsets": [0, 1], "x": 1e300, "shape": [1], "dtype": "I8"}}, 1)
    return files


def malformed():
    f32 = compact(entry("F32", [2], 0, 8))
    files = {}
    # the prefix
    files["bad_empty"] = b""
    files["bad_7_bytes"] = b"\x02\x00\x00\x00\x00\x00\x00"
    files["bad_header_len_0"] = prefix(0)
    files["bad_header_len_0_with_data"] = prefix(0) + b"{}"
    files["bad_header_past_end"] = raw("{}", n=100)
    files["bad_header_past_end_by_1"] = raw("{}", n=3)
    files["bad_header_len_u64_max"] = raw("{}", n=U64_MAX)
    files["bad_header_len_over_limit"] = raw("{}", n=100000001)
    files["bad_header_len_at_limit"] = raw("{}", n=100000000)
    # JSON
    files["bad_not_json"] = raw("hello world")
    files["bad_truncated_json"] = raw('{"a":{"dtype":"F32","sha')
    files["bad_truncated_string"] = raw('{"a')
    files["bad_json_array"] = raw("[]")
    files["bad_json_string"] = raw('"{}"')
    files["bad_json_number"] = raw("12")
    files["bad_json_null"] = raw("null")
    files["bad_json_whitespace_only"] = raw("        ")
    files["bad_utf8_invalid_byte"] = raw(b'{"\xff":' + f32.encode() + b"}", data(8))
    files["bad_utf8_overlong"] = raw(b'{"\xc0\xaf":' + f32.encode() + b"}", data(8))
    files["bad_utf8_surrogate"] = raw(b'{"\xed\xa0\x80":' + f32.encode() + b"}", data(8))
    files["bad_utf8_truncated"] = raw(b'{"\xe4\xb8":' + f32.encode() + b"}", data(8))
    files["bad_utf8_above_max"] = raw(b'{"\xf4\x90\x80\x80":' + f32.encode() + b"}", data(8))
    files["bad_nul_after_json"] = raw('{"a":' + f32 + "}\x00\x00\x00", data(8))
    files["bad_trailing_garbage"] = raw('{"a":' + f32 + "} x", data(8))
    files["bad_two_objects"] = raw("{}{}")
    files["bad_trailing_comma"] = raw('{"a":' + f32 + ",}", data(8))
    files["bad_control_in_string"] = raw('{"a\x01":' + f32 + "}", data(8))
    files["bad_escape"] = raw('{"a\\x":' + f32 + "}", data(8))
    files["bad_u_escape"] = raw('{"a\\u12g4":' + f32 + "}", data(8))
    files["bad_lone_high_surrogate"] = raw('{"\\ud800":' + f32 + "}", data(8))
    files["bad_lone_low_surrogate"] = raw('{"\\udc00":' + f32 + "}", data(8))
    files["bad_surrogate_pair_reversed"] = raw('{"\\udc00\\ud800":' + f32 + "}", data(8))
    files["bad_key_not_string"] = raw('{a:' + f32 + "}", data(8))
    files["bad_missing_colon"] = raw('{"a" ' + f32 + "}", data(8))
    # keys
    files["bad_duplicate_tensor"] = raw('{"a":' + compact(entry("U8", [1], 0, 1)) + ',"a":'
                                        + compact(entry("U8", [1], 1, 2)) + "}", data(2))
    files["bad_duplicate_escaped"] = raw('{"a":' + compact(entry("U8", [1], 0, 1))
                                         + ',"\\u0061":' + compact(entry("U8", [1], 1, 2))
                                         + "}", data(2))
    files["bad_duplicate_metadata"] = raw('{"__metadata__":{},"__metadata__":{}}')
    files["bad_duplicate_metadata_key"] = raw('{"__metadata__":{"k":"1","k":"2"}}')
    files["bad_duplicate_field"] = raw(
        '{"a":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}', data(1))
    # nesting
    files["bad_deep_nesting_unknown"] = raw(
        '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":' + "[" * 100 + "]" * 100
        + "}}", data(1))
    files["bad_deep_nesting_metadata"] = raw(
        '{"__metadata__":{"k":' + '{"a":' * 100 + "1" + "}" * 100 + "}}")
    files["bad_deep_nesting_entry"] = raw('{"a":' + "[" * 100 + "]" * 100 + "}")
    files["valid_nesting_63"] = raw(
        '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":' + "[" * 63 + "]" * 63
        + "}}", data(1))
    files["bad_nesting_65"] = raw(
        '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":' + "[" * 65 + "]" * 65
        + "}}", data(1))
    # dtypes
    files["bad_dtype_unknown"] = raw(compact({"a": entry("F128", [1], 0, 16)}), data(16))
    files["bad_dtype_lowercase"] = raw(compact({"a": entry("f32", [1], 0, 4)}), data(4))
    files["bad_dtype_nul"] = raw('{"a":{"dtype":"F32\\u0000","shape":[1],"data_offsets":[0,4]}}',
                                 data(4))
    files["bad_dtype_number"] = raw('{"a":{"dtype":32,"shape":[1],"data_offsets":[0,4]}}',
                                    data(4))
    files["bad_dtype_null"] = raw('{"a":{"dtype":null,"shape":[1],"data_offsets":[0,4]}}',
                                  data(4))
    # dimensions
    for name, dim in (("negative", "-1"), ("fraction", "1.5"), ("exponent", "1e2"),
                      ("string", '"2"'), ("30_digits", "1" * 30), ("leading_zero", "01"),
                      ("u64_max_plus_1", str(2**64)), ("minus_zero", "-0"),
                      ("null", "null"), ("nested", "[2]")):
        files["bad_dim_" + name] = raw(
            '{"a":{"dtype":"U8","shape":[' + dim + '],"data_offsets":[0,2]}}', data(2))
    files["bad_shape_not_array"] = raw('{"a":{"dtype":"U8","shape":2,"data_offsets":[0,2]}}',
                                       data(2))
    files["bad_shape_unclosed"] = raw('{"a":{"dtype":"U8","shape":[2,"data_offsets":[0,2]}}',
                                      data(2))
    files["bad_numel_overflow"] = raw(
        compact({"a": entry("U8", [2**32, 2**32], 0, 0)}))
    files["bad_numel_overflow_then_zero"] = raw(
        compact({"a": entry("U8", [2**32, 2**32, 0], 0, 0)}))
    files["bad_bits_overflow"] = raw(compact({"a": entry("F64", [2**62], 0, 0)}))
    files["bad_nbytes_u64_max"] = raw(compact({"a": entry("U8", [U64_MAX], 0, U64_MAX)}))
    files["bad_size_mismatch"] = raw(compact({"a": entry("F32", [2], 0, 7)}), data(7))
    files["bad_size_mismatch_scalar"] = raw(compact({"a": entry("F32", [], 0, 8)}), data(8))
    files["bad_f4_odd_numel"] = raw(compact({"a": entry("F4", [3], 0, 1)}), data(1))
    files["bad_f6_misaligned"] = raw(compact({"a": entry("F6_E2M3", [3], 0, 2)}), data(2))
    # offsets
    files["bad_offsets_reversed"] = raw(compact({"a": entry("U8", [2], 2, 0)}), data(2))
    files["bad_offsets_overlap"] = raw(compact(
        {"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 2, 6)}), data(6))
    files["bad_offsets_hole"] = raw(compact(
        {"a": entry("U8", [2], 0, 2), "b": entry("U8", [2], 3, 5)}), data(5))
    files["bad_offsets_start_not_zero"] = raw(compact({"a": entry("U8", [2], 1, 3)}), data(3))
    files["bad_offsets_three"] = raw(
        '{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2,4]}}', data(4))
    files["bad_offsets_one"] = raw('{"a":{"dtype":"U8","shape":[2],"data_offsets":[2]}}',
                                   data(2))
    files["bad_offsets_empty"] = raw('{"a":{"dtype":"U8","shape":[0],"data_offsets":[]}}')
    files["bad_offsets_negative"] = raw(
        '{"a":{"dtype":"U8","shape":[2],"data_offsets":[-2,0]}}', data(2))
    files["bad_offsets_past_end"] = raw(compact({"a": entry("U8", [8], 0, 8)}), data(4))
    files["bad_offsets_u64_max"] = raw(compact({"a": entry("U8", [1], U64_MAX - 1, U64_MAX)}),
                                       data(1))
    files["bad_offsets_zero_size_hole"] = raw(compact(
        {"a": entry("U8", [2], 0, 2), "z": entry("U8", [0], 5, 5)}), data(2))
    files["bad_trailing_bytes"] = raw(compact({"a": entry("U8", [2], 0, 2)}), data(3))
    files["bad_trailing_bytes_empty"] = raw("{}", b"\x00")
    # metadata
    files["bad_metadata_array"] = raw('{"__metadata__":["a","b"]}')
    files["bad_metadata_string"] = raw('{"__metadata__":"x"}')
    files["bad_metadata_null"] = raw('{"__metadata__":null}')
    files["bad_metadata_number_value"] = raw('{"__metadata__":{"k":1}}')
    files["bad_metadata_object_value"] = raw('{"__metadata__":{"k":{"a":"b"}}}')
    files["bad_metadata_null_value"] = raw('{"__metadata__":{"k":null}}')
    # entries
    for field in ("dtype", "shape", "data_offsets"):
        e = entry("U8", [2], 0, 2)
        del e[field]
        files["bad_missing_" + field] = raw(compact({"a": e}), data(2))
    files["bad_entry_empty_object"] = raw('{"a":{}}')
    files["bad_entry_array"] = raw('{"a":[]}')
    files["bad_entry_string"] = raw('{"a":"F32"}')
    files["bad_name_metadata_escaped_dup"] = raw('{"__metadata__":{},"\\u005f_metadata__":{}}')
    # a header claiming many tensors in ~100 bytes
    files["bad_claims_many_tensors"] = raw(
        '{"a":{"dtype":"U8","shape":[1000000000000],"data_offsets":[0,1000000000000]}}')
    files["bad_claims_huge_header"] = raw(
        '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"U8","shape":[1],'
        '"data_offsets":[1,2]}', n=99999999)
    files["bad_many_dims"] = raw(
        '{"a":{"dtype":"U8","shape":[' + ",".join(["1"] * 40) + '],"data_offsets":[0,2]}}',
        data(2))
    files["bad_many_keys_short"] = raw("{" + ",".join('"%d":0' % i for i in range(20)) + "}")
    return files


def main():
    os.makedirs(OUT, exist_ok=True)
    for old in os.listdir(OUT):
        if old.endswith(".st"):
            os.remove(os.path.join(OUT, old))
    files = {}
    files.update(valid())
    files.update(malformed())
    total = 0
    for name in sorted(files):
        with open(os.path.join(OUT, name + ".st"), "wb") as f:
            f.write(files[name])
        total += len(files[name])
    print("wrote %d files, %d bytes, into %s" % (len(files), total, OUT))


if __name__ == "__main__":
    main()
