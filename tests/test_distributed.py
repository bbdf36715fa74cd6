"""torch.distributed.checkpoint storage: real 2-rank gloo processes on CPU, and the
single-process paths (resharding to one process, the index, values, pickle refusal).

The ranks are this file run as a script (``python test_distributed.py SCENARIO DIR``)
by subprocess, with a free localhost port, a process-group timeout and a wall-clock
limit, so a failure never hangs the suite.
"""
from __future__ import annotations

import datetime
import json
import os
import pickle
import socket
import subprocess
import sys
from typing import Any, Dict, List, Tuple

import torch

import torch_safetensors  # noqa: F401  (torch.load speaks safetensors)
from torch_safetensors.distributed import SafetensorsReader, SafetensorsWriter

WORLD = 2
WALL_LIMIT = 100  # seconds for one group of ranks, then they are killed
PG_TIMEOUT = 45  # seconds: a collective waiting on a dead peer gives up
MAX_SHARD = 150  # bytes: the consolidated output gets several shards

SHARDED = ("layer.weight", "layer.bias16", "emb")  # Shard(0) on save, Shard(1) on load


def full_state() -> Dict[str, torch.Tensor]:
    """The global tensors every scenario saves (the same on every process)."""
    g = torch.Generator().manual_seed(1234)
    return {
        "layer.weight": torch.randn(8, 6, generator=g),
        "layer.bias16": torch.randn(6, 4, generator=g).to(torch.bfloat16),
        "emb": torch.randn(7, 4, generator=g),  # uneven: 4 + 3 rows
        "rep": torch.randn(5, generator=g),  # a replicated DTensor
        "plain": torch.randn(3, 3, generator=g).to(torch.bfloat16),  # a plain tensor on every rank
    }


VALUES: Dict[str, Any] = {"step": 11, "cfg": {"lr": 0.5, "betas": [0.9, 0.99], "name": "adam"}}


# ---- the ranks (run as a script) ----


def _rank_state(mesh: Any, placement_dim: int) -> Dict[str, Any]:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    full = full_state()
    state: Dict[str, Any] = {}
    for name, t in full.items():
        if name in SHARDED:
            state[name] = distribute_tensor(t, mesh, [Shard(placement_dim)])
        elif name == "rep":
            state[name] = distribute_tensor(t, mesh, [Replicate()])
        else:
            state[name] = t.clone()
    state.update(json.loads(json.dumps(VALUES)))
    return state


def _zeros_like_state(state: Dict[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for name, v in state.items():
        if isinstance(v, torch.Tensor):
            out[name] = torch.zeros_like(v)
        else:
            out[name] = None
    out["cfg"] = {"lr": 0.0, "betas": [], "name": ""}
    out["step"] = 0
    return out


class _DieAfterWriting(SafetensorsWriter):
    """Rank 1 writes its shard, then dies before reporting back."""

    def write_data(self, plan: Any, planner: Any) -> Any:
        fut = super().write_data(plan, planner)
        if self.rank == 1:
            sys.stdout.flush()
            os._exit(17)
        return fut


def _worker(scenario: str, directory: str) -> int:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT))
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        state = _rank_state(mesh, 0)
        if scenario == "killed":
            try:
                dcp.save(state, storage_writer=_DieAfterWriting(directory))
            except Exception as e:  # noqa: BLE001 - the expected outcome on rank 0
                print(f"rank {rank}: save failed: {type(e).__name__}", flush=True)
                return 3
            return 0
        dcp.save(state, storage_writer=SafetensorsWriter(directory, consolidate=True, max_shard_size=MAX_SHARD))

        # load back with another placement: dim 1 instead of dim 0
        target = _zeros_like_state(_rank_state(mesh, 1))
        dcp.load(target, storage_reader=SafetensorsReader(directory))
        full = full_state()
        for name in full:
            got = target[name]
            if name in SHARDED:
                assert got.placements[0].dim == 1, got.placements
                got = got.full_tensor()
            elif name == "rep":
                got = got.full_tensor()
            assert got.dtype == full[name].dtype, (name, got.dtype)
            assert torch.equal(got, full[name]), name
        assert target["step"] == VALUES["step"], target["step"]
        assert target["cfg"] == VALUES["cfg"], target["cfg"]
        dist.barrier()
        return 0
    finally:
        dist.destroy_process_group()


# ---- spawning ----


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(scenario: str, directory: str) -> List[Tuple[int, str]]:
    """Runs WORLD ranks of a scenario; returns (exit code, output) per rank."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    procs = [
        subprocess.Popen([sys.executable, os.path.abspath(__file__), scenario, directory],
                         env=dict(env, RANK=str(r)), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for r in range(WORLD)
    ]
    out: List[Tuple[int, str]] = []
    try:
        for p in procs:
            text, _ = p.communicate(timeout=WALL_LIMIT)
            out.append((p.returncode, text))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], sys.argv[2]))


# ---- tests ----

import pytest  # noqa: E402  (not needed by the ranks)
import torch.distributed.checkpoint as dcp  # noqa: E402

from torch_safetensors.distributed import INDEX_NAME, SHARD_DIR  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    """A checkpoint saved by 2 ranks (and loaded back by them with another placement)."""
    directory = str(tmp_path_factory.mktemp("dcp2"))
    results = run_ranks("save_load", directory)
    for rank, (code, text) in enumerate(results):
        assert code == 0, f"rank {rank} exited with {code}:\n{text}"
    return directory


def _single_process_target() -> Dict[str, Any]:
    target: Dict[str, Any] = {k: torch.zeros_like(v) for k, v in full_state().items()}
    target["step"] = 0
    target["cfg"] = {"lr": 0.0, "betas": [], "name": ""}
    return target


def test_two_ranks_save_and_load_resharded(saved):
    # the ranks asserted their dim-1 shards against the originals; the index is last
    assert os.path.isfile(os.path.join(saved, INDEX_NAME))
    shards = sorted(os.listdir(os.path.join(saved, SHARD_DIR)))
    assert len(shards) == WORLD and all(s.endswith(".safetensors") for s in shards), shards


def test_one_process_loads_two_rank_save(saved):
    target = _single_process_target()
    dcp.load(target, storage_reader=SafetensorsReader(saved), no_dist=True)
    for name, t in full_state().items():
        assert target[name].dtype == t.dtype
        assert torch.equal(target[name], t), name
    assert target["step"] == 11 and target["cfg"] == VALUES["cfg"]


def test_replicated_tensors_written_once(saved):
    index = json.loads(open(os.path.join(saved, INDEX_NAME), encoding="utf-8").read())
    held: Dict[str, int] = {}
    for rel in index["files"]:
        with torch_safetensors.safe_open(os.path.join(saved, rel), framework="pt") as f:
            for key in f.keys():
                held[key] = held.get(key, 0) + 1
    assert held["rep"] == 1 and held["plain"] == 1 and held["step"] == 1, held
    assert len(index["tensors"]["rep"]["chunks"]) == 1
    assert [c["sizes"] for c in index["tensors"]["emb"]["chunks"]] == [[4, 4], [3, 4]]
    assert index["tensors"]["layer.bias16"]["dtype"] == "bfloat16"


def test_index_is_json_not_pickle(saved):
    raw = open(os.path.join(saved, INDEX_NAME), "rb").read()
    assert raw.startswith(b"{")
    json.loads(raw)
    with pytest.raises(Exception):
        pickle.loads(raw)


def _consolidated(saved: str) -> Dict[str, str]:
    index = os.path.join(saved, "model.safetensors.index.json")
    weight_map = json.loads(open(index, encoding="utf-8").read())["weight_map"]
    assert sorted(weight_map) == sorted(full_state())
    assert len(set(weight_map.values())) > 1  # really sharded
    return weight_map


def test_consolidated_read_by_torch_load(saved):
    weight_map = _consolidated(saved)
    got: Dict[str, torch.Tensor] = {}
    for file in sorted(set(weight_map.values())):
        got.update(torch.load(os.path.join(saved, file)))
    for name, t in full_state().items():
        assert torch.equal(got[name], t), name
    whole = torch.load(saved)  # the directory: the Hugging Face checkpoint in it
    assert sorted(whole) == sorted(full_state())


def test_consolidated_read_by_safetensors_package(saved):
    st = pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    weight_map = _consolidated(saved)
    for file in sorted(set(weight_map.values())):
        path = os.path.join(saved, file)
        loaded = load_file(path)
        with st.safe_open(path, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                assert torch.equal(f.get_tensor(name), full_state()[name])
        for name, t in loaded.items():
            assert weight_map[name] == file
            assert torch.equal(t, full_state()[name]), name


def test_killed_rank_leaves_no_index(tmp_path):
    directory = str(tmp_path / "killed")
    results = run_ranks("killed", directory)
    assert results[1][0] == 17, results[1]
    assert results[0][0] == 3, results[0]  # rank 0 saw the failure and did not finish
    assert not os.path.exists(os.path.join(directory, INDEX_NAME))
    with pytest.raises(FileNotFoundError, match="index dcp-index.json is missing"):
        SafetensorsReader(directory).read_metadata()
    _fails("dcp-index.json is missing", dcp.load, _single_process_target(),
           storage_reader=SafetensorsReader(directory), no_dist=True)


# ---- single process ----


def _save(directory: str, state: Dict[str, Any], **kwargs: Any) -> None:
    dcp.save(state, storage_writer=SafetensorsWriter(directory, **kwargs), no_dist=True)


def _fails(fragment: str, fn: Any, *args: Any, **kwargs: Any) -> None:
    """fn raises, directly or as DCP's CheckpointException, with fragment in the cause."""
    with pytest.raises((Exception, dcp.api.CheckpointException)) as info:  # the latter is a BaseException
        fn(*args, **kwargs)
    assert fragment in str(info.value), str(info.value)


class _Opaque:
    """A value that only pickle can store."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Opaque)


def test_pickle_only_values_refused_by_default(tmp_path):
    _fails("obj: this value cannot be stored without pickle", _save, str(tmp_path),
           {"w": torch.ones(2), "obj": _Opaque()})
    assert not os.path.exists(tmp_path / INDEX_NAME)


def test_pickled_values_need_allow_pickle_to_load(tmp_path):
    _save(str(tmp_path), {"w": torch.ones(2), "obj": _Opaque()}, allow_pickle=True)
    target: Dict[str, Any] = {"w": torch.zeros(2), "obj": None}
    _fails("saved as pickle", dcp.load, target, storage_reader=SafetensorsReader(str(tmp_path)), no_dist=True)
    dcp.load(target, storage_reader=SafetensorsReader(str(tmp_path), allow_pickle=True), no_dist=True)
    assert isinstance(target["obj"], _Opaque) and torch.equal(target["w"], torch.ones(2))


def test_values_load_without_the_wrappers(tmp_path):
    _save(str(tmp_path), {"w": torch.ones(2), "n": 5})
    target: Dict[str, Any] = {"w": torch.zeros(2), "n": 0}
    torch_safetensors.uninstall()
    try:
        dcp.load(target, storage_reader=SafetensorsReader(str(tmp_path)), no_dist=True)
    finally:
        torch_safetensors.install()
    assert target["n"] == 5


def test_resave_replaces_shards_and_keeps_old_until_index(tmp_path):
    d = str(tmp_path)
    _save(d, {"w": torch.ones(3)})
    first = os.listdir(os.path.join(d, SHARD_DIR))
    _save(d, {"w": torch.full((3,), 2.0)})
    second = os.listdir(os.path.join(d, SHARD_DIR))
    assert len(first) == len(second) == 1 and first != second  # the old shard is gone
    target = {"w": torch.zeros(3)}
    dcp.load(target, storage_reader=SafetensorsReader(d), no_dist=True)
    assert torch.equal(target["w"], torch.full((3,), 2.0))
    _fails("overwrite=False", _save, d, {"w": torch.ones(3)}, overwrite=False)


@pytest.mark.parametrize("edit, fragment", [
    (lambda doc: doc.update(files=["../outside.safetensors"]), "plain relative path"),
    (lambda doc: doc.update(version=99), "version"),
    (lambda doc: doc["tensors"]["w"].update(dtype="os.system"), "unknown dtype"),
    (lambda doc: doc["tensors"]["w"]["chunks"][0].update(sizes=[4]), "reaches past"),
    (lambda doc: doc["objects"]["n"].update(encoding="marshal"), "unknown encoding"),
])
def test_malformed_index_refused(tmp_path, edit, fragment):
    d = str(tmp_path)
    _save(d, {"w": torch.ones(3), "n": 1})
    path = os.path.join(d, INDEX_NAME)
    doc = json.loads(open(path, encoding="utf-8").read())
    edit(doc)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f)
    with pytest.raises(torch_safetensors.SafetensorError, match=fragment):
        SafetensorsReader(d).read_metadata()


def test_shard_disagreeing_with_index_refused(tmp_path):
    d = str(tmp_path)
    _save(d, {"w": torch.ones(3)})
    path = os.path.join(d, INDEX_NAME)
    doc = json.loads(open(path, encoding="utf-8").read())
    doc["tensors"]["w"]["dtype"] = "float64"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f)
    _fails("is torch.float32, the index says torch.float64", dcp.load,
           {"w": torch.zeros(3, dtype=torch.float64)}, storage_reader=SafetensorsReader(d), no_dist=True)


def test_no_safetensors_package_needed(tmp_path, monkeypatch):
    for name in [n for n in sys.modules if n == "safetensors" or n.startswith("safetensors.")] + ["safetensors"]:
        monkeypatch.setitem(sys.modules, name, None)  # any import of it now fails
    d = str(tmp_path)
    state = {"w": torch.arange(6.0).reshape(2, 3), "n": 2}
    _save(d, state, consolidate=True)
    target: Dict[str, Any] = {"w": torch.zeros(2, 3), "n": 0}
    dcp.load(target, storage_reader=SafetensorsReader(d), no_dist=True)
    assert torch.equal(target["w"], state["w"]) and target["n"] == 2
    assert torch.equal(torch.load(os.path.join(d, "model.safetensors"))["w"], state["w"])


def test_bad_shard_size_refused_before_saving(tmp_path):
    with pytest.raises(ValueError, match="max_shard_size"):
        SafetensorsWriter(str(tmp_path), consolidate=True, max_shard_size="lots")
