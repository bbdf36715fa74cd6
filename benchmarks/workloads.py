"""Benchmark workloads: deterministic specs (names, shapes, dtypes) and their data.

A spec is a list of (name, shape, dtype) built from a few numbers only, so a fresh
subprocess rebuilds exactly the same dict from the same arguments.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch

Spec = List[Tuple[str, Tuple[int, ...], torch.dtype]]

GIB = 1 << 30


def nbytes(spec: Spec) -> int:
    """Total data bytes of a spec."""
    return sum(math.prod(shape) * torch.empty((), dtype=dt).element_size() for _, shape, dt in spec)


# ---- LLM-like: a small llama ----


def _round64(x: float) -> int:
    return max(64, int(round(x / 64)) * 64)


def _llama(hidden: int, layers: int, vocab: int) -> Spec:
    kv = _round64(hidden / 4)  # grouped-query attention: 4 query heads per kv head
    inter = _round64(hidden * 8 / 3)
    bf = torch.bfloat16
    spec: Spec = [("model.embed_tokens.weight", (vocab, hidden), bf)]
    for i in range(layers):
        p = f"model.layers.{i}."
        spec += [
            (p + "self_attn.q_proj.weight", (hidden, hidden), bf),
            (p + "self_attn.k_proj.weight", (kv, hidden), bf),
            (p + "self_attn.v_proj.weight", (kv, hidden), bf),
            (p + "self_attn.o_proj.weight", (hidden, hidden), bf),
            (p + "mlp.gate_proj.weight", (inter, hidden), bf),
            (p + "mlp.up_proj.weight", (inter, hidden), bf),
            (p + "mlp.down_proj.weight", (hidden, inter), bf),
            (p + "input_layernorm.weight", (hidden,), bf),
            (p + "post_attention_layernorm.weight", (hidden,), bf),
        ]
    spec += [("model.norm.weight", (hidden,), bf), ("lm_head.weight", (vocab, hidden), bf)]
    return spec


def llm_spec(target_bytes: int, layers: int = 19, vocab: int = 32000) -> Spec:
    """A llama-shaped bf16 state dict (9 tensors per layer + 3) close to target_bytes."""
    best = min(range(64, 16384 + 1, 64), key=lambda h: abs(nbytes(_llama(h, layers, vocab)) - target_bytes))
    return _llama(best, layers, vocab)


# ---- many small tensors ----


def small_spec(count: int) -> Spec:
    """count small fp32 tensors (4 B to 4 KiB each), shapes from a fixed seed."""
    g = torch.Generator().manual_seed(1)
    sizes = [1, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    picks = torch.randint(0, len(sizes), (count,), generator=g).tolist()
    spec: Spec = []
    for i, k in enumerate(picks):
        n = sizes[k]
        shape = (n,) if i % 3 else (max(1, n // 16), min(n, 16))
        spec.append((f"encoder.block.{i // 10}.unit.{i % 10}.weight", shape, torch.float32))
    return spec


# ---- a mix with odd sizes ----

_MIX_DTYPES = [
    torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8,
    torch.bool, torch.float64, torch.int64, torch.int32, torch.int16,
]


def mixed_spec(target_bytes: int) -> Spec:
    """Mixed dtypes with odd element counts: most data offsets are not multiples of 8.

    Big odd matrices hold most of the bytes; many tiny tensors, a scalar and a
    zero-size tensor sit between them.
    """
    g = torch.Generator().manual_seed(2)
    spec: Spec = [("scalar", (), torch.float32), ("empty", (0, 3), torch.float32)]
    total = 0
    i = 0
    big_rows = max(3, int(math.sqrt(target_bytes / 40)) | 1)
    while total < target_bytes:
        dt = _MIX_DTYPES[i % len(_MIX_DTYPES)]
        if i % 7 == 0:  # a big one
            shape: Tuple[int, ...] = (big_rows + 2 * (i % 5), 2 * int(torch.randint(3, 64, (1,), generator=g)) + 1)
        else:
            dims = int(torch.randint(1, 4, (1,), generator=g))
            shape = tuple(2 * int(torch.randint(0, 9, (1,), generator=g)) + 1 for _ in range(dims))
        spec.append((f"mix.{i}.{str(dt).split('.')[-1]}", shape, dt))
        total += math.prod(shape) * torch.empty((), dtype=dt).element_size()
        i += 1
    return spec


# ---- data ----


def make_tensors(spec: Spec, seed: int = 0) -> Dict[str, torch.Tensor]:
    """The same values for the same spec and seed, in every process."""
    g = torch.Generator().manual_seed(seed)
    out: Dict[str, torch.Tensor] = {}
    for name, shape, dt in spec:
        if dt.is_floating_point:
            out[name] = torch.randn(shape, dtype=dt, generator=g)
        elif dt == torch.bool:
            out[name] = torch.randint(0, 2, shape, generator=g, dtype=torch.uint8).bool()
        else:
            info = torch.iinfo(dt)
            out[name] = torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g, dtype=dt)
    return out


def make_params(spec: Spec) -> Dict[str, torch.Tensor]:
    """Preallocated, already touched destination tensors (what a model holds)."""
    return {name: torch.zeros(shape, dtype=dt) for name, shape, dt in spec}


def build(name: str, size_gib: float, small_count: int) -> Spec:
    """A workload's spec from the runner's options."""
    if name == "llm":
        return llm_spec(int(size_gib * GIB))
    if name == "small":
        return small_spec(small_count)
    if name in ("mixed", "mixed-misaligned"):
        return mixed_spec(int(size_gib * GIB / 4))
    raise ValueError(f"unknown workload {name!r}")
