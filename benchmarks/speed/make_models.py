"""Deterministic synthetic Llama checkpoints for the speed benchmark: a base and n fine-tunes.

Each model is a Hugging Face directory a ``LlamaForCausalLM`` loads: ``config.json``
(``tie_word_embeddings: false``), bf16 weights with the real Llama tensor names in sharded
safetensors (at most ``--shard-size`` bytes each, default 200 MB) and ``model.safetensors.index.json``.

The weights are generated tensor by tensor and streamed to disk (each shard's safetensors
header is written first, then the tensors behind it), so memory stays at a few copies of the
largest tensor whatever the model size. Every random draw comes from a generator seeded by
(seed, model, tensor name): the same command writes the same bytes on any machine, and
fine-tune t is the same whether 3 or 8 fine-tunes are asked for.

Fine-tune t = base + delta_t, with, per entry,

* dense noise: N(0, 1) * 5e-4 everywhere (about 2.5 % of the weights' scale, 0.02);
* shared sparse changes: 2 % of the entries, the same for every fine-tune, hold a change of
  magnitude 2e-3 + |N(0,1)| * 4e-3 whose sign follows a per-entry consensus sign with
  probability 0.7 and is flipped otherwise, so the fine-tunes disagree on about 30-50 % of
  these entries (TIES's sign election has work to do);
* own sparse changes: another 1 % of the entries, drawn per fine-tune, with the same magnitude
  law and a random sign.

Usage::

    python benchmarks/speed/make_models.py                       # small, 3 fine-tunes
    python benchmarks/speed/make_models.py --size large --n 3 --root /tmp/tiesmerge-speed

Writes ROOT/SIZE/base and ROOT/SIZE/ft-01 .. ft-NN; a directory whose ``speed-model.json``
stamp matches the parameters (and whose files all exist with the stamped sizes) is kept as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

GENERATOR_VERSION = 2
DEFAULT_ROOT = Path(os.environ.get("TIESMERGE_SPEED_ROOT", "/tmp/tiesmerge-speed"))
DEFAULT_SHARD_SIZE = 200_000_000  # bytes: 3 shards for small, 11 for large


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SIZES = {
    # 0.246 B parameters (GQA 16/4 heads, like TinyLlama's layout at a quarter of the width)
    "small": LlamaShape(hidden=1024, intermediate=2816, layers=16, heads=16, kv_heads=4, vocab=32000),
    # 1.01 B parameters (TinyLlama's width, 20 layers instead of 22)
    "large": LlamaShape(hidden=2048, intermediate=5632, layers=20, heads=32, kv_heads=4, vocab=32000),
    # 0.4 M parameters: for warming up (numba's compile cache, imports) and smoke tests
    "tiny": LlamaShape(hidden=64, intermediate=176, layers=2, heads=4, kv_heads=2, vocab=1000),
}

# the fine-tune recipe (see the module docstring)
WEIGHT_STD = 0.02
DENSE_STD = 5e-4
SHARED_FRACTION = 0.02
OWN_FRACTION = 0.01
AGREE_PROBABILITY = 0.7
SPARSE_FLOOR = 2e-3
SPARSE_STD = 4e-3


def tensor_specs(shape: LlamaShape) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a LlamaForCausalLM, in Hugging Face's order."""
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab, h))]
    for n in range(shape.layers):
        p = f"model.layers.{n}."
        specs += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (shape.vocab, h))]
    return specs


def n_params(shape: LlamaShape) -> int:
    total = 0
    for _, dims in tensor_specs(shape):
        k = 1
        for d in dims:
            k *= d
        total += k
    return total


def llama_config(shape: LlamaShape) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "initializer_range": WEIGHT_STD,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
        "torch_dtype": "bfloat16",
    }


def plan_shards(specs: list[tuple[str, tuple[int, ...]]], shard_size: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, dims in specs:
        nbytes = 2 * _numel(dims)
        if shards[-1] and used + nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append((name, dims))
        used += nbytes
    return shards


def _numel(dims: tuple[int, ...]) -> int:
    k = 1
    for d in dims:
        k *= d
    return k


def _seed(*parts: object) -> int:
    """A stable 63-bit seed from the parts (FNV-1a; Python's hash() is salted per process)."""
    h = 0xCBF29CE484222325
    for byte in "\x1f".join(str(p) for p in parts).encode():
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def _gen(seed: int, *parts: object) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(_seed(seed, *parts))
    return g


def base_tensor(seed: int, name: str, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(base weights as bf16, flat indices of the shared sparse entries, their consensus signs)."""
    g = _gen(seed, "base", name)
    if len(dims) == 1:  # RMSNorm scales: around 1
        w = torch.randn(dims, generator=g).mul_(0.05).add_(1.0)
    else:
        w = torch.randn(dims, generator=g).mul_(WEIGHT_STD)
    v = torch.rand(_numel(dims), generator=g)
    shared = (v < SHARED_FRACTION).nonzero().squeeze(1)
    consensus = torch.where(v[shared] < SHARED_FRACTION / 2, 1.0, -1.0)
    return w.to(torch.bfloat16), shared, consensus


def finetune_tensor(seed: int, t: int, name: str, base_bf16: torch.Tensor, shared: torch.Tensor,
                    consensus: torch.Tensor) -> torch.Tensor:
    """Fine-tune t's weights (bf16): base + dense noise + shared and own sparse changes."""
    g = _gen(seed, "finetune", t, name)
    z = torch.randn(base_bf16.numel(), generator=g)
    u = torch.rand(base_bf16.numel(), generator=g)
    # shared entries: the consensus sign with probability AGREE_PROBABILITY, else flipped
    agree = torch.where(u[shared] < AGREE_PROBABILITY, 1.0, -1.0)
    shared_val = (z[shared].abs() * SPARSE_STD + SPARSE_FLOOR) * consensus * agree
    # own entries: OWN_FRACTION of the rest, random sign (u < OWN_FRACTION / 2 is +)
    u[shared] = 1.0
    own = (u < OWN_FRACTION).nonzero().squeeze(1)
    own_val = (z[own].abs() * SPARSE_STD + SPARSE_FLOOR) * torch.where(u[own] < OWN_FRACTION / 2, 1.0, -1.0)
    delta = z.mul_(DENSE_STD)  # dense noise
    delta[shared] = shared_val
    delta[own] = own_val
    return delta.view(base_bf16.shape).add_(base_bf16).to(torch.bfloat16)


class ShardedSafetensorsWriter:
    """Streams tensors into pre-planned safetensors shards (header first, data behind it)."""

    def __init__(self, directory: Path, shards: list[list[tuple[str, tuple[int, ...]]]]) -> None:
        self.directory = directory
        self.shards = shards
        n = len(shards)
        self.names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        self.owner = {name: k for k, shard in enumerate(shards) for name, _ in shard}
        self._open_index = -1
        self._file = None
        self._expected: list[str] = []

    def _open(self, k: int) -> None:
        self._close_current()
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dims in self.shards[k]:
            nbytes = 2 * _numel(dims)
            header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self._file = open(self.directory / self.names[k], "wb")  # noqa: SIM115 - closed in _close_current
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._open_index = k
        self._expected = [name for name, _ in self.shards[k]]

    def _close_current(self) -> None:
        if self._file is not None:
            if self._expected:
                raise RuntimeError(f"shard {self.names[self._open_index]} closed before {self._expected[0]!r}")
            self._file.close()
            self._file = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        k = self.owner[name]
        if k != self._open_index:
            self._open(k)
        if not self._expected or self._expected[0] != name:
            raise RuntimeError(f"tensor {name!r} written out of order")
        self._expected.pop(0)
        assert self._file is not None
        self._file.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())

    def close(self) -> None:
        self._close_current()
        weight_map = {name: self.names[k] for name, k in self.owner.items()}
        total = sum(2 * _numel(dims) for shard in self.shards for _, dims in shard)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _stamp(size: str, shape: LlamaShape, seed: int, role: str, shard_size: int) -> dict:
    return {"generator_version": GENERATOR_VERSION, "size": size, "shape": asdict(shape), "seed": seed,
            "role": role, "shard_size": shard_size, "params": n_params(shape),
            "recipe": {"weight_std": WEIGHT_STD, "dense_std": DENSE_STD, "shared_fraction": SHARED_FRACTION,
                       "own_fraction": OWN_FRACTION, "agree_probability": AGREE_PROBABILITY,
                       "sparse_floor": SPARSE_FLOOR, "sparse_std": SPARSE_STD}}


def _is_current(directory: Path, stamp: dict) -> bool:
    path = directory / "speed-model.json"
    if not path.is_file():
        return False
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    files = found.pop("files", None)
    if found != stamp or not isinstance(files, dict):
        return False
    return all((directory / f).is_file() and (directory / f).stat().st_size == s for f, s in files.items())


def model_dirs(root: Path, size: str, n: int) -> tuple[Path, list[Path]]:
    set_dir = root / size
    return set_dir / "base", [set_dir / f"ft-{t:02d}" for t in range(1, n + 1)]


def weight_files(directory: Path) -> list[Path]:
    """The model's weight files (what a merge has to read)."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    return [directory / f for f in sorted(set(index["weight_map"].values()))]


def make_set(root: Path = DEFAULT_ROOT, size: str = "small", n: int = 3, seed: int = 0,
             shard_size: int = DEFAULT_SHARD_SIZE, log=print) -> tuple[Path, list[Path]]:
    """Write ROOT/SIZE/{base, ft-01..ft-NN} where missing or stale; return their paths."""
    shape = SIZES[size]
    base_dir, ft_dirs = model_dirs(root, size, n)
    roles = [("base", base_dir)] + [(f"finetune-{t}", d) for t, d in enumerate(ft_dirs, start=1)]
    todo = [(role, d) for role, d in roles if not _is_current(d, _stamp(size, shape, seed, role, shard_size))]
    if not todo:
        log(f"{root / size}: base and {n} fine-tune(s) already present ({n_params(shape) / 1e9:.3f} B parameters each)")
        return base_dir, ft_dirs
    specs = tensor_specs(shape)
    shards = plan_shards(specs, shard_size)
    log(f"{root / size}: writing {', '.join(d.name for _, d in todo)} "
        f"({n_params(shape) / 1e9:.3f} B parameters, {len(shards)} shard(s) each, seed {seed})")
    started = time.perf_counter()
    writers: dict[str, ShardedSafetensorsWriter] = {}
    tmp_dirs: dict[str, Path] = {}
    for role, d in todo:
        tmp = d.with_name(d.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tmp_dirs[role] = tmp
        writers[role] = ShardedSafetensorsWriter(tmp, shards)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    for idx, (name, dims) in enumerate(specs):
        base_bf16, shared, consensus = base_tensor(seed, name, dims)
        for role, _ in todo:
            if role == "base":
                writers[role].write(name, base_bf16)
            else:
                t = int(role.split("-")[1])
                writers[role].write(name, finetune_tensor(seed, t, name, base_bf16, shared, consensus))
        del base_bf16, shared, consensus
        if idx % 40 == 0 or idx == len(specs) - 1:
            log(f"  {idx + 1}/{len(specs)} tensors, {time.perf_counter() - started:.0f} s")
    for role, d in todo:
        writers[role].close()
        tmp = tmp_dirs[role]
        (tmp / "config.json").write_text(json.dumps(llama_config(shape), indent=2) + "\n")
        stamp = _stamp(size, shape, seed, role, shard_size)
        stamp["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        (tmp / "speed-model.json").write_text(json.dumps(stamp, indent=2) + "\n")
        shutil.rmtree(d, ignore_errors=True)
        tmp.rename(d)
    log(f"  done in {time.perf_counter() - started:.0f} s")
    return base_dir, ft_dirs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", nargs="?", type=Path, default=DEFAULT_ROOT, help=f"output root (default {DEFAULT_ROOT})")
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--n", type=int, default=3, help="number of fine-tunes (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="largest shard in bytes (default 200e6)")
    p.add_argument("--print-sizes", action="store_true", help="print each size's parameter count and stop")
    args = p.parse_args(argv)
    if args.print_sizes:
        for name, shape in SIZES.items():
            print(f"{name}: {n_params(shape):,} parameters, {2 * n_params(shape) / 1e9:.3f} GB in bf16, {shape}")
        return 0
    if args.n < 1:
        p.error("--n must be at least 1")
    make_set(args.root, args.size, args.n, args.seed, args.shard_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
