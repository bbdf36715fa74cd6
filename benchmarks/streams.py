"""File objects and async_save, measured side by side (issue 13): extra peak memory of
saves to and loads from streams, each in a fresh process, and the stall of async_save
against a synchronous save, DCP async_save and the other ways to save.

Called by run.py (``--streams-gib``, ``--no-streams``); ``python benchmarks/streams.py``
runs it alone. See benchmarks/README.md, "Streams and async_save".
"""
from __future__ import annotations

import gc
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

_MARK = "__torch_safetensors_original__"
TORCH_SAVE = getattr(torch.save, _MARK, torch.save)
TORCH_LOAD = getattr(torch.load, _MARK, torch.load)

import safetensors.torch as st  # noqa: E402

import torch_safetensors as ts  # noqa: E402
import workloads  # noqa: E402

MIB = 1 << 20

# ---- the streams ----


class CountingRaw(io.RawIOBase):
    """A raw stream without fileno() that drops what it is given (a socket, an archive)."""

    def __init__(self) -> None:
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        n = memoryview(b).nbytes
        self.n += n
        return n


class NoFd(io.RawIOBase):
    """A seekable raw reader over a file that hides its descriptor."""

    def __init__(self, f: Any) -> None:
        self.f = f

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, *a: Any) -> int:
        return self.f.seek(*a)

    def tell(self) -> int:
        return self.f.tell()

    def readinto(self, b: Any) -> int:
        return self.f.readinto(b)


SAVERS: Dict[str, Callable[[Dict[str, torch.Tensor], Any], None]] = {
    "ours": lambda sd, f: torch.save(sd, f, format="safetensors"),
    "torch": lambda sd, f: TORCH_SAVE(sd, f),
    "safetensors": lambda sd, f: f.write(st.save(sd)),
}
LOADERS: Dict[str, Callable[[Any], Dict[str, torch.Tensor]]] = {
    "ours": lambda f: torch.load(f),
    "torch": lambda f: TORCH_LOAD(f),
    "safetensors": lambda f: st.load(f.read()),
}
SAVE_TARGETS = ["open file", "BufferedWriter(raw, no fileno)", "BytesIO"]
LOAD_SOURCES = ["BytesIO", "BufferedReader(raw, no fileno)", "pipe (not seekable)"]


def _status() -> Dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """One measurement in a fresh process: extra peak RSS over the model's bytes."""
    spec = workloads.build("llm", cfg["size_gib"], 0)
    n = workloads.nbytes(spec)
    kind, cand, where, path = cfg["kind"], cfg["cand"], cfg["where"], cfg["path"]
    if kind == "save":
        sd = workloads.make_tensors(spec)
        gc.collect()
        os.sync()
        _reset_peak()
        base = _status()["VmRSS"]
        own = 0
        if where == "open file":
            with open(path, "wb") as f:
                SAVERS[cand](sd, f)
        elif where == "BytesIO":
            out = io.BytesIO()
            SAVERS[cand](sd, out)
            own = len(out.getbuffer())  # the BytesIO holds the file: not counted
        else:
            with io.BufferedWriter(CountingRaw()) as f:
                SAVERS[cand](sd, f)
        return {"extra_peak": _status()["VmHWM"] - base - own, "model": n}
    if kind == "async":
        sd = workloads.make_tensors(spec)
        gc.collect()
        os.sync()
        _reset_peak()
        base = _status()["VmRSS"]
        if cand == "ours":
            for _ in range(2):
                ts.async_save(sd, path).result()
        else:
            import torch.distributed.checkpoint as dcp

            for _ in range(2):
                shutil.rmtree(path, ignore_errors=True)
                dcp.async_save(sd, checkpoint_id=path, no_dist=True).result()
        return {"extra_peak": _status()["VmHWM"] - base, "model": n}
    # load: the source file was written by the parent in the candidate's format
    if where == "BytesIO":
        with open(path, "rb") as f:
            src: Any = io.BytesIO(f.read())
        gc.collect()
        _reset_peak()
        base = _status()["VmRSS"]
        sd = LOADERS[cand](src)
    elif where == "pipe (not seekable)":
        r, w = os.pipe()

        def feed() -> None:
            with open(path, "rb") as s, os.fdopen(w, "wb") as d:
                while True:
                    b = s.read(1 << 20)
                    if not b:
                        break
                    d.write(b)

        _reset_peak()
        base = _status()["VmRSS"]
        th = threading.Thread(target=feed)
        th.start()
        with os.fdopen(r, "rb") as f:
            sd = LOADERS[cand](f)
        th.join()
    else:
        _reset_peak()
        base = _status()["VmRSS"]
        with open(path, "rb", buffering=0) as raw:
            sd = LOADERS[cand](io.BufferedReader(NoFd(raw)))
    got = sum(t.numel() * t.element_size() for t in sd.values())
    return {"extra_peak": _status()["VmHWM"] - base, "model": n, "loaded": got}


def _run_child(cfg: Dict[str, Any]) -> Dict[str, Any]:
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(cfg)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def memory(size_gib: float, workdir: str, log: Callable[[str], None]) -> Dict[str, Any]:
    out: Dict[str, Any] = {"save": {}, "load": {}, "async": {}}
    for where in SAVE_TARGETS:
        for cand in SAVERS:
            cfg = {"kind": "save", "cand": cand, "where": where, "size_gib": size_gib,
                   "path": os.path.join(workdir, "stream-save")}
            out["save"].setdefault(where, {})[cand] = r = _run_child(cfg)
            log(f"[streams] save to {where}, {cand}: {_frac(r)}")
    sd = workloads.make_tensors(workloads.build("llm", size_gib, 0))
    files = {}
    for cand in LOADERS:
        files[cand] = os.path.join(workdir, f"stream-load-{cand}")
        with open(files[cand], "wb") as f:
            SAVERS[cand](sd, f)
    del sd
    for where in LOAD_SOURCES:
        for cand in LOADERS:
            if cand == "torch" and where.startswith("pipe"):
                out["load"].setdefault(where, {})[cand] = {"error": "torch.load needs a seekable file"}
                continue
            cfg = {"kind": "load", "cand": cand, "where": where, "size_gib": size_gib, "path": files[cand]}
            out["load"].setdefault(where, {})[cand] = r = _run_child(cfg)
            log(f"[streams] load from {where}, {cand}: {_frac(r)}")
    for cand in ("ours", "dcp"):
        cfg = {"kind": "async", "cand": cand, "where": "path", "size_gib": size_gib,
               "path": os.path.join(workdir, "stream-async" + (".safetensors" if cand == "ours" else ""))}
        out["async"][cand] = r = _run_child(cfg)
        log(f"[streams] async_save memory, {cand}: {_frac(r)}")
    for f in files.values():
        os.unlink(f)
    return out


def _frac(r: Dict[str, Any]) -> str:
    return r["error"] if "error" in r else f"{r['extra_peak'] / r['model']:.3f} x model"


# ---- the async stall ----


def stall(size_gib: float, repeat: int, workdir: str, log: Callable[[str], None]) -> Dict[str, Any]:
    """Seconds until each call returns (and until the data is written, for async ones)."""
    import torch.distributed.checkpoint as dcp

    sd = workloads.make_tensors(workloads.build("llm", size_gib, 0))
    path = os.path.join(workdir, "stall.safetensors")
    dcp_dir = os.path.join(workdir, "stall-dcp")
    fobj = os.path.join(workdir, "stall-fobj")

    def sync_ours() -> Dict[str, float]:
        t0 = time.perf_counter()
        torch.save(sd, path, format="safetensors")
        return {"return": time.perf_counter() - t0}

    def async_ours() -> Dict[str, float]:
        t0 = time.perf_counter()
        fut = ts.async_save(sd, path)
        t1 = time.perf_counter()
        fut.result()
        return {"return": t1 - t0, "done": time.perf_counter() - t0}

    def async_dcp() -> Dict[str, float]:
        shutil.rmtree(dcp_dir, ignore_errors=True)
        os.sync()
        t0 = time.perf_counter()
        fut = dcp.async_save(sd, checkpoint_id=dcp_dir, no_dist=True)
        t1 = time.perf_counter()
        fut.result()
        return {"return": t1 - t0, "done": time.perf_counter() - t0}

    def torch_fobj() -> Dict[str, float]:
        t0 = time.perf_counter()
        with open(fobj, "wb") as f:
            TORCH_SAVE(sd, f)
        return {"return": time.perf_counter() - t0}

    def st_fobj() -> Dict[str, float]:
        t0 = time.perf_counter()
        with open(fobj, "wb") as f:
            f.write(st.save(sd))
        return {"return": time.perf_counter() - t0}

    def ours_fobj() -> Dict[str, float]:
        t0 = time.perf_counter()
        with open(fobj, "wb") as f:
            torch.save(sd, f, format="safetensors")
        return {"return": time.perf_counter() - t0}

    def write_limit() -> Dict[str, float]:
        buf = memoryview(torch.ones(workloads.nbytes(workloads.build("llm", size_gib, 0)),
                                    dtype=torch.uint8).numpy())
        t0 = time.perf_counter()
        fd = os.open(fobj, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            off = 0
            while off < len(buf):
                off += os.write(fd, buf[off:])
        finally:
            os.close(fd)
        return {"return": time.perf_counter() - t0}

    cands: Dict[str, Callable[[], Dict[str, float]]] = {
        "ours sync (path)": sync_ours,
        "ours async_save (path)": async_ours,
        "DCP async_save (one process)": async_dcp,
        "ours torch.save into open file": ours_fobj,
        "torch.save into open file": torch_fobj,
        "safetensors save + f.write": st_fobj,
        "one write() of the same bytes": write_limit,
    }
    samples: Dict[str, Dict[str, List[float]]] = {c: {} for c in cands}
    names = list(cands)
    for rep in range(repeat + 1):  # the first round is a warm-up (fills the snapshot pool)
        order = names[rep % len(names):] + names[:rep % len(names)]
        for c in order:
            for p in (path, fobj):
                if os.path.exists(p):
                    os.unlink(p)
            gc.collect()
            os.sync()
            r = cands[c]()
            if rep:
                for k, v in r.items():
                    samples[c].setdefault(k, []).append(v)
        if rep:
            log(f"[streams] stall rep {rep}/{repeat}: " +
                " ".join(f"{c.split(' (')[0]}={samples[c]['return'][-1]:.3f}" for c in names))
    shutil.rmtree(dcp_dir, ignore_errors=True)
    for p in (path, fobj):
        if os.path.exists(p):
            os.unlink(p)
    ts.release_async_buffers()
    return {c: {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "samples": v}
                for k, v in s.items()} for c, s in samples.items()}


def run(size_gib: float, repeat: int, workdir: str, log: Callable[[str], None]) -> Dict[str, Any]:
    spec = workloads.build("llm", size_gib, 0)
    return {"bytes": workloads.nbytes(spec), "tensors": len(spec), "size_gib": size_gib,
            "memory": memory(size_gib, workdir, log), "stall": stall(size_gib, repeat, workdir, log)}


def targets(r: Dict[str, Any]) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    mem = r["memory"]

    def frac(x: Dict[str, Any]) -> float:
        return x["extra_peak"] / x["model"]

    for where in SAVE_TARGETS:
        row: Dict[str, Any] = {"figure": f"save to {where}: extra peak / model", "target": "<= 0.1"}
        x = mem["save"].get(where, {}).get("ours", {})
        if "extra_peak" in x:
            row["value"] = frac(x)
            row["met"] = row["value"] <= 0.1
        else:
            row["met"] = None
        rows.append(row)
    for where in LOAD_SOURCES:
        row = {"figure": f"load from {where}: extra peak / model", "target": "<= 1.1"}
        x = mem["load"].get(where, {}).get("ours", {})
        if "extra_peak" in x:
            row["value"] = frac(x)
            row["met"] = row["value"] <= 1.1
        else:
            row["met"] = None
        rows.append(row)
    x = mem["async"].get("ours", {})
    row = {"figure": "async_save: extra peak / model", "target": "<= 1.1"}
    if "extra_peak" in x:
        row["value"] = frac(x)
        row["met"] = row["value"] <= 1.1
    else:
        row["met"] = None
    rows.append(row)
    s = r["stall"]
    a, b = s["ours async_save (path)"]["return"], s["ours sync (path)"]["return"]
    rows.append({"figure": "async_save stall / synchronous save", "target": "<= 0.25",
                 "value": a["median"] / b["median"], "range": [a["min"] / b["max"], a["max"] / b["min"]],
                 "met": a["median"] / b["median"] <= 0.25})
    return rows


def table(r: Dict[str, Any]) -> str:
    lines = [f"\n== streams and async_save: llm {r['bytes'] / MIB:.0f} MiB, {r['tensors']} tensors ==",
             "extra peak RSS / model bytes (fresh process each; a BytesIO's own bytes not counted)"]
    cands = list(SAVERS)
    lines.append(f"  {'save to':<40}" + "".join(f"{c:>14}" for c in cands))
    for where, res in r["memory"]["save"].items():
        lines.append(f"  {where:<40}" + "".join(f"{_cell(res.get(c)):>14}" for c in cands))
    lines.append(f"  {'load from':<40}" + "".join(f"{c:>14}" for c in cands))
    for where, res in r["memory"]["load"].items():
        lines.append(f"  {where:<40}" + "".join(f"{_cell(res.get(c)):>14}" for c in cands))
    lines.append(f"  {'async save (2 calls)':<40}" + "".join(
        f"{_cell(r['memory']['async'].get(c)):>14}" for c in ("ours", "dcp")) + "   (ours, DCP)")
    lines.append("seconds until the call returns (async: and until the file is written), median [min-max]")
    sync = r["stall"]["ours sync (path)"]["return"]["median"]
    for c, res in r["stall"].items():
        ret = res["return"]
        done = res.get("done")
        extra = f"   written after {done['median']:.3f}" if done else ""
        lines.append(f"  {c:<40} {ret['median']:8.3f} [{ret['min']:.3f}-{ret['max']:.3f}]"
                     f"  {ret['median'] / sync:6.2f} x sync{extra}")
    return "\n".join(lines)


def plot(r: Dict[str, Any], axes: Any, colors: Dict[str, str]) -> None:
    """One row of the chart: the stall, then extra memory of stream saves, loads, async."""
    ax = axes[0]
    names = list(r["stall"])
    med = [r["stall"][c]["return"]["median"] for c in names]
    done = [r["stall"][c].get("done", {}).get("median", 0) for c in names]
    ax.barh(range(len(names)), done, color="#bbbbbb")
    ax.barh(range(len(names)), med, color=["#1f5fbf" if c.startswith("ours") else "#888888" for c in names])
    for k, c in enumerate(names):
        ax.text(max(med[k], done[k]), k, f" {med[k] * 1e3:.0f} ms", va="center", fontsize=6)
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlim(0, max(med + done) * 1.35)
    ax.set_xlabel("s until the call returns (grey: until written)", fontsize=7)
    ax.set_title(f"streams {r['bytes'] / MIB:.0f} MiB: save stall", fontsize=9)
    cands = list(SAVERS)
    for ax, key, title in ((axes[1], "save", "save to a file object"),
                           (axes[2], "load", "load from a file object")):
        groups = list(r["memory"][key])
        for j, c in enumerate(cands):
            vals = [_val(r["memory"][key][g].get(c)) for g in groups]
            ax.barh([k + (j - 1) * 0.27 for k in range(len(groups))], vals, height=0.27,
                    color=colors.get(c, "#888888"), label=c)
        ax.set_yticks(range(len(groups)), groups, fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("extra peak RSS / model bytes", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)
    ax = axes[3]
    a = r["memory"]["async"]
    ax.barh([0, 1], [_val(a.get("ours")), _val(a.get("dcp"))], color=["#1f5fbf", "#888888"])
    ax.set_yticks([0, 1], ["ours async_save", "DCP async_save"], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("extra peak RSS / model bytes", fontsize=7)
    ax.set_title("async save: memory", fontsize=9)
    for ax in axes[4:]:
        ax.axis("off")


def _val(x: Any) -> float:
    return x["extra_peak"] / x["model"] if x and "extra_peak" in x else 0.0


def _cell(x: Any) -> str:
    if not x:
        return "-"
    if "error" in x:
        return "n/a"
    return f"{x['extra_peak'] / x['model']:.3f}"


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        torch.set_num_threads(1)
        print(json.dumps(child(json.loads(sys.argv[2]))))
    else:
        import argparse

        ap = argparse.ArgumentParser(description=__doc__)
        ap.add_argument("--size-gib", type=float, default=0.5)
        ap.add_argument("--repeat", type=int, default=5)
        ap.add_argument("--threads", type=int, default=1)
        a = ap.parse_args()
        torch.set_num_threads(a.threads)
        wd = tempfile.mkdtemp(prefix="tsbench-streams-")
        try:
            res = run(a.size_gib, a.repeat, wd, lambda m: print(m, file=sys.stderr, flush=True))
        finally:
            shutil.rmtree(wd, ignore_errors=True)
        print(table(res))
        for t in targets(res):
            v = f"{t['value']:.3f}" if "value" in t else "-"
            print(f"{t['figure']:<60} {t['target']:>8} {v:>8}  {'met' if t['met'] else 'NOT MET' if t['met'] is False else 'not run'}")
