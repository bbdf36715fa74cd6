"""Zero-copy loading: memory stays flat until touched, tensors live on a private
mapping that is released with the last tensor, misaligned data is copied."""
from __future__ import annotations

import gc
import json
import os
import struct

import pytest
import torch

import torch_safetensors as ts
from torch_safetensors import _C

from conftest import assert_same, entry, make_file, mapped_paths, rss_bytes, tensor_bytes

MiB = 1 << 20


def _mapping_ranges(path) -> list:
    """(start, end) address ranges where path is mapped."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == str(path):
                lo, hi = parts[0].split("-")
                out.append((int(lo, 16), int(hi, 16)))
    return out


def _points_into_mapping(t: torch.Tensor, path) -> bool:
    p = t.data_ptr()
    return any(lo <= p < hi for lo, hi in _mapping_ranges(path))


def _drop_page_cache(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture
def small_file(tmp_path):
    p = tmp_path / "small.safetensors"
    ts.save_file({
        "w": torch.arange(60, dtype=torch.float32).reshape(3, 4, 5),
        "b": torch.arange(8, dtype=torch.int64),
        "h": torch.arange(6, dtype=torch.float16).reshape(2, 3),
    }, p)
    return p


# ---- memory ----


def test_big_file_rss_flat_until_touched(tmp_path, mode):
    p = tmp_path / "big.safetensors"
    n = (1 << 30) // 4  # 1 GiB of float32
    big = torch.empty(n, dtype=torch.float32)  # untouched pages: no RSS for the source
    big[:1024] = torch.arange(1024, dtype=torch.float32)
    big[-1024:] = -1.0
    ts.save_file({"big": big, "small": torch.arange(10)}, p)
    del big
    gc.collect()
    assert p.stat().st_size > (1 << 30)
    _drop_page_cache(p)
    try:
        before = rss_bytes()
        tensors = ts.load_file(p)
        t = tensors["big"]
        after_load = rss_bytes()
        assert after_load - before < 50 * MiB, (after_load - before) / MiB
        assert t.shape == (n,) and t.dtype == torch.float32
        assert _points_into_mapping(t, p)
        # touching a few elements pulls in a few pages only
        assert t[:1024].tolist() == list(range(1024))
        assert t[-1].item() == -1.0
        assert tensors["small"].tolist() == list(range(10))
        assert rss_bytes() - before < 50 * MiB
        # touching everything does count: the measurement can see the file
        assert t[1024:-1024].count_nonzero().item() >= 0
        assert rss_bytes() - before > 512 * MiB
        del t, tensors
        gc.collect()
        assert str(p) not in mapped_paths()
    finally:
        p.unlink()


# ---- the mapping's life ----


def test_tensors_point_into_the_mapping(small_file, mode):
    tensors = ts.load_file(small_file)
    assert str(small_file) in mapped_paths()
    for name, t in tensors.items():
        assert _points_into_mapping(t, small_file), name


def test_file_mapping_released_with_last_tensor(small_file, mode):
    gc.collect()
    before = _C.live_mappings()
    tensors = ts.load_file(small_file)
    assert _C.live_mappings() == before + 1
    assert str(small_file) in mapped_paths()
    w = tensors.pop("w")
    view = w[1:, ::2]
    del w
    tensors.clear()
    gc.collect()
    # a view still pins the mapping
    assert str(small_file) in mapped_paths()
    assert _C.live_mappings() == before + 1
    assert view[0, 0, 0].item() == 20.0
    del view
    gc.collect()
    assert str(small_file) not in mapped_paths()
    assert _C.live_mappings() == before


def test_tensors_outlive_safe_open(small_file, mode):
    gc.collect()
    before = _C.live_mappings()
    with ts.safe_open(small_file, framework="pt") as f:
        w = f.get_tensor("w")
        all_ = f.get_tensors()
    assert w.sum().item() == sum(range(60))
    assert all_["b"].tolist() == list(range(8))
    assert str(small_file) in mapped_paths()
    assert _C.live_mappings() == before + 1
    del all_
    gc.collect()
    assert str(small_file) in mapped_paths()
    del w
    gc.collect()
    assert str(small_file) not in mapped_paths()
    assert _C.live_mappings() == before


def test_closed_safe_open_refuses_more_reads(small_file):
    f = ts.safe_open(small_file, framework="pt")
    f.close()
    with pytest.raises(ValueError):
        f.get_tensor("w")
    with pytest.raises(ValueError):
        f.keys()


def test_safe_open_without_tensors_releases_on_close(small_file, mode):
    gc.collect()
    before = _C.live_mappings()
    with ts.safe_open(small_file, framework="pt") as f:
        assert _C.live_mappings() == before + 1
        assert f.keys() == ["b", "h", "w"]
    assert _C.live_mappings() == before
    assert str(small_file) not in mapped_paths()


def test_file_deleted_after_load_keeps_tensors(small_file, mode):
    tensors = ts.load_file(small_file)
    small_file.unlink()
    gc.collect()
    assert tensors["w"][2, 3, 4].item() == 59.0
    assert tensors["h"].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_inplace_edit_does_not_change_the_file(small_file, mode):
    original = small_file.read_bytes()
    tensors = ts.load_file(small_file)
    tensors["w"].fill_(7.0)
    tensors["b"][3] = -1
    assert tensors["w"].sum().item() == 7.0 * 60
    with ts.safe_open(small_file, framework="pt") as f:
        h = f.get_tensor("h")
        h.mul_(0)
    assert small_file.read_bytes() == original
    fresh = ts.load_file(small_file)
    assert fresh["w"].sum().item() == sum(range(60))
    assert fresh["b"].tolist() == list(range(8))
    # the edited tensors keep their edits: private copy-on-write pages
    assert tensors["b"][3].item() == -1
    assert h.sum().item() == 0


def test_mmap_false_reader_owns_its_memory(small_file):
    gc.collect()
    before = _C.live_mappings()
    r = _C.Reader(str(small_file), mmap=False)
    assert not r.mapped
    tensors = r.tensors()
    r.close()
    assert _C.live_mappings() == before
    assert str(small_file) not in mapped_paths()
    assert tensors["w"].sum().item() == sum(range(60))


def test_load_bytes_copies(small_file):
    data = bytearray(small_file.read_bytes())
    tensors = ts.load(data)
    data[:] = b"\0" * len(data)
    assert tensors["w"].sum().item() == sum(range(60))
    assert tensors["b"].tolist() == list(range(8))


# ---- devices ----


def test_meta_device(small_file, mode):
    gc.collect()
    before = _C.live_mappings()
    tensors = ts.load_file(small_file, device="meta")
    assert _C.live_mappings() == before
    expected = {"w": ((3, 4, 5), torch.float32), "b": ((8,), torch.int64),
                "h": ((2, 3), torch.float16)}
    assert set(tensors) == set(expected)
    for name, (shape, dtype) in expected.items():
        assert tensors[name].is_meta
        assert tensors[name].shape == shape and tensors[name].dtype == dtype
    with ts.safe_open(small_file, framework="pt", device="meta") as f:
        w = f.get_tensor("w")
        assert w.is_meta and w.shape == (3, 4, 5)
        s = f.get_slice("w")[1:, ::2]
        assert s.is_meta and s.shape == (2, 2, 5)
        assert all(t.is_meta for t in f.get_tensors().values())
    gc.collect()
    assert _C.live_mappings() == before


def test_meta_device_for_every_dtype(tmp_path):
    from conftest import ALL_DTYPES, random_tensor
    t = {name: random_tensor(dt, (2, 4), seed=1) for dt, name in ALL_DTYPES}
    p = tmp_path / "m.safetensors"
    ts.save_file(t, p)
    out = ts.load_file(p, device=torch.device("meta"))
    for name, v in t.items():
        assert out[name].is_meta and out[name].dtype == v.dtype and out[name].shape == v.shape


# ---- slices ----

_INDICES = [
    (slice(1, None), slice(None, None, 2)),
    0, 2, -1, -3,
    (1, -2),
    (slice(None), slice(1, 3), slice(None, None, 3)),
    (Ellipsis, 4),
    (Ellipsis, slice(-2, None)),
    slice(0, 100),
    slice(2, 1),
    (slice(None), slice(None), slice(None)),
    (-1, -1, -1),
    (None, 0),
]


@pytest.mark.parametrize("index", _INDICES, ids=[repr(i) for i in _INDICES])
def test_get_slice_matches_indexing(small_file, index, mode):
    full = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    with ts.safe_open(small_file, framework="pt") as f:
        s = f.get_slice("w")
        assert s.get_shape() == [3, 4, 5]
        assert s.get_dtype() == "F32"
        assert len(s) == 3
        part = s[index]
        expected = full[index]
        assert_same(part, expected.contiguous())


def test_get_slice_other_dtypes(small_file, mode):
    with ts.safe_open(small_file, framework="pt") as f:
        assert f.get_slice("b")[2:7:2].tolist() == [2, 4, 6]
        assert f.get_slice("b")[-1].item() == 7
        assert f.get_slice("h").get_dtype() == "F16"
        assert f.get_slice("h")[:, 1].tolist() == [1.0, 4.0]


def test_get_slice_out_of_range_index(small_file):
    with ts.safe_open(small_file, framework="pt") as f:
        with pytest.raises(IndexError):
            f.get_slice("w")[3]
        with pytest.raises(IndexError):
            f.get_slice("w")[-4]


def test_get_slice_result_does_not_pin_the_file(small_file, mode):
    gc.collect()
    before = _C.live_mappings()
    with ts.safe_open(small_file, framework="pt") as f:
        part = f.get_slice("w")[1:]
    gc.collect()
    assert _C.live_mappings() == before
    assert str(small_file) not in mapped_paths()
    assert part.sum().item() == sum(range(20, 60))


def test_get_slice_of_scalar(tmp_path, mode):
    p = tmp_path / "s.safetensors"
    ts.save_file({"s": torch.tensor(2.5)}, p)
    with ts.safe_open(p, framework="pt") as f:
        s = f.get_slice("s")
        assert s.get_shape() == []
        assert s[()].item() == 2.5
        assert s[...].item() == 2.5
        with pytest.raises(TypeError):
            len(s)


# ---- misaligned data ----


def _misaligned_file(misalign: int):
    """A file whose data buffer starts at a byte that is misalign mod 8."""
    values = {
        "f64": torch.tensor([1.5, -2.25, 3.0e100], dtype=torch.float64),
        "f32": torch.tensor([1.0, 2.0, -3.5, 4.25], dtype=torch.float32),
        "c64": torch.tensor([1 + 2j, -3 - 4.5j], dtype=torch.complex64),
        "i64": torch.tensor([-(2**62), 5], dtype=torch.int64),
        "f16": torch.tensor([0.5, -1.0, 2.0], dtype=torch.float16),
        "u8": torch.tensor([1, 2, 3], dtype=torch.uint8),
        "after_u8": torch.tensor([7.0, 8.0], dtype=torch.float32),
    }
    order = ["f64", "f32", "c64", "i64", "f16", "u8", "after_u8"]
    names = {"f64": "F64", "f32": "F32", "c64": "C64", "i64": "I64", "f16": "F16", "u8": "U8",
             "after_u8": "F32"}
    header, data, off = {}, b"", 0
    for k in order:
        b = tensor_bytes(values[k])
        header[k] = entry(names[k], list(values[k].shape), off, off + len(b))
        data += b
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    while (8 + len(h)) % 8 != misalign:
        h += b" "
    return make_file(h, data), values


@pytest.mark.parametrize("misalign", [1, 2, 3, 4, 5, 7])
def test_misaligned_data_loads_correctly(tmp_path, misalign, mode):
    data, values = _misaligned_file(misalign)
    n = struct.unpack("<Q", data[:8])[0]
    assert (8 + n) % 8 == misalign
    p = tmp_path / "mis.safetensors"
    p.write_bytes(data)
    with ts.safe_open(p, framework="pt") as f:
        via_open = {k: f.get_tensor(k) for k in f.keys()}
    for loaded in (ts.load_file(p), ts.load(data), ts.load(bytearray(data)), via_open):
        assert set(loaded) == set(values)
        for k, v in loaded.items():
            assert_same(v, values[k])
            assert v.data_ptr() % v.element_size() == 0, (k, v.data_ptr())
            # kernels work on them
            assert torch.equal(v.clone(), values[k])
        assert loaded["f64"].sum().item() == pytest.approx(1.5 - 2.25 + 3.0e100)
        assert loaded["c64"].abs().tolist() == pytest.approx([5 ** 0.5, (9 + 4.5**2) ** 0.5])


def test_aligned_data_is_not_copied(tmp_path, mode):
    data, values = _misaligned_file(0)
    p = tmp_path / "al.safetensors"
    p.write_bytes(data)
    loaded = ts.load_file(p)
    # f64 at data offset 0 of a data buffer aligned to 8: served from the mapping
    assert _points_into_mapping(loaded["f64"], p)
    assert_same(loaded["f64"], values["f64"])


# ---- what a loaded tensor is made of ----


def test_storage_spans_only_the_tensor(small_file, mode):
    # the storage starts at the tensor's bytes: re-saving or pickling it never
    # drags in the header or the neighbouring tensors
    tensors = ts.load_file(small_file)
    for name, t in tensors.items():
        assert t.storage_offset() == 0, name
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name


def test_loaded_tensors_resave_and_pickle(small_file, mode):
    import copy
    import io
    tensors = ts.load_file(small_file)
    assert ts.save(tensors) == small_file.read_bytes()
    buf = io.BytesIO()
    torch.save(tensors, buf)
    buf.seek(0)
    back = torch.load(buf)
    clone = copy.deepcopy(tensors)
    for k, v in tensors.items():
        assert_same(back[k], v)
        assert_same(clone[k], v)


def test_safe_open_serves_the_file_it_validated(small_file, mode):
    # replacing the path after opening does not change what the handle serves
    with ts.safe_open(small_file, framework="pt") as f:
        ts.save_file({"w": torch.zeros(1)}, small_file)
        assert f.get_tensor("w").sum().item() == sum(range(60))
        assert f.get_slice("b")[:3].tolist() == [0, 1, 2]
        assert f.keys() == ["b", "h", "w"]
    assert ts.load_file(small_file)["w"].tolist() == [0.0]
