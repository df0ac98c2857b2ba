"""The I/O layer without torch or numba: a fresh interpreter opens, aligns, reads, writes and
hashes safetensors models, binds adapters and translates a mergekit recipe, and never imports
either. The files are made (and the output checked) here, with torch.

Cross-cutting (not one source module): every module of the io layer, and recipe_mergekit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

from helpers_adapters import IA3_MODULES, random_ia3, random_lora, write_ia3_dir, write_lora_dir
from helpers_ckpt import make_base, write_hf_dir

BF16 = ("model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight")  # stored as bfloat16
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"

# Runs in the child. argv: base, model 0, model 1, LoRA adapter, (IA)³ adapter, output directory.
CHILD = textwrap.dedent('''
    import hashlib, json, sys
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    import numpy as np
    from safetensors import safe_open

    import tiesmerge.dtypes, tiesmerge.errors, tiesmerge.sizes
    from tiesmerge.io import card
    from tiesmerge.io.adapters import ZeroBase, ia3_identity
    from tiesmerge.io.align import align
    from tiesmerge.io.checkpoint import SafetensorsCheckpoint, open_checkpoint
    from tiesmerge.io.writer import OutputEntry, ShardedWriter, atomic_directory, copy_model_files
    from tiesmerge.recipe_mergekit import translate_mergekit

    base_dir, m0_dir, m1_dir, lora_dir, ia3_dir, out = map(Path, sys.argv[1:7])
    base = open_checkpoint(base_dir)
    models = [open_checkpoint(m0_dir), open_checkpoint(m1_dir)]
    assert isinstance(base, SafetensorsCheckpoint) and len(base.files()) == 3
    info = base.info("model.layers.0.mlp.up_proj.weight")
    assert (info.shape, info.dtype_info.code, info.itemsize, info.is_floating, info.nbytes) == (
        (16, 8), "BF16", 2, True, 256)
    assert not base.info("model.position_ids").is_floating

    # -- align: the tied head is found by comparing raw bytes of its first rows in every input
    alignment = align(base, models)
    assert alignment.tied == (("model.embed_tokens.weight", "lm_head.weight"),), alignment.tied
    jobs = {j.name: j for j in alignment.jobs}
    assert jobs["model.embed_tokens.weight"].aliases == ("lm_head.weight",)
    assert not jobs["model.position_ids"].merge and jobs["model.norm.weight"].merge
    assert jobs["model.layers.1.mlp.up_proj.weight"].nbytes == 256

    # -- write: float32 tensors are the mean of the three inputs (read_into), bfloat16 ones
    #    model 1's stored bits (map_rows, uint16), the rest the base's; two row chunks each
    def rows_of(n):
        return [None] if n < 2 else [slice(0, n // 2), slice(n // 2, n)]

    def read(ckpt, job, rows):
        n = job.numel if rows is None else (rows.stop - rows.start) * job.numel // job.shape[0]
        buf = bytearray(n * job.itemsize)
        ckpt.read_into(job.name, rows, memoryview(buf))
        return np.frombuffer(buf, dtype=job.dtype_info.numpy)

    groups = [[OutputEntry(n, j.shape, j.dtype_info) for n in (j.name, *j.aliases)] for j in alignment.jobs]
    with atomic_directory(out) as tmp:
        writer = ShardedWriter(tmp, groups, shard_size=1200, metadata={"format": "pt"})
        for job in alignment.jobs:
            for rows in rows_of(job.shape[0] if job.shape else 0):
                if job.merge and job.dtype_info.code == "F32":
                    chunk = np.mean([read(c, job, rows) for c in (base, *models)], axis=0, dtype=np.float64)
                    chunk = chunk.astype(np.float32)
                elif job.merge:
                    chunk = models[1].map_rows(job.name, rows).view(job.dtype_info.numpy)
                else:
                    chunk = base.map_rows(job.name, rows).view(job.dtype_info.numpy)
                writer.write(job.name, rows, chunk)
            for alias in job.aliases:
                writer.alias(alias, job.name)
        writer.close()
        copied = copy_model_files(base_dir, tmp, dtype="bf16")
    assert "config.json" in copied and json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"

    # -- read back: safetensors' own parser, then this reader
    assert len(writer.files) > 1 and (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(out / index["model.norm.weight"]), framework="numpy") as f:
        norm = f.get_tensor("model.norm.weight")
    expected = np.mean([c.map_rows("model.norm.weight", None).view(np.float32) for c in (base, *models)],
                       axis=0, dtype=np.float64).astype(np.float32)
    assert norm.dtype == np.float32 and np.array_equal(norm, expected)
    back = open_checkpoint(out)
    assert sorted(back.names()) == sorted(base.names())
    assert all(back.info(n) == base.info(n) for n in base.names())
    assert bytes(back.map_rows("lm_head.weight", None)) == bytes(back.map_rows("model.embed_tokens.weight", None))

    # -- digests
    with ThreadPoolExecutor(max_workers=1) as pool:
        digests = [f.result() for f in card.hash_files(back.files(), pool)]
    assert [d["sha256"] for d in digests] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in back.files()]

    # -- adapters: opening, binding and aligning read headers and configs only
    lora = open_checkpoint(lora_dir)
    lora_alignment = align(base, [lora])
    assert sorted(j.name for j in lora_alignment.jobs if j.merge) == sorted(lora.targets), lora_alignment.jobs
    assert lora.info("model.layers.0.self_attn.q_proj.weight").dtype_info.code == "F32"
    assert align(ZeroBase(base), [lora]).tied == alignment.tied  # zeros compared as bytes
    ia3 = open_checkpoint(ia3_dir)
    identity, unions = ia3_identity(base, [ia3])
    ia3_alignment = align(identity, unions)
    assert sorted(j.name for j in ia3_alignment.jobs) == sorted(ia3.names()) and not ia3_alignment.tied

    # -- a mergekit recipe
    recipe, origin = translate_mergekit({"merge_method": "ties", "base_model": "b", "dtype": "bf16",
                                         "models": [{"model": "m", "parameters": {"density": 0.5, "weight": 1.0}}]})
    assert recipe["dtype"] == "bfloat16"

    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numba"))
    assert not loaded, f"{len(loaded)} modules of torch or numba were imported: {loaded[:3]}"
    print("torch-free: ok")
''')


def _family(tmp_path):
    base = make_base(0)
    for name in BF16:
        base[name] = base[name].to(torch.bfloat16)
    base[HEAD] = base[EMBED].clone()  # tied: one tensor under two names
    models = []
    for k in range(2):
        g = torch.Generator().manual_seed(k + 1)
        ft = {n: (t.float() + 0.1 * torch.randn(t.shape, generator=g)).to(t.dtype) if t.is_floating_point()
              else t.clone() for n, t in base.items()}
        ft[HEAD] = ft[EMBED].clone()
        models.append(ft)
    tied = {"tie_word_embeddings": True}
    paths = [write_hf_dir(tmp_path / "base", base, shards=3, config=tied),
             write_hf_dir(tmp_path / "ft0", models[0], shards=2, config=tied),
             write_hf_dir(tmp_path / "ft1", models[1], config=tied)]
    paths.append(write_lora_dir(tmp_path / "lora", random_lora(base, rank=2, seed=3), alpha=4.0))
    paths.append(write_ia3_dir(tmp_path / "ia3", random_ia3(base, seed=4), IA3_MODULES))
    return base, models, paths


def test_io_layer_reads_aligns_and_writes_without_torch_or_numba(tmp_path):
    base, models, paths = _family(tmp_path)
    out = tmp_path / "out"
    child = subprocess.run([sys.executable, "-c", CHILD, *map(str, paths), str(out)],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    assert "torch-free: ok" in child.stdout
    # what the child wrote from numpy arrays, read with torch
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    got = {}
    for shard in sorted(set(index.values())):
        got.update(load_file(str(out / shard)))
    assert set(got) == set(base)
    for name, value in base.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        if not value.is_floating_point():
            assert torch.equal(got[name], value), name
        elif value.dtype == torch.bfloat16:
            assert torch.equal(got[name], models[1][name]), name
        else:
            mean = torch.stack([value, *(m[name] for m in models)]).double().mean(0).float()
            torch.testing.assert_close(got[name], mean, rtol=1e-6, atol=1e-7, msg=name)
    assert torch.equal(got[HEAD], got[EMBED])
    assert (out / "tokenizer.json").is_file()
