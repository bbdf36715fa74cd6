"""transformers both ways, offline, with tiny models built from configs in the test:
from_pretrained reads what torch.save / save_sharded write, and torch.load reads what
save_pretrained writes (single file and sharded)."""
from __future__ import annotations

import json
import os

import pytest

# offline before transformers (and huggingface_hub) read their settings
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import torch_safetensors as ts  # noqa: E402

transformers = pytest.importorskip("transformers")


def _llama(tied: bool):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def model(request):
    return _llama(request.param)


def _tied_duplicates(sd):
    """Names whose tensor is the same memory as an earlier name's (what transformers drops)."""
    seen, dups = set(), set()
    for name, t in sd.items():
        key = (t.data_ptr(), t.shape, t.stride())
        if key in seen:
            dups.add(name)
        seen.add(key)
    return dups


def _logits(model):
    ids = torch.arange(24).reshape(2, 12) % model.config.vocab_size
    with torch.no_grad():
        return model(ids).logits


def _same_tensors(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_from_pretrained_reads_torch_save(model, tmp_path):
    torch.save(model.state_dict(), tmp_path / "model.safetensors", format="safetensors")
    model.config.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(loaded), _logits(model))
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


def test_torch_load_reads_save_pretrained_single_file(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert "model.safetensors" in os.listdir(tmp_path)
    sd = model.state_dict()
    want = {k: v for k, v in sd.items() if k not in _tied_duplicates(sd)}
    if model.config.tie_word_embeddings:
        assert "lm_head.weight" not in want  # transformers drops the tied duplicate
    _same_tensors(torch.load(tmp_path / "model.safetensors"), want)
    _same_tensors(torch.load(tmp_path), want)  # the directory, as from_pretrained takes it


def test_torch_load_reads_save_pretrained_sharded(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in os.listdir(tmp_path)
    sd = model.state_dict()
    want = {k: v for k, v in sd.items() if k not in _tied_duplicates(sd)}
    for target in (tmp_path, tmp_path / "model.safetensors.index.json"):
        _same_tensors(torch.load(target), want)
    meta = torch.load(tmp_path, map_location="meta")
    assert all(t.is_meta for t in meta.values()) and sorted(meta) == sorted(want)
    # and back into a model: the tie is made again by the model, not by the file
    fresh = _llama(model.config.tie_word_embeddings)
    fresh.load_state_dict(torch.load(tmp_path), strict=not model.config.tie_word_embeddings)
    if model.config.tie_word_embeddings:
        fresh.tie_weights()
    assert torch.equal(_logits(fresh), _logits(model))


def test_from_pretrained_reads_save_sharded(model, tmp_path):
    sd = model.state_dict()
    ts.save_sharded(sd, tmp_path, max_shard_size="20KB")
    model.config.save_pretrained(tmp_path)
    with open(tmp_path / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert len(set(index["weight_map"].values())) > 2
    assert not (set(index["weight_map"]) & _tied_duplicates(sd))
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(loaded), _logits(model))
    # torch.load gives the whole state dict back, ties included
    back = torch.load(tmp_path)
    _same_tensors(back, sd)
    if model.config.tie_word_embeddings:
        assert back["lm_head.weight"].data_ptr() == back["model.embed_tokens.weight"].data_ptr()


def test_single_shard_save_sharded_is_what_transformers_writes(model, tmp_path):
    ts.save_sharded(model.state_dict(), tmp_path / "ours")
    model.save_pretrained(tmp_path / "theirs")
    assert os.listdir(tmp_path / "ours") == ["model.safetensors"]
    ours = (tmp_path / "ours" / "model.safetensors").read_bytes()
    theirs = (tmp_path / "theirs" / "model.safetensors").read_bytes()
    if not model.config.tie_word_embeddings:
        assert ours == theirs  # the same file, byte for byte
    else:  # ours also records the tied name, so torch.load can restore it
        _same_tensors(ts.load(ours), ts.load(theirs))
    model.config.save_pretrained(tmp_path / "ours")
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert torch.equal(_logits(loaded), _logits(model))
