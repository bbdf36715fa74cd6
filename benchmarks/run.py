#!/usr/bin/env python
"""Save/load benchmark: torch_safetensors against torch and the safetensors package.

One command runs every workload, operation and alternative, alternating their order
across repetitions, and writes a table (stdout and results.txt), results.json and
results.png into --out (default benchmarks/results/). See benchmarks/README.md.

    python benchmarks/run.py            # the full run (~1 GiB LLM, 20,000 small tensors,
                                        # streams and async_save at 0.5 GiB)
    python benchmarks/run.py --quick    # small sizes, for development
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

# torch's own functions, as they are before torch_safetensors wraps them
_MARK = "__torch_safetensors_original__"
TORCH_SAVE = getattr(torch.save, _MARK, torch.save)
TORCH_LOAD = getattr(torch.load, _MARK, torch.load)

import safetensors  # noqa: E402
import safetensors.torch as st  # noqa: E402

import streams  # noqa: E402
import torch_safetensors as ts  # noqa: E402
import workloads  # noqa: E402

MIB = 1 << 20
OPS = ["save", "load", "load+copy", "cold load+copy"]


# ---- alternatives ----


class Alt:
    """One way to save and/or load a dict of tensors."""

    def __init__(self, key: str, label: str, family: str, ext: str,
                 save: Optional[Callable[[Dict[str, torch.Tensor], str], Any]],
                 load: Callable[[str], Dict[str, torch.Tensor]], safetensors_format: bool):
        self.key, self.label, self.family, self.ext = key, label, family, ext
        self.save, self.load, self.st_format = save, load, safetensors_format


def _ours_save(sd: Dict[str, torch.Tensor], path: str) -> None:
    torch.save(sd, path, format="safetensors")


ALTS: List[Alt] = [
    Alt("ours", "ours: torch.save(format='safetensors') / torch.load", "ours", ".pt",
        _ours_save, lambda p: torch.load(p), True),
    Alt("ours-api", "ours: save_file / load_file", "ours-api", ".safetensors",
        ts.save_file, ts.load_file, True),
    Alt("torch", "torch.save / torch.load (default, = weights_only=True)", "torch", ".pt",
        lambda sd, p: TORCH_SAVE(sd, p), lambda p: TORCH_LOAD(p), False),
    Alt("torch-mmap", "torch.load(mmap=True)", "torch", ".pt",
        None, lambda p: TORCH_LOAD(p, mmap=True), False),
    Alt("torch-unsafe", "torch.load(weights_only=False)", "torch", ".pt",
        None, lambda p: TORCH_LOAD(p, weights_only=False), False),
    Alt("safetensors", "safetensors.torch save_file / load_file", "safetensors", ".safetensors",
        st.save_file, st.load_file, True),
]
ALT_BY_KEY = {a.key: a for a in ALTS}
LIMITS = {
    "write": "limit: one os.write() of the same bytes to a new file",
    "memcpy": "limit: memcpy of the same bytes (torch copy_ between 2 buffers)",
    "read": "limit: cold read of the same bytes into a buffer",
}
LABELS = {**{a.key: a.label for a in ALTS}, **LIMITS}


# ---- the machine: page cache, memory ----


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def evict(path: str) -> None:
    """Drops a file's pages from the page cache (written back first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident_fraction(path: str) -> float:
    """Fraction of a file's pages in the page cache (mincore over a fresh mapping)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    page = os.sysconf("SC_PAGE_SIZE")
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        if addr in (None, ctypes.c_void_p(-1).value):
            return float("nan")
        try:
            pages = (size + page - 1) // page
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                return float("nan")
            return sum(v & 1 for v in vec) / pages
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def proc_status() -> Dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_all(path: str, buf: memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        off = 0
        while off < len(buf):  # one write() unless the kernel returns short (> 2 GiB)
            off += os.write(fd, buf[off:])
    finally:
        os.close(fd)


def read_all(path: str, buf: memoryview) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        off = 0
        while off < len(buf):
            n = os.readv(fd, [buf[off:]])
            if n == 0:
                break
            off += n
        return off
    finally:
        os.close(fd)


# ---- checks (untimed) ----


def same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> Optional[str]:
    """None when both dicts hold the same names, dtypes, shapes and values."""
    if set(a) != set(b):
        return f"names differ: {sorted(set(a) ^ set(b))[:3]}"
    for k, x in a.items():
        y = b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            return f"{k}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}"
        if not torch.equal(x, y):
            return f"{k}: values differ"
    return None


def check(what: str, a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], checks: Dict[str, str]) -> None:
    err = same(a, b)
    checks[what] = "ok" if err is None else err
    if err is not None:
        raise SystemExit(f"verification failed: {what}: {err}")


def header_layout(path: str) -> Dict[str, int]:
    """Counts data offsets that are not multiples of 8, and tensors misaligned for their dtype."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    sizes = {"F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4,
             "BF16": 2, "F16": 2, "I16": 2, "U16": 2}
    not8 = misaligned = 0
    for name, e in header.items():
        if name == "__metadata__":
            continue
        begin = e["data_offsets"][0]
        not8 += begin % 8 != 0
        misaligned += (8 + n + begin) % sizes.get(e["dtype"], 1) != 0
    return {"header_len": n, "offsets_not_multiple_of_8": not8, "element_misaligned": misaligned}


def misalign_copy(src: str, dst: str) -> None:
    """dst: src with one more header space, so the data starts at an odd file offset."""
    with open(src, "rb") as f:
        blob = f.read()
    n = struct.unpack("<Q", blob[:8])[0]
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", n + 1) + blob[8:8 + n] + b" " + blob[8 + n:])


# ---- timed runs ----


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Bench:
    """One workload's data, files and buffers, and the timed operations over them."""

    def __init__(self, name: str, spec: workloads.Spec, workdir: str, alts: List[Alt]):
        self.name, self.spec, self.workdir = name, spec, workdir
        self.nbytes = workloads.nbytes(spec)
        self.misaligned = name == "mixed-misaligned"
        self.alts = [a for a in alts if a.st_format or not self.misaligned]
        self.checks: Dict[str, str] = {}
        self.cold_residue: List[float] = []
        log(f"[{name}] building {len(spec)} tensors, {self.nbytes / MIB:.1f} MiB")
        self.sd = workloads.make_tensors(spec)
        self.params = workloads.make_params(spec)
        self.src = torch.ones(self.nbytes, dtype=torch.uint8)
        self.dst = torch.zeros(self.nbytes, dtype=torch.uint8)
        self.files: Dict[str, str] = {}
        self.layout: Dict[str, int] = {}
        self._write_load_files()

    def path(self, stem: str) -> str:
        return os.path.join(self.workdir, f"{self.name}-{stem}")

    def _write_load_files(self) -> None:
        for a in self.alts:
            if a.family in self.files:
                continue
            saver = ALT_BY_KEY[a.family].save
            p = self.path("load-" + a.family + a.ext)
            assert saver is not None
            saver(self.sd, p)
            self.files[a.family] = p
        if self.misaligned:
            p = self.path("load-misaligned.safetensors")
            misalign_copy(self.files.get("ours-api") or self.files["ours"], p)
            self.files = {fam: p for fam in self.files}
        st_file = self.files.get("ours-api") or self.files.get("ours")
        if st_file:
            self.layout = header_layout(st_file)
        self.raw = self.path("raw.bin")
        write_all(self.raw, memoryview(self.src.numpy()))
        os.sync()

    def cleanup(self) -> None:
        for p in set(self.files.values()) | {self.raw}:
            _remove(p)
        for a in ALTS:
            _remove(self.path("save-" + a.key + a.ext))
        _remove(self.path("save-write.bin"))

    # -- one timed run of (op, candidate); everything before the clock is untimed --

    def run(self, op: str, cand: str) -> float:
        gc.collect()
        os.sync()  # no dirty pages from an earlier run are being written back meanwhile
        if op == "save":
            target = self.path("save-" + cand + (ALT_BY_KEY[cand].ext if cand in ALT_BY_KEY else ".bin"))
            _remove(target)
            os.sync()
            if cand == "write":
                buf = memoryview(self.src.numpy())
                return timed(lambda: write_all(target, buf))
            save = ALT_BY_KEY[cand].save
            assert save is not None
            return timed(lambda: save(self.sd, target))
        if op == "load":
            load = ALT_BY_KEY[cand].load
            path = self.files[ALT_BY_KEY[cand].family]
            out: List[Any] = []
            t = timed(lambda: out.append(load(path)))
            out.clear()  # released untimed
            return t
        cold = op == "cold load+copy"
        if cand == "memcpy":
            return timed(lambda: self.dst.copy_(self.src))
        if cand == "read":
            evict(self.raw)
            self.cold_residue.append(resident_fraction(self.raw))
            buf = memoryview(self.dst.numpy())
            return timed(lambda: read_all(self.raw, buf))
        load = ALT_BY_KEY[cand].load
        path = self.files[ALT_BY_KEY[cand].family]
        if cold:
            evict(path)
            self.cold_residue.append(resident_fraction(path))
        params = self.params

        def load_copy() -> None:
            sd = load(path)
            for k, v in sd.items():
                params[k].copy_(v)
            del sd  # the loaded dict is released inside the clock: load_state_dict's caller pays it

        return timed(load_copy)

    def candidates(self, op: str) -> List[str]:
        if op == "save":
            if self.misaligned:
                return []
            return [a.key for a in self.alts if a.save is not None] + ["write"]
        keys = [a.key for a in self.alts]
        if op == "load":
            return keys
        return keys + (["read"] if op == "cold load+copy" else ["memcpy"])

    def verify(self, op: str, cand: str) -> None:
        """Once per (op, candidate), after its warm-up run: the data is the original."""
        if op == "save" and cand in ALT_BY_KEY:
            a = ALT_BY_KEY[cand]
            loader = ALT_BY_KEY[a.family].load
            target = self.path("save-" + cand + a.ext)
            check(f"save {cand}: reads back equal", self.sd, loader(target), self.checks)
            if a.st_format:  # and the package reads our files (and we read its)
                check(f"save {cand}: safetensors package reads it", self.sd, st.load_file(target), self.checks)
                check(f"save {cand}: ours reads it", self.sd, ts.load_file(target), self.checks)
        elif op == "save":
            ok = os.path.getsize(self.path("save-write.bin")) == self.nbytes
            self.checks["save write: file size"] = "ok" if ok else "wrong size"
        elif op == "load":
            a = ALT_BY_KEY[cand]
            check(f"load {cand}", self.sd, a.load(self.files[a.family]), self.checks)
        elif cand in ("memcpy", "read"):
            ok = torch.equal(self.dst, self.src)
            self.checks[f"{op} {cand}"] = "ok" if ok else "differs"
            self.dst.zero_()
        else:
            check(f"{op} {cand}: params", self.sd, self.params, self.checks)
            for p in self.params.values():
                p.zero_()


def stats(samples: List[float]) -> Dict[str, Any]:
    s = sorted(samples)
    q = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else [s[0], s[0], s[0]]
    return {"median": statistics.median(s), "min": s[0], "max": s[-1], "q1": q[0], "q3": q[2],
            "n": len(s), "samples": samples}


def bench_workload(b: Bench, ops: List[str], repeat: int) -> Dict[str, Dict[str, Any]]:
    results: Dict[str, Dict[str, Any]] = {}
    for op in ops:
        cands = b.candidates(op)
        if not cands:
            continue
        log(f"[{b.name}] {op}: warm-up + verify")
        for c in cands:
            b.run(op, c)
            b.verify(op, c)
        samples: Dict[str, List[float]] = {c: [] for c in cands}
        for rep in range(repeat):
            order = cands[rep % len(cands):] + cands[:rep % len(cands)]  # rotate the order
            if rep % 2:
                order.reverse()
            for c in order:
                samples[c].append(b.run(op, c))
            log(f"[{b.name}] {op}: rep {rep + 1}/{repeat}: " + " ".join(f"{c}={samples[c][-1]:.3f}" for c in cands))
        results[op] = {c: stats(v) for c, v in samples.items()}
    return results


# ---- peak memory, each in a fresh process ----


def child(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Runs in a fresh interpreter: one save or one load+copy, RSS around it."""
    spec = workloads.build(cfg["workload"], cfg["size_gib"], cfg["small_count"])
    n = workloads.nbytes(spec)
    cand, path = cfg["cand"], cfg["path"]
    if cfg["kind"] == "save":
        _remove(path)
        if cand == "write":
            buf = torch.ones(n, dtype=torch.uint8)
            inputs: Any = memoryview(buf.numpy())
        else:
            inputs = workloads.make_tensors(spec)
        gc.collect()
        os.sync()
        reset = reset_peak()
        base = proc_status()
        if cand == "write":
            write_all(path, inputs)
        else:
            save = ALT_BY_KEY[cand].save
            assert save is not None
            save(inputs, path)
        end = proc_status()
        _remove(path)
        return {"peak_reset": reset, "extra_peak": end["VmHWM"] - (base["VmRSS"] if reset else base["VmHWM"])}
    params = workloads.make_params(spec)
    gc.collect()
    reset = reset_peak()
    base = proc_status()
    sd = ALT_BY_KEY[cand].load(path)
    loaded = proc_status()
    for k, v in sd.items():
        params[k].copy_(v)
    copied = proc_status()
    del sd
    gc.collect()
    end = proc_status()
    ref = base["VmRSS"] if reset else base["VmHWM"]

    def delta(s: Dict[str, int]) -> Dict[str, int]:
        return {k: s[k] - base[k] for k in ("VmRSS", "RssAnon", "RssFile")}

    return {"peak_reset": reset, "after_load": delta(loaded), "after_copy": delta(copied),
            "extra_peak": end["VmHWM"] - ref}


def measure_rss(b: Bench, args: argparse.Namespace) -> Dict[str, Any]:
    out: Dict[str, Any] = {"save": {}, "load+copy": {}}
    base_cfg = {"workload": b.name, "size_gib": args.size_gib, "small_count": args.small_count,
                "threads": args.threads}
    jobs = [("save", c) for c in b.candidates("save")] + [("load+copy", a.key) for a in b.alts]
    for kind, cand in jobs:
        if kind == "save":
            path = b.path("rss-save-" + cand)
        else:
            path = b.files[ALT_BY_KEY[cand].family]
        os.sync()
        cfg = dict(base_cfg, kind="save" if kind == "save" else "load", cand=cand, path=path)
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(cfg)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"rss child {kind} {cand} failed:\n{r.stderr}")
        out[kind][cand] = json.loads(r.stdout.strip().splitlines()[-1])
        log(f"[{b.name}] rss {kind} {cand}: extra peak {out[kind][cand]['extra_peak'] / MIB:.1f} MiB")
    return out


# ---- targets ----

TARGETS = [
    # figure, workload, op, ours, other, limit
    ("LLM save / torch.save", "llm", "save", "torch", 0.5),
    ("LLM save / one write() of the same bytes", "llm", "save", "write", 1.5),
    ("LLM load+copy / safetensors", "llm", "load+copy", "safetensors", 1.0),
    ("LLM load+copy / torch.load(mmap=True)", "llm", "load+copy", "torch-mmap", 1.0),
    ("LLM load+copy / memcpy of the same bytes", "llm", "load+copy", "memcpy", 1.5),
    ("LLM cold load+copy / safetensors", "llm", "cold load+copy", "safetensors", 1.0),
    ("20k small tensors: load / safetensors", "small", "load", "safetensors", 0.5),
    ("20k small tensors: save / safetensors", "small", "save", "safetensors", 0.5),
]


def evaluate(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    rows = []
    wl = report["workloads"]
    for fig, w, op, other, limit in TARGETS:
        row: Dict[str, Any] = {"figure": fig, "target": f"<= {limit}"}
        try:
            ours, alt = wl[w]["ops"][op]["ours"], wl[w]["ops"][op][other]
            row["value"] = ours["median"] / alt["median"]
            # the spread of the ratio: best and worst pairing of the repetitions
            row["range"] = [ours["min"] / alt["max"], ours["max"] / alt["min"]]
            row["met"] = row["value"] <= limit
            if w == "small" and op == "load":
                row["note"] = f"{ours['median'] / wl[w]['tensors'] * 1e6:.2f} us per tensor"
        except KeyError:
            row["met"] = None
        rows.append(row)
    for fig, key, limit, target in [
        ("save extra peak RSS / model bytes", "save", 0.10, "<= 0.10"),
        ("load extra RSS before any tensor is touched / model bytes", "load", 0.01, "~0 (<= 0.01)"),
    ]:
        row = {"figure": fig, "target": target}
        try:
            rss = wl["llm"]["rss"]
            v = rss["save"]["ours"]["extra_peak"] if key == "save" else rss["load+copy"]["ours"]["after_load"]["VmRSS"]
            row["value"] = v / wl["llm"]["bytes"]
            row["met"] = row["value"] <= limit
        except KeyError:
            row["met"] = None
        rows.append(row)
    if "streams" in report:
        rows += streams.targets(report["streams"])
    return rows


# ---- output ----


def fmt_s(x: float) -> str:
    if x >= 1:
        return f"{x:.3f} s"
    if x >= 1e-3:
        return f"{x * 1e3:.1f} ms"
    return f"{x * 1e6:.0f} us"


def table(report: Dict[str, Any]) -> str:
    lines = []
    for w, r in report["workloads"].items():
        lay = r.get("layout", {})
        extra = ""
        if lay:
            extra = (f"; offsets not multiple of 8: {lay['offsets_not_multiple_of_8']}, "
                     f"misaligned for their dtype: {lay['element_misaligned']}")
        lines.append(f"\n== {w}: {r['tensors']} tensors, {r['bytes'] / MIB:.1f} MiB{extra} ==")
        lines.append(f"{'operation':<15} {'alternative':<58} {'median':>10} {'min':>10} {'max':>10} {'ours/alt':>9}")
        for op, res in r["ops"].items():
            ours = res.get("ours", {}).get("median")
            for c, s in res.items():
                ratio = f"{ours / s['median']:.2f}" if ours and s["median"] > 0 else "-"
                lines.append(f"{op:<15} {LABELS[c]:<58} {fmt_s(s['median']):>10} {fmt_s(s['min']):>10} "
                             f"{fmt_s(s['max']):>10} {ratio:>9}")
        rss = r.get("rss")
        if rss:
            lines.append(f"{'extra RSS (fresh process), MiB':<74} {'save peak':>10} {'load':>10} "
                         f"{'l+c peak':>10} {'l+c anon':>10}")
            for c in list(dict.fromkeys(list(rss["save"]) + list(rss["load+copy"]))):
                sv = rss["save"].get(c)
                ld = rss["load+copy"].get(c)
                cells = [f"{sv['extra_peak'] / MIB:.1f}" if sv else "-",
                         f"{ld['after_load']['VmRSS'] / MIB:.1f}" if ld else "-",
                         f"{ld['extra_peak'] / MIB:.1f}" if ld else "-",
                         f"{ld['after_copy']['RssAnon'] / MIB:.1f}" if ld else "-"]
                lines.append(f"  {LABELS[c]:<72} {cells[0]:>10} {cells[1]:>10} {cells[2]:>10} {cells[3]:>10}")
    if "streams" in report:
        lines.append(streams.table(report["streams"]))
    lines.append("\n== targets (ours = torch.save(format='safetensors') / torch.load; medians) ==")
    lines.append(f"{'figure':<60} {'target':>13} {'measured':>9} {'rep. range':>14}  result")
    for t in report["targets"]:
        v = f"{t['value']:.3f}" if "value" in t else "-"
        rg = f"{t['range'][0]:.2f}-{t['range'][1]:.2f}" if "range" in t else ""
        res = {True: "met", False: "NOT MET", None: "not run"}[t["met"]]
        note = f"  ({t['note']})" if "note" in t else ""
        lines.append(f"{t['figure']:<60} {t['target']:>13} {v:>9} {rg:>14}  {res}{note}")
    return "\n".join(lines)


COLORS = {"ours": "#1f5fbf", "ours-api": "#6fa0e6", "torch": "#e07b00", "torch-mmap": "#f0a640",
          "torch-unsafe": "#f5c98a", "safetensors": "#2e9e4f", "write": "#888888", "memcpy": "#888888",
          "read": "#888888"}


def plot(report: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wls = list(report["workloads"])
    cols = OPS + ["extra peak RSS"]
    rows = len(wls) + (1 if "streams" in report else 0)
    fig, axes = plt.subplots(rows, len(cols), figsize=(4.2 * len(cols), 2.9 * rows), squeeze=False)
    if "streams" in report:
        streams.plot(report["streams"], axes[len(wls)], COLORS)
    for i, w in enumerate(wls):
        r = report["workloads"][w]
        for j, op in enumerate(cols):
            ax = axes[i][j]
            if op == "extra peak RSS":
                rss = r.get("rss")
                if not rss:
                    ax.axis("off")
                    continue
                names = list(dict.fromkeys(list(rss["save"]) + list(rss["load+copy"])))
                y = list(range(len(names)))
                sv = [rss["save"][c]["extra_peak"] / MIB if c in rss["save"] else 0 for c in names]
                lc = [rss["load+copy"].get(c) for c in names]
                peak = [r_["extra_peak"] / MIB if r_ else 0 for r_ in lc]
                anon = [r_["after_copy"]["RssAnon"] / MIB if r_ else 0 for r_ in lc]
                colors = [COLORS[c] for c in names]
                ax.barh([k - 0.2 for k in y], sv, height=0.4, color="#999999")
                ax.barh([k + 0.2 for k in y], peak, height=0.4, color=colors, alpha=0.35)
                ax.barh([k + 0.2 for k in y], anon, height=0.4, color=colors)
                ax.set_yticks(y, names, fontsize=7)
                ax.invert_yaxis()
                ax.set_xlabel("MiB. grey: save peak; colour: load+copy anon,\n"
                              "pale: its peak incl. mapped page cache", fontsize=7)
                ax.set_title(f"{w}: extra peak RSS", fontsize=9)
                continue
            res = r["ops"].get(op)
            if not res:
                ax.axis("off")
                continue
            names = list(res)
            med = [res[c]["median"] for c in names]
            err = [[res[c]["median"] - res[c]["min"] for c in names], [res[c]["max"] - res[c]["median"] for c in names]]
            ax.barh(range(len(names)), med, xerr=err, color=[COLORS[c] for c in names], capsize=2)
            for k, c in enumerate(names):
                ax.text(res[c]["max"], k, " " + fmt_s(res[c]["median"]), va="center", fontsize=6)
            ax.set_yticks(range(len(names)), names, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlim(0, max(res[c]["max"] for c in names) * 1.35)
            ax.set_xlabel("seconds (median; bars: min-max)", fontsize=7)
            ax.set_title(f"{w}: {op}", fontsize=9)
            ax.tick_params(axis="x", labelsize=7)
    env = report["env"]
    cfg = report["config"]
    fig.suptitle(f"torch_safetensors benchmark ({'quick' if cfg['quick'] else 'full'} run: LLM {cfg['size_gib']:g} GiB, "
                 f"{cfg['small_count']} small tensors): torch {env['torch']}, safetensors {env['safetensors']}, "
                 f"{env['cpus']} CPUs, {cfg['threads']} torch thread(s), median of {cfg['repeat']}, bars min-max",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment() -> Dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", HERE, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.split("\n")
    except OSError:
        commit, dirty = "", []
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__,
        "safetensors": safetensors.__version__, "torch_safetensors_commit": commit,
        "modified_tracked_files": [d.strip() for d in dirty if d.strip()],
        "kernel": platform.release(), "cpu": cpu, "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "loadavg_start": os.getloadavg(),
        "zero_copy": ts._core.zero_copy() if hasattr(ts, "_core") else None,
    }


# ---- main ----


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes and 3 repetitions")
    ap.add_argument("--size-gib", type=float, help="LLM size (mixed: a quarter of it); default 1.0, quick 1/16")
    ap.add_argument("--small-count", type=int, help="number of small tensors; default 20000, quick 2000")
    ap.add_argument("--repeat", type=int, help="timed repetitions per alternative; default 5, quick 3")
    ap.add_argument("--workloads", default="llm,small,mixed,mixed-misaligned",
                    help="comma list of llm, small, mixed, mixed-misaligned")
    ap.add_argument("--alts", default=",".join(a.key for a in ALTS),
                    help="comma list of alternatives (ours is always run)")
    ap.add_argument("--ops", default=",".join(OPS), help="comma list of " + ", ".join(OPS))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: see README, 'threads')")
    ap.add_argument("--no-rss", action="store_true", help="skip the fresh-process memory runs")
    ap.add_argument("--streams-gib", type=float,
                    help="model size for the file-object and async_save runs; default 0.5, quick 1/16")
    ap.add_argument("--no-streams", action="store_true", help="skip the file-object and async_save runs")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="output directory")
    ap.add_argument("--workdir", help="where the benchmark files go (default: a temporary directory)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--from-json", metavar="PATH", help="only print the table and redraw the chart of a results.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            report = json.load(f)
        print(table(report))
        if not args.no_plot:
            plot(report, os.path.join(os.path.dirname(os.path.abspath(args.from_json)), "results.png"))
        return
    if args.child:
        cfg = json.loads(args.child)
        torch.set_num_threads(cfg["threads"])
        print(json.dumps(child(cfg)))
        return
    torch.set_num_threads(args.threads)
    args.size_gib = args.size_gib or (1 / 16 if args.quick else 1.0)
    args.small_count = args.small_count or (2000 if args.quick else 20000)
    args.repeat = args.repeat or (3 if args.quick else 5)
    args.streams_gib = args.streams_gib or (1 / 16 if args.quick else 0.5)
    keys = ["ours"] + [k for k in args.alts.split(",") if k and k != "ours"]
    unknown = [k for k in keys if k not in ALT_BY_KEY]
    if unknown:
        ap.error(f"unknown alternatives {unknown}; choose from {list(ALT_BY_KEY)}")
    alts = [ALT_BY_KEY[k] for k in keys]
    ops = [o for o in OPS if o in args.ops.split(",")]
    os.makedirs(args.out, exist_ok=True)
    workdir = args.workdir or tempfile.mkdtemp(prefix="tsbench-")
    os.makedirs(workdir, exist_ok=True)

    t_start = time.perf_counter()
    report: Dict[str, Any] = {
        "env": environment(),
        "config": {"quick": args.quick, "size_gib": args.size_gib, "small_count": args.small_count,
                   "repeat": args.repeat, "threads": args.threads, "alternatives": keys, "ops": ops, "command": sys.argv,
                   "streams_gib": None if args.no_streams else args.streams_gib,
                   "workdir": workdir},
        "method": METHOD,
        "labels": LABELS,
        "workloads": {},
    }
    try:
        for w in args.workloads.split(","):
            spec = workloads.build(w, args.size_gib, args.small_count)
            b = Bench(w, spec, workdir, alts)
            try:
                r: Dict[str, Any] = {"tensors": len(spec), "bytes": b.nbytes, "layout": b.layout}
                r["ops"] = bench_workload(b, ops, args.repeat)
                r["checks"] = b.checks
                r["cold_max_resident_fraction_after_evict"] = max(b.cold_residue, default=None)
                if not args.no_rss:
                    r["rss"] = measure_rss(b, args)
                report["workloads"][w] = r
            finally:
                b.cleanup()
                del b
                gc.collect()
        if not args.no_streams:
            report["streams"] = streams.run(args.streams_gib, args.repeat, workdir, log)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report["targets"] = evaluate(report)
    report["env"]["loadavg_end"] = os.getloadavg()
    report["wall_seconds"] = time.perf_counter() - t_start
    text = table(report)
    print(text)
    print(f"\nwall time {report['wall_seconds']:.0f} s; load average {report['env']['loadavg_start']} -> "
          f"{report['env']['loadavg_end']}")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "results.txt"), "w") as f:
        f.write(text + "\n")
    if not args.no_plot:
        try:
            plot(report, os.path.join(args.out, "results.png"))
        except ImportError:
            log("matplotlib is not installed (pip install matplotlib): no chart")
    log(f"wrote {args.out}/results.json, results.txt" + ("" if args.no_plot else ", results.png"))


METHOD = {
    "timing": "time.perf_counter around the operation only; median of --repeat runs per alternative, "
              "after one untimed warm-up run that is also the verification run",
    "order": "all alternatives of an operation run in each repetition; the order rotates by one "
             "each repetition and is reversed on odd repetitions",
    "before each timed run (untimed)": "gc.collect(); os.sync() so no earlier dirty pages are being "
                                       "written back; for save: the target is deleted, then os.sync() again",
    "save": "to a path that does not exist (deleted before, the same way for every alternative); the "
            "clock stops when the call returns (data in the page cache, no fsync, for all)",
    "load": "until the dict is returned (lazy loaders have read nothing yet); released untimed",
    "load+copy": "load, copy_ every tensor into a preallocated, already touched tensor of the same "
                 "shape (what load_state_dict does), release the loaded dict: all timed; file warm",
    "cold load+copy": "the same after os.fsync + posix_fadvise(DONTNEED) on the file (residency "
                      "checked with mincore, see cold_max_resident_fraction_after_evict)",
    "threads": "torch.set_num_threads(--threads, default 1) in every process: on this shared "
               "2-core VM, 2-thread copy_ calls wait on OpenMP barriers whenever the other core is "
               "busy (measured: 800 copies of 16 MiB in total took 1.4 s instead of 0.01 s)",
    "limits": "write: os.write of one preallocated buffer of the data's size to a new file; memcpy: "
              "torch copy_ between two preallocated uint8 tensors of that size (torch's threads); "
              "read: readv of an evicted file of that size into a preallocated buffer",
    "rss": "each in a fresh process: inputs built first (tensors for save, preallocated parameters "
           "for load), then VmHWM reset with /proc/self/clear_refs=5; extra peak = VmHWM after - "
           "VmRSS before. File pages mapped by mmap loaders count in RSS (RssFile) though they are "
           "shared page cache; after_load/after_copy break RSS into RssAnon and RssFile",
    "streams": "benchmarks/streams.py: the llm workload at --streams-gib; extra peak RSS of saves to "
               "and loads from file objects, each in a fresh process (a BytesIO's own bytes not "
               "counted); seconds until save calls return and, for async ones, until the file "
               "is written: one warm-up round, then --repeat rounds in rotating order",
    "verification": "every loader's result and every saver's file (read back) equal the originals "
                    "(names, dtypes, shapes, torch.equal); safetensors-format files are also read by "
                    "the other safetensors implementation",
}


if __name__ == "__main__":
    main()
